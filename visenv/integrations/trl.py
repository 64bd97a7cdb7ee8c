"""VisGen as a TRL environment: ``GRPOTrainer(environment_factory=...)`` (TRL >= 1.16).

TRL builds one environment instance per rollout, calls ``reset(**row)`` with the dataset row and
appends the text it returns (the request) to the prompt, lets the model call the instance's public
methods as tools (their names, type hints and Google-style docstrings become the tool schemas the
chat template shows), and reads the reward from ``get_reward()`` once the rollout is over.
:func:`environment_factory` makes such a class for any VisGen configuration: one typed method per
tool of the environment's tool set (``tool_text2image_qwen(prompt: str, aspect_ratio: str = "1:1",
...)``), plus ``plan(steps)`` and ``answer(artifacts)``; each call steps a
:class:`~visenv.envs.visgen.VisGenEnv` (see :mod:`visenv.integrations.session`), and
``get_reward`` is the episode's return under the environment's rubric.

With ``images=True`` a tool that makes images or videos returns TRL's multimodal tool content, the
pictures (``{"type": "image", "image": PIL.Image}``; a video's middle frame) before the text, for a
vision-language model; a text model gets the text alone. ::

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from visenv.integrations.trl import environment_factory, task_rows

    trainer = GRPOTrainer(model="Qwen/Qwen3-0.6B", args=GRPOConfig(max_steps=100, num_generations=4),
                          train_dataset=Dataset.from_list(task_rows(64, seed=0)),
                          environment_factory=environment_factory({"max_turns": 8}))
    trainer.train()

Rows carry ``task_seed`` (and may carry ``task``, an id or index of the suite), so the rollouts of
one GRPO group, which share a row, play the same task. This module imports nothing from TRL.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from visenv.integrations.session import ToolSession, task_seeds
from visenv.tools.specs import ToolSet

JSON_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool}


def task_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` dataset rows for ``GRPOTrainer``: an empty user prompt (``reset`` supplies the request)
    and a distinct ``task_seed`` each, drawn from ``seed``."""
    return [{"prompt": [{"role": "user", "content": ""}], "task_seed": s} for s in task_seeds(n, seed)]


def _annotation(schema: dict[str, Any]) -> Any:
    if schema.get("type") == "array":
        return list[JSON_TYPES.get(schema.get("items", {}).get("type"), str)]
    return JSON_TYPES.get(schema.get("type"), str)


def tool_method(spec: Any) -> Callable[..., Any]:
    """A method calling tool ``spec`` whose signature and docstring carry its JSON Schema (for TRL's
    tool schemas: transformers' ``get_json_schema`` reads type hints, defaults and ``Args:``)."""
    properties = spec.parameters.get("properties", {})
    required = set(spec.parameters.get("required", ()))
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    annotations: dict[str, Any] = {}
    lines = []
    for name, schema in sorted(properties.items(), key=lambda item: item[0] not in required):
        kind = _annotation(schema)
        if name in required:
            default = inspect.Parameter.empty
        elif "default" in schema:
            default = schema["default"]
        else:
            default, kind = None, kind | None
        annotations[name] = kind
        parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                            annotation=kind))
        described = schema.get("description", name.replace("_", " "))
        choices = f" (choices: {json_list(schema['enum'])})" if "enum" in schema else ""
        lines.append(f"    {name}: {described}{choices}")

    def method(self, **arguments: Any) -> Any:
        return self._call(spec.name, {k: v for k, v in arguments.items() if v is not None})

    method.__name__ = method.__qualname__ = spec.name
    method.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    method.__annotations__ = annotations
    method.__doc__ = (f"{spec.description}\n\nArgs:\n" + "\n".join(lines) + "\n\nReturns:\n"
                      "    The tool response: the artifacts made (ids, kind, size) or an error to read.")
    return method


def json_list(values: list[Any]) -> str:
    import json

    return json.dumps(list(values))


class VisGenToolEnv:
    """One VisGen episode per instance, for TRL's ``environment_factory`` (see the module docstring).

    The tool methods are added by :func:`environment_factory`, which subclasses this class for a
    configuration's tool set; this base class holds ``reset``, ``plan``, ``answer`` and ``get_reward``.

    Args:
        config: a :class:`~visenv.envs.config.VisGenConfig` or a dict of its options.
        images: tools return the images they made as TRL's image content (for a vision-language model).
        image_size: side of those square pictures.
    """

    def __init__(self, config: Any = None, images: bool = False, image_size: int = 256):
        self.session = ToolSession(config, image_size=image_size)
        self.images = images

    def reset(self, task_seed: int | None = None, task: Any = None, **row: Any) -> str:
        """Start an episode on the row's task: the request, which TRL appends to the prompt.

        Args:
            task_seed: the task's seed (rows of one GRPO group share it); None draws one.
            task: a task id or index of the suite instead of a seed.
            row: the dataset row's other columns (``prompt``, ...), unused.
        """
        return self.session.reset(task_seed, task)

    def plan(self, steps: list[str]) -> str:
        """Write down the plan before the first tool call: one tool per step, in order.

        Args:
            steps: the steps, e.g. ["tool_prompt_refine: sharpen the prompt", "tool_text2image_qwen: draw it"].

        Returns:
            A confirmation.
        """
        return self.session.plan(steps)

    def answer(self, artifacts: list[str]) -> str:
        """Deliver the finished artifacts and end the episode. Call it once, last.

        Args:
            artifacts: the ids of the artifacts delivered, e.g. ["img_3f2a9c01d4e7"].

        Returns:
            What was delivered, or the problems with the delivery.
        """
        return self.session.answer(artifacts)

    def get_reward(self) -> float:
        """The episode's return under the environment's rubric (NaN when a required judge failed)."""
        return self.session.finish()

    def _call(self, name: str, arguments: dict[str, Any]) -> Any:
        text = self.session.call(name, arguments)
        pictures = self.session.new_images() if self.images else []
        if not pictures:
            return text
        from PIL import Image

        return [*({"type": "image", "image": Image.fromarray(p)} for p in pictures), {"type": "text", "text": text}]


_CLASSES: dict[int, type] = {}


def environment_class(tools: ToolSet) -> type:
    """The :class:`VisGenToolEnv` subclass with one method per tool of ``tools`` (made once per tool set)."""
    made = _CLASSES.get(id(tools))
    if made is None or made.tools is not tools:
        methods = {name: tool_method(tools[name]) for name in tools}
        made = type("VisGenToolEnv", (VisGenToolEnv,), {**methods, "tools": tools, "__module__": __name__,
                                                        "__doc__": VisGenToolEnv.__doc__})
        _CLASSES[id(tools)] = made
    return made


def environment_factory(config: Any = None, *, images: bool = False, image_size: int = 256,
                        **options: Any) -> Callable[[], VisGenToolEnv]:
    """The ``environment_factory`` for ``GRPOTrainer``: a zero-argument callable making one environment.

    Args:
        config: a :class:`~visenv.envs.config.VisGenConfig` or a dict of its options (e.g.
            ``{"max_turns": 8, "tools": ["tool_text2image_qwen", ...]}``).
        images: tools return their pictures as image content (for a vision-language model).
        image_size: side of those pictures.
        options: more environment options (override ``config``).

    Raises:
        ConfigError: the configuration is invalid (checked here, before TRL starts).
    """
    from visenv.envs.config import VisGenConfig

    checked = VisGenConfig.from_any(config, **options)
    cls = environment_class(checked.tools)

    def make() -> VisGenToolEnv:
        return cls(checked, images=images, image_size=image_size)

    return make
