"""The in-process engine (rl.engine.hf.HFEngine) against today's CausalLMPolicy.generate, same prompts.

A random tiny Llama (hidden 128 x 2 layers, the BPE of the rl tests) samples, with the same seeds on
both sides:

* ``single-turn``: ``prompts x samples`` ToolEcho prompts (8 x 8), ``--tokens`` (64) tokens each,
  all at once: one batched ``policy.generate`` against the engine with every request submitted
  concurrently (continuous batching).
* ``multi-turn``: ``--conversations`` (16) conversations of ``--turns`` (4) turns; after each turn
  an observation of ``--obs-tokens`` (32) tokens is appended. ``policy.generate`` re-encodes each
  whole conversation every turn; the engine keeps each conversation's KV cache (``session``) and
  prefills only the new tokens.

* ``arrivals``: ``--arrivals`` (32) single-turn requests arriving one every ``--gap-ms`` (10 ms),
  as episodes whose tools answer at different moments. ``policy.generate`` runs whatever has
  arrived as one batch, then the next (static batching); the engine admits each arrival at its next
  decoding step. Also the mean latency from arrival to result.

Seconds (best of ``--repeats``) and whether both sides sampled the same tokens. Prints a table and
writes JSON.

    python benchmarks/engine_throughput.py [--repeats 3] [--threads 2] [--out benchmarks/results/engine_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from rl.engine.hf import HFEngine, HFEngineConfig, turn_request, turn_segment  # noqa: E402
from rl.hf import CausalLMPolicy, tiny_causal_lm  # noqa: E402
from rl.policy import ENV, Conversation, Segment  # noqa: E402
from rl_helpers import ECHO, echo_tokenizer  # noqa: E402


def single_turn(policy, engine, prompts: int, samples: int):
    env = ECHO.make()
    conversations = [Conversation(seed=p * 100 + s, segments=[policy.encode(env.reset(seed=p)[0], True)])
                     for p in range(prompts) for s in range(samples)]
    requests = [turn_request(policy, c) for c in conversations]

    def baseline():
        return [turn.token_ids for turn in policy.generate(conversations)]

    def engine_run():
        return [r.token_ids for r in engine.generate_many(requests)]

    return baseline, engine_run


def multi_turn(policy, engine, conversations: int, turns: int, obs_tokens: int):
    env = ECHO.make()
    first = [policy.encode(env.reset(seed=c)[0], True) for c in range(conversations)]
    observations = [[random.Random(c * 31 + t).choices(range(10, len(policy.tokenizer)), k=obs_tokens)
                     for t in range(turns)] for c in range(conversations)]

    def baseline():
        convs = [Conversation(seed=c, segments=[first[c]]) for c in range(conversations)]
        for t in range(turns):
            for conv, turn in zip(convs, policy.generate(convs)):
                conv.segments.append(turn)
            for c, conv in enumerate(convs):
                conv.segments.append(Segment(ENV, "", observations[c][t]))
        return [conv.token_ids for conv in convs]

    def engine_run():
        convs = [Conversation(seed=c, segments=[first[c]]) for c in range(conversations)]
        for t in range(turns):
            requests = [turn_request(policy, conv, session=f"conv-{c}") for c, conv in enumerate(convs)]
            for conv, result in zip(convs, engine.generate_many(requests)):
                conv.segments.append(turn_segment(policy, result))
            for c, conv in enumerate(convs):
                conv.segments.append(Segment(ENV, "", observations[c][t]))
        for c in range(conversations):
            engine.end_session(f"conv-{c}")
        return [conv.token_ids for conv in convs]

    return baseline, engine_run


def arrivals(policy, engine, count: int, gap_s: float):
    env = ECHO.make()
    conversations = [Conversation(seed=i, segments=[policy.encode(env.reset(seed=i)[0], True)]) for i in range(count)]
    latencies: dict[str, float] = {}

    def baseline():
        start, out, done, waits = time.perf_counter(), [None] * count, 0, []
        while done < count:
            arrived = min(count, int((time.perf_counter() - start) / gap_s) + 1)
            if arrived == done:
                time.sleep(start + done * gap_s - time.perf_counter())
                continue
            for i, turn in zip(range(done, arrived), policy.generate(conversations[done:arrived])):
                out[i] = turn.token_ids
                waits.append(time.perf_counter() - (start + i * gap_s))
            done = arrived
        latencies["policy_generate"] = sum(waits) / count
        return out

    def engine_run():
        start, futures, waits = time.perf_counter(), [], []
        for i, conv in enumerate(conversations):
            time.sleep(max(0.0, start + i * gap_s - time.perf_counter()))
            future = engine.submit(turn_request(policy, conv))
            future.add_done_callback(lambda _, arrival=start + i * gap_s: waits.append(time.perf_counter() - arrival))
            futures.append(future)
        out = [f.result().token_ids for f in futures]
        latencies["engine"] = sum(waits) / count
        return out

    return baseline, engine_run, latencies


def timed(run, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per turn")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--obs-tokens", type=int, default=32)
    parser.add_argument("--arrivals", type=int, default=32)
    parser.add_argument("--gap-ms", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "engine_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = echo_tokenizer()
    policy = CausalLMPolicy(tiny_causal_lm(len(tokenizer)), tokenizer, max_new_tokens=args.tokens)
    rows = []
    with HFEngine.from_policy(policy, HFEngineConfig(max_batch_size=64)) as engine:
        workloads = {
            f"single-turn {args.prompts}x{args.samples}x{args.tokens}": single_turn(policy, engine, args.prompts,
                                                                                   args.samples),
            f"multi-turn {args.conversations}x{args.turns} turns (+{args.obs_tokens}-token obs)": multi_turn(
                policy, engine, args.conversations, args.turns, args.obs_tokens),
        }
        *arrival_runs, latencies = arrivals(policy, engine, args.arrivals, args.gap_ms / 1000)
        workloads[f"arrivals {args.arrivals} x {args.tokens} tokens, every {args.gap_ms:g} ms"] = arrival_runs
        for name, (baseline, engine_run) in workloads.items():
            timed(engine_run, 1)  # warm-up
            base_s, base_out = timed(baseline, args.repeats)
            engine_s, engine_out = timed(engine_run, args.repeats)
            base_tokens = sum(len(s) for s in base_out)
            rows.append({"workload": name, "policy_generate_s": round(base_s, 4), "engine_s": round(engine_s, 4),
                         "sequence_tokens": base_tokens, "speedup": round(base_s / engine_s, 3),
                         "same_tokens": base_out == engine_out})
        rows[-1].update({f"mean_latency_{side}_s": round(value, 4) for side, value in latencies.items()})
    print(f"{'workload':48s} {'generate s':>11s} {'engine s':>9s} {'speedup':>8s} {'same tokens':>12s}")
    for row in rows:
        print(f"{row['workload']:48s} {row['policy_generate_s']:11.3f} {row['engine_s']:9.3f} {row['speedup']:8.2f} "
              f"{str(row['same_tokens']):>12s}")
    print(f"arrivals, mean latency from arrival to result: policy.generate {latencies['policy_generate']:.3f} s, "
          f"engine {latencies['engine']:.3f} s")
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "machine": platform.platform(),
              "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
