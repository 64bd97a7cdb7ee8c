"""Rollouts at simulated real latencies: the synchronous episode loop against the asynchronous one.

The VisGen environment with ``tool_latency_scale`` (default 0.01: every virtual tool call waits
1/100 of its cost-model latency, e.g. 0.08-0.25 s for an image, 0.3-0.6 s for a short video) and an
episode-end judge with a fixed latency (:class:`~visenv.rewards.rubric.DelayedRubric`), played by
a tiny policy in both modes of :func:`rl.rollout.run_episodes`, on the same specs, in one run.

The policy: each turn a tiny random Llama (hidden 128 x 2 layers, a BPE trained on the env's
observations) samples ``--max-new-tokens`` tokens (the generation cost, timed as the generator's
busy time), and the turn's text is the random agent's (:class:`baselines.random_agent.RandomAgent`),
so that episodes call real tool specs (a random LM would never write a valid call): a
:class:`~rl.hf.CausalLMPolicy` whose ``generate`` and ``engine_turn`` give the agent's text with
the sampled tokens. So each mode samples the way it samples any text policy: the sync loop with one
batched ``policy.generate`` per step over the whole conversations, the async loop through the
in-process :class:`~rl.engine.hf.HFEngine` (continuous batching, KV caches kept between turns), and
the finished episodes' judges on the async loop's judge pool (``--max-concurrent-judges``). The two
modes must return the same episodes (texts, rewards, components); the script checks it, and that the
sampled tokens differ in at most 1% of the policy turns (float rounding, see :func:`other_tokens`). Each mode also reports its drain (the
time after the generator's last turn: the batch's final tool calls and judges, with nothing left to
generate) and the generator's idle share before it. ``--max-concurrent-judges 0`` plays the
async loop with each judge inside its env's last step instead. Then ``--stream-batches`` consecutive
batches (iterations) in async mode, first one call per batch (each batch ends in its drain), then
through an :class:`~rl.rollout.EpisodeStream` fed one batch ahead as a training loop with ``overlap``
feeds it, with the same weights throughout and with weights handed over each batch (a weight switch, as
in training): the generator's idle share over all batches each way (``generator_idle_fraction_per_batch``,
``..._stream_same_weights``, ``..._stream_new_weights`` in the JSON). Then the judge pool's own share, where
judges dominate: the random agent itself (no LM) on 8 episodes and 2 environments in async mode, each
judge inside its env against the pool (``judge_pool_share`` in the JSON).

    python benchmarks/async_rollout.py [--quick] [--episodes 64] [--envs 32] [--stream-batches 3] [--out benchmarks/results/async_rollout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from typing import Any, Sequence

import torch

from baselines.random_agent import RandomAgent
from rl.hf import CausalLMPolicy, tiny_causal_lm
from rl.policy import POLICY, AgentPolicy, Conversation, Segment
from rl.rollout import MAX_CONCURRENT_JUDGES, EpisodeStream, make_specs, run_episodes
from rl.tokenizer import train_tokenizer
from visenv.envs.visgen import VisGenEnv
from visenv.rewards.rubric import DelayedRubric


class PacedAgentPolicy(CausalLMPolicy):
    """A tiny LM that samples every turn, whose turn text is then the agent's.

    Args:
        model, tokenizer, **options: as :class:`~rl.hf.CausalLMPolicy`.
        agent: the agent adapter whose text the turn carries.
    """

    def __init__(self, model, tokenizer, agent: AgentPolicy, **options: Any):
        super().__init__(model, tokenizer, **options)
        self.agent = agent

    def generate(self, conversations: Sequence[Conversation]) -> list[Segment]:
        return [self._acted(conv, turn) for conv, turn in zip(conversations, super().generate(conversations))]

    def engine_turn(self, conversation: Conversation, result: Any) -> Segment:
        return self._acted(conversation, super().engine_turn(conversation, result))

    def _acted(self, conversation: Conversation, sampled: Segment) -> Segment:
        text = self.agent.generate([conversation])[0].text
        return Segment(POLICY, text, sampled.token_ids, sampled.logprobs)


def play(policy, make_env, num_envs: int, specs, mode: str, judges: int) -> dict[str, Any]:
    envs = [make_env() for _ in range(num_envs)]
    start = time.perf_counter()
    episodes, stats = run_episodes(policy, envs, specs, mode=mode, max_concurrent_judges=judges)
    wall = time.perf_counter() - start
    for env in envs:
        env.close()
    return {"episodes": episodes, "wall_seconds": round(wall, 3),
            "episodes_per_second": round(len(episodes) / wall, 3),
            "env_steps": stats.env_steps, "generate_seconds": round(stats.generate_seconds, 3),
            "generator_idle_fraction": round(stats.generator_idle_fraction, 4),
            "drain_seconds": round(stats.drain_seconds, 3),
            "generator_idle_fraction_before_drain": round(stats.generator_idle_fraction_before_drain, 4),
            "max_in_flight": stats.max_in_flight,
            "tool_wait_seconds": {tier: round(s, 3) for tier, s in sorted(stats.tool_seconds.items())},
            "judge_wait_seconds": round(stats.judge_seconds, 3),
            "judge_queue_seconds": round(stats.judge_queue_seconds, 3),
            "max_judges_in_flight": stats.max_judges_in_flight}


def as_data(episodes) -> list:
    """What the environments saw of each episode: texts, rewards, reward components."""
    return [(e.spec.episode_id, [s.text for s in e.segments], [str(r) for r in e.rewards], e.components)
            for e in episodes]


def other_tokens(a, b) -> tuple[int, int]:
    """Policy turns whose sampled tokens differ between two plays of the same episodes, and all policy turns.

    Batched differently, a float32 forward rounds differently in the last bits, and a uniform that falls
    that close to a boundary of the sampler's CDF picks the neighbouring token: rare, and none at all with
    the model in float64 (checked once by hand, 2026-12-07). The script fails past MAX_OTHER_TOKENS."""
    pairs = [(x, y) for e, f in zip(a, b) for x, y in zip(e.segments, f.segments) if x.role == POLICY]
    return sum(x.token_ids != y.token_ids for x, y in pairs), len(pairs)


MAX_OTHER_TOKENS = 0.01
"""The share of policy turns whose tokens may differ between plays (float rounding, see :func:`other_tokens`)."""


def streamed(policy, make_env, num_envs: int, episodes: int, batches: int, judges: int) -> dict[str, Any]:
    """Consecutive batches (iterations 0, 1, ... of ``episodes`` specs each) in async mode, three ways: one
    :func:`run_episodes` call per batch back to back (each batch ends in its drain: a trainer with or
    without ``overlap`` but no stream starts the next batch only when the whole batch returned); and an
    :class:`~rl.rollout.EpisodeStream` fed as a streaming trainer feeds it (batches 0 and 1 at once, batch
    ``k + 2`` once batch ``k`` returned), first with the same weights throughout (each next batch generates
    at once), then with weights handed over with every batch (a weight switch each batch, as in training:
    the next batch waits until no episode of the one before needs a turn, then generates during its
    drain). The weights are the same values every time, so all three play the same episodes."""
    specs = [make_specs(0, it, episodes, 1) for it in range(batches)]

    def fresh_envs():
        return [make_env() for _ in range(num_envs)]

    envs = fresh_envs()
    start = time.perf_counter()
    apart = [run_episodes(policy, envs, batch, mode="async", max_concurrent_judges=judges) for batch in specs]
    wall = time.perf_counter() - start
    for env in envs:
        env.close()
    busy = sum(stats.generate_seconds for _, stats in apart)
    result = {"batches": batches, "episodes_per_batch": episodes, "envs": num_envs,
              "per_batch": summary(wall, busy, batches * episodes, apart)}
    same = True
    for name, weights in (("streamed_same_weights", None), ("streamed_new_weights", policy.get_weights())):
        envs = fresh_envs()
        stream = EpisodeStream(policy, envs, max_concurrent_judges=judges)
        try:
            start = time.perf_counter()
            futures = [stream.submit(batch, it, weights) for it, batch in enumerate(specs[:2])]
            together = []
            for it in range(batches):
                together.append(futures[it].result())
                if it + 2 < batches:
                    futures.append(stream.submit(specs[it + 2], it + 2, weights))
            wall = time.perf_counter() - start
            busy = stream.generator_busy_seconds()
        finally:
            stream.close()
            for env in envs:
                env.close()
        same = same and all(as_data(a) == as_data(b) for (a, _), (b, _) in zip(apart, together))
        result[name] = summary(wall, busy, batches * episodes, together)
        counts = [other_tokens(a, b) for (a, _), (b, _) in zip(apart, together)]
        result[name]["turns_with_other_tokens"] = [sum(c[0] for c in counts), sum(c[1] for c in counts)]
    return result | {"same_episodes": same}


def summary(wall: float, busy: float, episodes: int, runs: list) -> dict[str, Any]:
    return {"wall_seconds": round(wall, 3), "episodes_per_second": round(episodes / wall, 3),
            "generate_seconds": round(busy, 3), "generator_idle_fraction": round(1 - busy / wall, 4),
            "drain_seconds": [round(stats.drain_seconds, 3) for _, stats in runs]}


def judge_pool_share(make_env, episodes: int, envs: int) -> dict[str, Any]:
    """The judge pool alone: the random agent (no LM, so no generation cost) in async mode on few
    environments, each judge inside its env's last step (``max_concurrent_judges=0``) against the pool."""
    policy, specs = AgentPolicy(RandomAgent), make_specs(1, 0, episodes, 1)
    runs = {name: play(policy, make_env, envs, specs, "async", judges)
            for name, judges in (("judges_in_env", 0), ("judge_pool", MAX_CONCURRENT_JUDGES))}
    same = as_data(runs["judges_in_env"].pop("episodes")) == as_data(runs["judge_pool"].pop("episodes"))
    return {"episodes": episodes, "envs": envs, "same_episodes": same, **runs,
            "speedup": round(runs["judge_pool"]["episodes_per_second"]
                             / runs["judges_in_env"]["episodes_per_second"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 episodes, 16 envs, 4 turns by default (within two minutes)")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--envs", type=int, default=32, help="environments: episodes in flight at most")
    parser.add_argument("--max-turns", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--tool-latency-scale", type=float, default=0.01)
    parser.add_argument("--judge-seconds", type=float, default=0.5, help="the simulated judge's latency")
    parser.add_argument("--max-concurrent-judges", type=int, default=MAX_CONCURRENT_JUDGES,
                        help="the async loop's judge pool")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--stream-batches", type=int, default=3,
                        help="consecutive batches of --episodes played per batch and streamed (0: skip)")
    parser.add_argument("--out", default="benchmarks/results/async_rollout.json")
    if "--quick" in sys.argv:
        parser.set_defaults(episodes=32, envs=16, max_turns=4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.torch_threads)
    load_start = round(os.getloadavg()[0], 2)  # other processes compete for the CPUs: recorded with the result

    def make_env() -> VisGenEnv:
        return VisGenEnv(tool_latency_scale=args.tool_latency_scale, max_turns=args.max_turns,
                         rubric=DelayedRubric("ltr", args.judge_seconds))

    probe = VisGenEnv(max_turns=args.max_turns)
    tokenizer = train_tokenizer([probe.reset(seed=i)[0]["text"] for i in range(100)], 2000)
    policy = PacedAgentPolicy(tiny_causal_lm(len(tokenizer)), tokenizer, AgentPolicy(RandomAgent),
                              max_new_tokens=args.max_new_tokens)
    for mode in ("sync", "async"):  # warm-up: the media database, first forwards, the engine's thread
        run_episodes(policy, [probe], make_specs(1, 0, 2, 1), mode=mode)
    specs = make_specs(0, 0, args.episodes, 1)
    runs = {mode: play(policy, make_env, args.envs, specs, mode, args.max_concurrent_judges)
            for mode in ("sync", "async")}
    sync_episodes, async_episodes = runs["sync"].pop("episodes"), runs["async"].pop("episodes")
    same = as_data(sync_episodes) == as_data(async_episodes)
    flips = {"sync_vs_async": list(other_tokens(sync_episodes, async_episodes))}
    stream = (streamed(policy, make_env, args.envs, args.episodes, args.stream_batches, args.max_concurrent_judges)
              if args.stream_batches else None)
    pool = judge_pool_share(make_env, 8, 2)
    sync, fast = runs["sync"], runs["async"]
    if stream:
        flips |= {name: stream[name]["turns_with_other_tokens"] for name in ("streamed_same_weights",
                                                                               "streamed_new_weights")}
    result = {
        "sync_episodes_per_second": sync["episodes_per_second"],
        "async_episodes_per_second": fast["episodes_per_second"],
        "speedup": round(fast["episodes_per_second"] / sync["episodes_per_second"], 2),
        "generator_idle_fraction_sync": sync["generator_idle_fraction"],
        "generator_idle_fraction_async": fast["generator_idle_fraction"],
        "drain_seconds_async": fast["drain_seconds"],
        "generator_idle_fraction_async_before_drain": fast["generator_idle_fraction_before_drain"],
        "generator_idle_fraction_per_batch": stream["per_batch"]["generator_idle_fraction"] if stream else None,
        "generator_idle_fraction_stream_same_weights":
            stream["streamed_same_weights"]["generator_idle_fraction"] if stream else None,
        "generator_idle_fraction_stream_new_weights":
            stream["streamed_new_weights"]["generator_idle_fraction"] if stream else None,
        "same_episodes": same and pool["same_episodes"] and (stream is None or stream["same_episodes"]),
        "turns_with_other_tokens": flips,
        "async_generator": "HFEngine (continuous batching)" if policy.engine_served else "policy.generate batches",
        "judge_queue_seconds_async": fast["judge_queue_seconds"],
        "max_judges_in_flight_async": fast["max_judges_in_flight"],
        "modes": runs,
        "stream": stream,
        "judge_pool_share": pool,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)}},
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(f"{'mode':<6} {'episodes/s':>10} {'wall s':>8} {'generator idle':>15} {'in flight':>9} "
          f"{'tool wait s':>11} {'judge wait s':>12} {'judge queue s':>13} {'judges at once':>14}")
    for mode, run in runs.items():
        print(f"{mode:<6} {run['episodes_per_second']:>10.2f} {run['wall_seconds']:>8.2f} "
              f"{run['generator_idle_fraction']:>15.1%} {run['max_in_flight']:>9} "
              f"{sum(run['tool_wait_seconds'].values()):>11.2f} {run['judge_wait_seconds']:>12.2f} "
              f"{run['judge_queue_seconds']:>13.2f} {run['max_judges_in_flight']:>14}")
    print(f"speedup {result['speedup']}x; same episodes in both modes: {same}")
    print("policy turns with other sampled tokens (float rounding at a sampling boundary), of all: "
          + ", ".join(f"{name} {n}/{total}" for name, (n, total) in flips.items()))
    print(f"async: {fast['drain_seconds']:.2f} s of the {fast['wall_seconds']:.2f} s are the drain (after the last "
          f"sampled turn: final tool calls and judges); generator idle before it "
          f"{fast['generator_idle_fraction_before_drain']:.1%}")
    if stream:
        print(f"{stream['batches']} consecutive batches of {stream['episodes_per_batch']} episodes (async), "
              f"same episodes all three ways: {stream['same_episodes']}")
        for name, what in (("per_batch", "one call per batch"), ("streamed_same_weights", "streamed, same weights"),
                           ("streamed_new_weights", "streamed, new weights each batch")):
            run = stream[name]
            print(f"  {what:<34} {run['wall_seconds']:>6.2f} s  generator idle {run['generator_idle_fraction']:>6.1%}"
                  f"  drains {', '.join(f'{d:.2f}' for d in run['drain_seconds'])} s")
    print(f"judge pool alone (random agent, no LM, {pool['episodes']} episodes on {pool['envs']} envs, async): "
          f"{pool['judges_in_env']['wall_seconds']:.2f} s with each judge in its env, "
          f"{pool['judge_pool']['wall_seconds']:.2f} s on the pool ({pool['speedup']}x); same episodes: "
          f"{pool['same_episodes']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    if not result["same_episodes"]:
        raise SystemExit("The runs returned other episodes than each other: a bug in rl.rollout.")
    if any(n > MAX_OTHER_TOKENS * total for n, total in flips.values()):
        raise SystemExit(f"More than {MAX_OTHER_TOKENS:.0%} of the policy turns sampled other tokens in another run "
                         "of the same episodes: more than float rounding, a bug in rl.rollout or the engine.")


if __name__ == "__main__":
    main()
