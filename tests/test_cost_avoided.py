"""gpu_seconds_avoided counts only the calls a virtual tier answered, not those the real tool served."""

import pytest

from baselines.workflow_agent import WorkflowAgent
from cache_fixtures import png_bytes
from rl.evaluate import play, results_of
from rl.policy import AgentPolicy
from rl.rollout import SerialRollout, make_specs
from rl.train import episode_metrics
from visenv.envs.visgen import VisGenEnv
from visenv.evaluation import summarize
from visenv.tasks import SCENARIOS
from visenv.tools.attribute import AttributeBackend
from visenv.tools.real import Generation, GeneratedMedia, RealBackend

T2I = "tool_text2image_seed"


def pictures(request):
    """A real (if simple) text-to-image tool."""
    n = request.arguments.get("n", 1)
    return Generation(media=tuple(GeneratedMedia(png_bytes(request.seed + i), ".png") for i in range(n)))


def split_cost(env):
    """GPU-seconds of the episode's calls that the real tool served, and that the virtual tier served."""
    calls = [c for c in env.record.calls if c.ok]
    return (sum(c.gpu_seconds for c in calls if c.backend == "real"),
            sum(c.gpu_seconds for c in calls if c.backend != "real"))


def test_real_calls_are_not_counted_as_avoided(tmp_path):
    envs = []

    task = SCENARIOS["storyboard"].make(0)  # a video shot list, then a picture per shot

    def make_env():  # text-to-image on the real callable; everything else on the attribute tier
        envs.append(VisGenEnv(tasks=[task], backends={
            T2I: [RealBackend(pictures, media_dir=tmp_path / "media", tools=[T2I])], "*": [AttributeBackend()]}))
        return envs[-1]

    episodes, _ = play(WorkflowAgent, [task], make_rollout=lambda policy, _, finish: SerialRollout(
        policy, make_env, 1, finish), progress=False)
    result, env = results_of(episodes)[0], envs[-1]
    real, virtual = split_cost(env)
    assert real > 0 and virtual > 0  # both tiers served calls that cost GPU time
    assert result.gpu_seconds_avoided == pytest.approx(virtual)
    assert summarize([result])["overall"]["gpu_seconds_avoided"] == pytest.approx(virtual)

    agent, (observation, _) = WorkflowAgent(), env.reset(seed=0, options={"task": task})
    agent.reset(observation, seed=0)
    done = False
    while not done:
        observation, _, terminated, truncated, info = env.step(agent.act(observation))
        call, cost = info.get("tool_result"), info["cost"]
        if call is not None:
            assert cost["gpu_seconds_avoided"] == (0.0 if call["backend"] == "real" else cost["gpu_seconds"])
        done = terminated or truncated
    assert cost["episode_gpu_seconds_avoided"] == pytest.approx(virtual)
    assert cost["episode_gpu_seconds"] == pytest.approx(real + virtual)

    rollout = SerialRollout(AgentPolicy(WorkflowAgent), make_env, 1)
    episodes, stats = rollout.sample(make_specs(0, 0, 1, 1))
    assert episodes[0].backends["real"] > 0 and split_cost(envs[-1]) == (real, virtual)
    assert episode_metrics(episodes, stats)["gpu_seconds_avoided"] == pytest.approx(virtual)
