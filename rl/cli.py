"""The ``rl`` command: the trainer's runs, the main job, benchmark evaluation and teacher data.

``rl sft``, ``rl train`` and ``rl record`` each run from a YAML file plus overrides::

    rl record --config configs/teacher_visgen.yaml         # teacher trajectories -> SFT data
    rl sft    --config configs/sft_visgen.yaml
    rl train  --config configs/visgen_pst_grpo.yaml --grpo.group_size 4 --rollout.backend ray
    rl record --config configs/eval_visgen.yaml --policy.model runs/visgen/grpo/checkpoints/iter_000200/policy

Every option of the YAML file is also a ``--section.field`` option; ``rl <command> --help`` lists
them with their meaning and default. ``--set FIELD=VALUE`` (repeatable) sets any field by its dotted
name (``--set env.options.max_turns=5``). Bad input (a config, a path, data, an endpoint) ends with
one line on stderr and exit code 2.

The applications (:mod:`rl.jobs.cli`, :mod:`baselines.data`)::

    rl main                          # the main job (bash scripts/main.sh): PST, GRPO, SFT-only vs RL
    rl ablate --seeds 0 1 2          # the paper's ablations (variants x seeds): table with s.e., plots
    rl eval --agent teacher          # an agent, a policy folder or an API model on a benchmark suite
    rl data build --n 200 --out data.jsonl    # teacher trajectories through the data funnel
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from baselines.data import add_data_commands
from rl import checkpoint
from rl.config import EvalConfig, LearnerConfig, SFTConfig, TrainConfig, add_options, load, overrides_from, to_dict
from rl.errors import VisenvError
from rl.jobs.cli import add_job_commands
from rl.learner import LearnerGroup
from rl.logging import MetricsLogger
from rl.rollout import SerialRollout, make_specs
from rl.train import Trainer, episode_metrics
from visenv.imports import import_object


def run_sft(config: SFTConfig, progress: bool = True, learner: LearnerConfig | None = None,
            system_prompt: str | None = None) -> str:
    """Run the PST stages (on ``learner``, by default ``config.learner``); returns the folder of the
    fine-tuned policy.

    ``system_prompt`` opens the trajectories that have no system message (``rl train`` passes its
    policy's, so that SFT trains on the prompts RL samples from). With ``config.lora`` the adapters
    are written to "adapter" and merged into "policy".
    """
    import copy
    import functools
    import random

    from rl.hf import CausalLMPolicy, tiny_causal_lm
    from rl.sft import run_pst
    from rl.tokenizer import train_tokenizer

    learner = learner or config.learner
    if config.model == "tiny":
        texts = [m["content"] for stage in config.stages for example in stage.examples(random.Random(config.seed))
                 for m in example]
        tokenizer = train_tokenizer(texts, config.tiny.vocab_size, id_pairs=config.tiny.id_pairs)
        model = tiny_causal_lm(len(tokenizer), config.tiny.hidden_size, config.tiny.num_layers,
                               config.tiny.num_heads, config.tiny.intermediate_size, seed=config.seed)
        policy = CausalLMPolicy(model.to(config.torch_device, getattr(torch, config.torch_dtype)), tokenizer,
                                chat=config.chat, system_prompt=system_prompt)
        if config.lora is not None:
            config.lora.apply(policy)
    else:
        policy = config.policy_config(system_prompt).build()
    if config.gradient_checkpointing:
        policy.model.activation_checkpointing_enable()
    logger = MetricsLogger(config.output_dir, tensorboard=False, total=None)
    if learner.num_workers > 1:
        group = learner.start(policy, functools.partial(copy.deepcopy, policy))
        try:
            results = group.run_pst(config.stages, config.seed, on_step=logger.log)
        finally:
            group.close()
    else:
        results = run_pst(policy, config.stages, config.seed, on_step=logger.log)
    logger.close()
    path = os.path.join(config.output_dir, "policy")
    if config.lora is not None:
        checkpoint.write_folder(os.path.join(config.output_dir, "adapter"), policy.model.save_pretrained)
    policy.save(path)
    if progress:
        for number, result in enumerate(results):
            print(f"stage {number}: loss {result['loss']:.4f}, {result['steps']:.0f} steps, "
                  f"{result['tokens_per_second']:.0f} tokens/s")
        print(f"policy saved to {path}")
    return path


def run_train(config: TrainConfig) -> list[dict[str, float]]:
    """PST (when configured) then GRPO or PPO; resumes from the newest checkpoint when asked.

    With ``learner.num_workers`` > 1 the SFT warm start and GRPO or PPO run on a :class:`rl.learner.LearnerGroup`.
    """
    from rl.grpo import GRPO
    from rl.hf import checkpoint_activations, reference_policy
    from rl.ppo import PPO

    ray_rollout = config.rollout.backend == "ray"
    rollout_cpus = config.rollout.num_workers * config.rollout.worker_num_cpus if ray_rollout else 0.0
    if config.sft is not None:
        sft_policy = os.path.join(config.sft.output_dir, "policy")
        if not (config.resume and checkpoint.incomplete(sft_policy) is None):  # a killed SFT save is redone
            run_sft(config.sft, progress=config.progress, learner=config.learner,
                    system_prompt=config.policy.for_env(config.env).system_prompt)
        config.policy.model = sft_policy
    policy_config = config.policy.for_env(config.env)
    # with learner actors and Ray rollout workers the driver's policy is only a mirror of rank 0: on the CPU,
    # off the GPUs that Ray hands to the actors
    mirror_only = config.learner.num_workers > 1 and ray_rollout
    policy = (dataclasses.replace(policy_config, device="cpu") if mirror_only else policy_config).build()
    settings = config.grpo if config.algorithm == "grpo" else config.ppo
    if config.learner.num_workers > 1:
        group = config.learner.start(policy, policy_config.build, config.rollout.ray_address, rollout_cpus)
        algorithm = group.start_grpo(settings) if config.algorithm == "grpo" else group.start_ppo(settings)
    else:
        reference = reference_policy(policy) if settings.kl_coef > 0 else None
        algorithm = (GRPO if config.algorithm == "grpo" else PPO)(policy, reference, settings)
        if config.learner.gradient_checkpointing:  # sampling runs without gradients: unaffected
            checkpoint_activations(policy.model)
    rollout = config.rollout.build(policy, policy_config.build, config.env.make)
    checkpoints = os.path.join(config.output_dir, "checkpoints")
    num_groups, group_size = config.groups
    trainer = Trainer(policy, algorithm, rollout, iterations=config.iterations, num_groups=num_groups,
                      group_size=group_size, seed=config.seed, max_staleness=config.rollout.max_staleness,
                      overlap=config.rollout.overlap,
                      checkpoint_dir=checkpoints, checkpoint_every=config.checkpoint_every)
    latest = checkpoint.latest(checkpoints) if config.resume else None
    if latest is not None:
        trainer.resume(latest)
    trainer.logger = MetricsLogger(config.output_dir, config.tensorboard, config.wandb_project,
                                   total=config.iterations if config.progress else None,
                                   initial=trainer.iteration, config=to_dict(config))
    try:
        return trainer.run()
    finally:
        trainer.logger.close()
        rollout.close()
        if isinstance(algorithm, LearnerGroup):
            algorithm.close()


def run_record(config: EvalConfig) -> dict[str, float]:
    """Run ``episodes`` fresh tasks; write summary.json and trajectories.jsonl; return the summary."""
    from rl.api import ApiPolicy
    from rl.policy import AgentPolicy

    if config.agent:
        policy = AgentPolicy(import_object(config.agent, "agent", "baselines.random_agent:RandomAgent"))
    elif config.api_base_url:
        policy = ApiPolicy(config.api_base_url, config.api_model, system_prompt=config.env.tool_prompt())
    else:
        policy = config.policy.for_env(config.env).build()
    rollout = SerialRollout(policy, config.env.make, config.num_envs)
    episodes, stats = rollout.sample(make_specs(config.seed, 0, config.episodes, 1))
    rollout.close()
    summary = {"episodes": len(episodes), **episode_metrics(episodes, stats)}
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(config.output_dir, "trajectories.jsonl"), "w", encoding="utf-8") as handle:
        for episode in episodes:
            if config.min_reward is None or episode.reward >= config.min_reward:
                handle.write(json.dumps({"messages": episode.messages(), "reward": episode.reward,
                                         "task_seed": episode.spec.task_seed}) + "\n")
    if config.api_base_url:
        from rl.api import check_some_answered

        check_some_answered([episode.error for episode in episodes])
    return summary


COMMANDS = {
    "sft": (SFTConfig, "Supervised fine-tuning in PST stages (optionally a tiny model from scratch)."),
    "train": (TrainConfig, "RL: optional PST, then GRPO or PPO, serial or on Ray, with checkpoints."),
    "record": (EvalConfig, "Record a policy, baseline agent or API endpoint on fresh tasks; save trajectories."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (cls, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=f"{help_text}\n\n{cls.__doc__.split(chr(10))[0]}")
        sub.add_argument("--config", metavar="YAML", help="YAML file of options; the options below override it.")
        add_options(sub, cls)
    add_job_commands(commands)
    add_data_commands(commands)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the command: the applications (main, eval, data) parse their own options; the trainer's
    commands load their config (YAML file, then options) first."""
    if args.command not in COMMANDS:
        return args.func(args)
    config = load(COMMANDS[args.command][0], args.config, overrides_from(args))
    if args.command == "sft":
        run_sft(config)
    elif args.command == "train":
        history = run_train(config)
        if history:
            print(json.dumps({k: round(v, 4) for k, v in history[-1].items() if not k.startswith("time/")}))
    else:
        print(json.dumps(run_record(config), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; a user's mistake (bad config, file, path, data, endpoint) is one line on stderr and
    exit code 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except VisenvError as exc:
        print(f"rl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file named by the config or an option: the message names it
        print(f"rl {args.command}: error: {exc}; check the path in the config or options.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
