"""visenv inside the trainers researchers already use (each adapter imports its framework lazily).

* :mod:`visenv.integrations.trl`: an environment class for TRL's ``GRPOTrainer(environment_factory=...)``.
* :mod:`visenv.integrations.skyrl`: a skyrl-gym text environment (``pip install 'visenv[skyrl]'``).
* :mod:`visenv.integrations.verl`: an agent loop for verl's multi-turn rollouts (``pip install verl``).

:mod:`visenv.integrations.session` is what they share: one VisGen episode driven by function calls
(tool name + arguments) instead of UTPC text turns. See docs/integrations.md.
"""
