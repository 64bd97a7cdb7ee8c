"""Step the VisGen environment by hand: write UTPC turns yourself and read what the tools return.

    python examples/step_by_hand.py --seed 3

One image task: a first turn with <think>, <plan> and a text-to-image call, more calls until every
image asked for is made (in batches of the tool's limit; with a consistency requirement, the first
image is the reference of the others), then an <answer> citing the ids the tool responses named.
Prints each observation and the reward components of the episode.
"""

from __future__ import annotations

import argparse

import gymnasium as gym

import visenv  # noqa: F401  (registers the visenv/... environment ids)
from visenv.protocol import format_turn, parse_tool_response


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the reset seed: it picks the task (default 0)")
    args = parser.parse_args()

    env = gym.make("visenv/VisGenImage-v0")
    observation, _ = env.reset(seed=args.seed)
    task = env.unwrapped.record.task  # what the request states, for this script's convenience
    print(observation["text"].split("\n\n")[0])
    req = task.requirements
    # With a consistency requirement, draw one anchor image first, then the rest with it as a reference.
    first = 1 if req.consistency else min(4, req.amount)
    batches = [first] + [min(4, req.amount - done) for done in range(first, req.amount, 4)]
    plan = "\n".join(f"{i}. tool_text2image_qwen: draw {n} image(s)"
                     + (" (reference 1)" if req.consistency and i > 1 else "") for i, n in enumerate(batches, 1))
    made: list[str] = []
    for step, n in enumerate(batches):
        arguments = {"prompt": ", ".join(req.keywords), "n": n, "aspect_ratio": req.aspect_ratio}
        if req.style:
            arguments["style"] = req.style
        if req.consistency and made:
            arguments["reference_images"] = made[:1]
        turn = format_turn(think=f"{req.amount} image(s) are asked for; batch {step + 1} of {len(batches)}.",
                           plan=plan if step == 0 else None,
                           tool_call={"name": "tool_text2image_qwen", "arguments": arguments})
        observation, reward, terminated, truncated, info = env.step(turn)
        response = parse_tool_response(observation["text"])
        produced = [artifact["id"] for artifact in response.get("artifacts", [])]
        made += produced
        print(f"--- turn {step + 1}: {response['status']}, made {produced}")
    observation, reward, terminated, truncated, info = env.step(
        format_turn(think="Every image is made.", answer="Delivered: " + " ".join(made)))
    print(f"--- answer: terminated={terminated} reward={reward:.3f}")
    print("components:", {k: None if v is None else round(v, 3) for k, v in info["reward_components"].items()})
    print("checks:", info["checks"])
    return 0 if terminated else 1


if __name__ == "__main__":
    raise SystemExit(main())
