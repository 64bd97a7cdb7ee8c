"""VisGen in verl's multi-turn agent loop (written against verl 0.9.1's ``ToolAgentLoop``).

.. note::
   verl 0.9.1 pins ``transformers<5.11`` and visenv's environment has transformers 5.24, so verl is
   not installed beside visenv. Run against verl 0.9.1 itself on CPU, from an isolated install
   (``pip install --target DIR --no-deps verl==0.9.1 transformers==5.10.4 ...``, the full line in
   docs/integrations.md): ``VERL_SITE=DIR pytest tests/test_integration_verl.py`` makes this loop
   from ``examples/verl/agent_loops.yaml`` with hydra as verl's worker does and plays one episode
   through verl's own ``ToolAgentLoop`` (state machine, hermes parser, Continuous Token builder)
   with a scripted LLM server and a tiny tokenizer, checking the response ids, mask, log-probs and
   reward token for token, text only and with ``images=True`` through a LLaVA processor. Not run
   against verl: the trainer (GPUs, vLLM/SGLang), verl's ``AgentLoopWorker`` post-processing, a
   real model or a real vision-language processor. The default test run (no ``VERL_SITE``) runs
   the class over a stand-in of verl instead.

:class:`VisGenAgentLoop` subclasses verl's ``ToolAgentLoop``, so the token bookkeeping is verl's
own: the sampled response ids and log-probs are kept exactly as the server returned them
(``response_mask`` 1) and each tool response is appended as environment tokens (mask 0), with its
images in ``multi_modal_data`` for a vision-language model. What the subclass changes:

* ``run`` starts a VisGen episode for the row (``extra_info.task_seed`` or ``extra_info.task``),
  replaces the row's prompt with the request, offers the environment's tools plus ``plan`` and
  ``answer`` as the chat template's tools, and after the loop puts the episode's return under the
  environment's rubric into ``reward_score`` (and the reward components and checks into
  ``extra_fields["visenv"]``);
* ``_call_tool`` sends each parsed call to that episode (:class:`~visenv.integrations.session.ToolSession`)
  and answers with a ``ToolResponse``: the tool response text and, with ``images``, the pictures the
  call made (a video's middle frame).

Recipe (the files are in ``examples/verl/``): write the dataset with :func:`task_rows`
(``python examples/verl/make_data.py``), then run verl's PPO/GRPO entry point with
``examples/verl/visenv_grpo.sh``, which sets ``actor_rollout_ref.rollout.multi_turn.enable=True``,
``actor_rollout_ref.rollout.agent.agent_loop_config_path=examples/verl/agent_loops.yaml`` (the loop
``visenv_agent`` with its ``visenv_config``), and the rows' ``agent_name: visenv_agent``.
"""

from __future__ import annotations

import contextvars
import json
from typing import Any

from visenv.error import DependencyNotInstalled
from visenv.integrations.session import ToolSession, lazy_class, task_seeds

AGENT_NAME = "visenv_agent"
"""The ``agent_name`` of the rows and of the agent-loop config entry."""

_SESSION: contextvars.ContextVar[ToolSession] = contextvars.ContextVar("visenv_session")
"""The episode of the trajectory being run (asyncio tasks started by ``run`` inherit it)."""


def _verl() -> tuple[type, type, type]:
    try:
        from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
        from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
    except ImportError:
        raise DependencyNotInstalled("verl", "verl", "The verl adapter (visenv.integrations.verl)") from None
    return ToolAgentLoop, ToolResponse, OpenAIFunctionToolSchema


class _Tool:
    """What verl's loop reads from an entry of ``self.tools``: its ``name`` and its ``tool_schema``
    (the parser is handed the schemas; the calls themselves go to :meth:`_VisGenLoop._call_tool`)."""

    def __init__(self, schema: dict[str, Any]):
        self.name = schema["function"]["name"]
        self.tool_schema = _verl()[2].model_validate(schema)


def tool_response(session: ToolSession, name: str, arguments: str, images: bool) -> tuple[str, list[Any]]:
    """Run one parsed call (``arguments`` as the JSON text the model wrote) in ``session``: the
    response text and, with ``images``, the PIL pictures the call made."""
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError as error:
        return f"Error: the arguments of {name} are not valid JSON ({error}).", []
    text = session.dispatch(name, parsed)
    if not images:
        return text, []
    from PIL import Image

    return text, [Image.fromarray(picture) for picture in session.new_images()]


def episode_summary(session: ToolSession) -> dict[str, Any]:
    """What ``extra_fields["visenv"]`` holds for a finished episode: task, calls, reward components, checks."""
    from visenv.rewards import run_checks

    record = session.env.record
    return {"task_id": record.task.task_id, "calls": len(record.calls),
            "failed_calls": sum(not c.ok for c in record.calls),
            "answered": record.answered, "rewards": list(session.rewards),
            "checks": {k: v for k, v in run_checks(record).items() if v is not None}}


class _VisGenLoop:
    """The body of :class:`VisGenAgentLoop` (mixed into verl's ``ToolAgentLoop`` on first access).

    Args:
        visenv_config: the :class:`~visenv.envs.config.VisGenConfig` options (from the agent-loop yaml).
        images: tool responses carry the pictures the call made (for a vision-language model).
        image_size: side of those pictures.
        kwargs: what verl passes to every agent loop (trainer config, server manager, tokenizer, ...).
    """

    def __init__(self, *args: Any, visenv_config: Any = None, images: bool = False, image_size: int = 256,
                 **kwargs: Any):
        kwargs.pop("name", None)  # the yaml entry's own key
        super().__init__(*args, **kwargs)
        config = visenv_config
        if config is not None and not isinstance(config, dict):
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(config, resolve=True)
        self.visenv_config = config
        self.images, self.image_size = images, image_size
        self.tool_schemas = ToolSession(config, image_size=image_size).tool_schemas()
        self.tools = {tool.name: tool for tool in map(_Tool, self.tool_schemas)}

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> Any:
        extra = kwargs.get("extra_info") or {}
        session = ToolSession(self.visenv_config, image_size=self.image_size)
        request = session.reset(extra.get("task_seed"), extra.get("task"))
        kwargs["raw_prompt"] = [{"role": "user", "content": request}]
        token = _SESSION.set(session)
        try:
            output = await super().run(sampling_params, **kwargs)
        finally:
            _SESSION.reset(token)
        output.reward_score = session.finish()
        output.extra_fields["visenv"] = episode_summary(session)
        return output

    async def _call_tool(self, tool_call: Any, tools_kwargs: dict[str, Any],
                         agent_data: Any) -> tuple[Any, float, dict]:
        response_cls = _verl()[1]
        text, pictures = tool_response(_SESSION.get(), tool_call.name, tool_call.arguments, self.images)
        return (response_cls(text=text, image=pictures) if pictures else response_cls(text=text)), 0.0, {}


__getattr__ = lazy_class(__name__, "VisGenAgentLoop", _VisGenLoop, lambda: _verl()[0])


def task_rows(n: int, seed: int = 0, config: Any = None) -> list[dict[str, Any]]:
    """``n`` rows of verl's RL dataset (write them to parquet): the request as the prompt (the loop
    rebuilds it from ``extra_info.task_seed``), ``agent_name`` and a rule reward placeholder."""
    session = ToolSession(config)
    return [{"data_source": "visenv", "agent_name": AGENT_NAME,
             "prompt": [{"role": "user", "content": session.reset(s)}],
             "reward_model": {"style": "rule", "ground_truth": ""}, "extra_info": {"task_seed": s, "index": i}}
            for i, s in enumerate(task_seeds(n, seed))]
