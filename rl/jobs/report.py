"""The main job's own sections of its report page: the held-out comparison and GRPO's training curves.

They go above the policy comparison of :func:`rl.evaluate.write_comparison_report` (the VisGenBench
tables and trajectories of the first ``report_episodes`` held-out episodes): first the measurement
(every held-out episode, the same numbers as the printed table and ``results.json``, with the paired
standard error of the margin), then the curves a researcher reads to see whether and how GRPO learned
(reward and its components, KL, entropy, length, the groups' reward spread per iteration), with the
stretch :class:`rl.train.KeepBest` selected shaded.
"""

from __future__ import annotations

from html import escape
from typing import Any, Sequence

from visenv.report.svg import line_chart

#: The charts of the training curves: title -> the metrics it draws (those a run logged).
CURVES = {
    "KL to the SFT-only policy": ["kl"],
    "entropy of the sampled tokens": ["entropy"],
    "policy tokens per episode": ["policy_tokens"],
    "turns per episode": ["turns"],
    "reward spread inside groups": ["group_reward_std", "groups_zero_variance"],
    "advantages": ["advantage_abs", "advantage_token_std"],
}


def headline(results: dict[str, Any], shown: int) -> str:
    """The page's first line: the held-out measurement (all its episodes), and what the tables below show."""
    evaluation, sampled = results["eval"], results["evaluations"]
    sft, rl = sampled["sft"]["sampled"], sampled["rl"]["sampled"]
    m = results["margin"]["sampled"]
    paired = f" ± {m['reward_paired_stderr']:.3f} (paired s.e.)" if "reward_paired_stderr" in m else ""
    return (f"Held-out, {evaluation['episodes']} episodes on {evaluation['tasks']} tasks (sampled): SFT-only reward "
            f"{sft['reward']:.3f} ± {sft['reward_stderr']:.3f}, RL {rl['reward']:.3f} ± {rl['reward_stderr']:.3f}; "
            f"RL - SFT {m['reward']:+.3f}{paired}, success {m['success_rate']:+.1%} points. The tables and "
            f"trajectories below show the first {shown} of these episodes.")


def heldout_table(results: dict[str, Any]) -> str:
    """The printed comparison table as HTML: every mode, both policies, the margins with their paired s.e."""
    evaluations = results["evaluations"]
    rows = []
    for mode in (m for m in ("sampled", "greedy") if m in evaluations["sft"]):
        for name, label in (("sft", "SFT-only"), ("rl", "RL (SFT + GRPO)")):
            s = evaluations[name][mode]
            rows.append(f'<tr data-policy="{name}" data-mode="{mode}"><th>{label}</th><td>{mode}</td>'
                        f'<td>{s["episodes"]}</td><td data-reward="{s["reward"]:.6f}">{s["reward"]:.3f} ± '
                        f'{s["reward_stderr"]:.3f}</td><td>{s["success_rate"]:.1%}</td><td>{s["answered_rate"]:.1%}</td>'
                        f'<td>{s["turns"]:.2f}</td></tr>')
        m = results["margin"][mode]
        paired = f' ± {m["reward_paired_stderr"]:.3f}' if "reward_paired_stderr" in m else ""
        rows.append(f'<tr class="overall" data-margin="{mode}"><th>RL - SFT</th><td>{mode}</td><td></td>'
                    f'<td>{m["reward"]:+.3f}{paired}</td><td>{m["success_rate"]:+.1%}</td><td></td><td></td></tr>')
    return ('<h2 id="heldout">Held-out comparison</h2><table id="heldout-table"><thead><tr><th>policy</th><th>mode</th>'
            '<th>episodes</th><th>reward ± s.e.</th><th>success</th><th>answered</th><th>turns</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table><p class="note">Every held-out episode, both policies on the '
            'same episodes (task and seed); the margin\'s ± is the paired standard error (of the per-episode '
            'differences).</p>')


def training_curves(history: Sequence[dict[str, float]], selected: int | None, window: int) -> str:
    """GRPO's curves per iteration as inline SVG; the KeepBest stretch (``selected - window + 1 .. selected``) shaded."""
    if not history:
        return '<h2 id="training">Training curves</h2><p class="note">GRPO did not run.</p>'
    band = None if selected is None else (max(0, selected - window + 1), selected)

    def column(name: str) -> list[float | None]:
        return [row.get(name) for row in history]

    components = sorted({k for row in history for k in row if k.startswith("reward/")})
    charts = [line_chart("training reward and its components", {"reward": column("reward"),
                                                                 **{k[len("reward/"):]: column(k) for k in components}},
                         band, "KeepBest selection")]
    for title, names in CURVES.items():
        drawn = {name: column(name) for name in names if any(row.get(name) is not None for row in history)}
        if drawn:
            charts.append(line_chart(title, drawn, band, "KeepBest selection"))
    chosen = ("" if band is None else f" The shaded stretch (iterations {band[0]}-{band[1]}) sampled the best "
              f"{window}-iteration training reward; its weights are the RL policy.")
    return (f'<h2 id="training">Training curves</h2><div class="charts">{"".join(charts)}</div>'
            f'<p class="note">GRPO, {len(history)} iterations, on the RL suite\'s tasks.{escape(chosen)}</p>')


def preface(results: dict[str, Any], history: Sequence[dict[str, float]], window: int) -> str:
    """The held-out table and the training curves, the HTML the report page shows above the policy comparison."""
    return heldout_table(results) + training_curves(history, results["grpo"].get("selected_iteration"), window)
