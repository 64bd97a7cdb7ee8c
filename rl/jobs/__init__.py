"""Applications composed from rl's pieces: the main job (:mod:`rl.jobs.main_job`, configured by
:mod:`rl.jobs.config`, compared by :mod:`rl.jobs.compare`) and the ``rl main`` / ``rl eval`` commands
(:mod:`rl.jobs.cli`)."""
