"""The seed table of docs/demo_results.md from `mstar study` workdirs run with different `--config.seed`.

    python docs/tools/seed_table.py runs/mstar_s0 runs/mstar_s1 runs/mstar_s2

Per model row of the studies' `study.json`: each seed's in-domain / out-of-domain greedy accuracy, their mean and
spread (max - min); then each seed's PRM training figures (`results/prm.json`), its verifier curve on the
validation split (`results/prm_verifier_val.json`) and, over the M-STaR variant's training dynamics (every
iteration x temperature of the grid), validation Reward-Pass@2 ranked by the PRM and by mean log-probability.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pair(a: dict) -> str:
    return f"{a['test_id']:.1f} / {a['test_ood']:.1f}"


def accuracy_table(studies: list[dict]) -> str:
    """Markdown: model | seed k ID / OOD ... | mean | spread."""
    seeds = range(len(studies))
    lines = ["| model | " + " | ".join(f"seed {s} ID / OOD" for s in seeds) + " | mean ID / OOD | spread ID / OOD |",
             "|---" * (len(studies) + 3) + "|"]
    for name in studies[0]["accuracy"]:
        accs = [s["accuracy"][name] for s in studies]
        mean = {k: sum(a[k] for a in accs) / len(accs) for k in ("test_id", "test_ood")}
        spread = {k: max(a[k] for a in accs) - min(a[k] for a in accs) for k in ("test_id", "test_ood")}
        lines.append(f"| {name} | " + " | ".join(_pair(a) for a in accs) + f" | {_pair(mean)} | {_pair(spread)} |")
    return "\n".join(lines)


def prm_table(dirs: list[Path]) -> str:
    """Markdown: seed | held-out step MSE (constant) | correlation | greedy | best-of-16 | weighted | majority | pass@16."""
    lines = ["| seed | PRM held-out step MSE (constant predictor) | correlation | greedy | best-of-16 | "
             "weighted vote@16 | majority vote@16 | pass@16 |", "|---" * 8 + "|"]
    for s, d in enumerate(dirs):
        t = json.loads((d / "results" / "prm.json").read_text())["train"]
        v = json.loads((d / "results" / "prm_verifier_val.json").read_text())
        c = v["curves"]["16"]
        lines.append(f"| {s} | {t['heldout_mse']:.3f} ({t['heldout_mse_constant']:.3f}) | {t['heldout_corr']:.2f} | "
                     f"{v['greedy']:.1f} | {c['best_of_n']:.1f} | {c['weighted_vote']:.1f} | "
                     f"{c['majority_vote']:.1f} | {c['pass@n']:.1f} |")
    return "\n".join(lines)


def reward_pass_table(dirs: list[Path], variant: str = "continuous_25pct_adaptive_prm_top2") -> str:
    """Markdown: seed | dynamics points | Reward-Pass@2 by PRM | by mean log-prob | PRM higher / lower / equal."""
    lines = ["| seed | iteration x temperature points | Reward-Pass@2, PRM | Reward-Pass@2, mean log-prob | "
             "PRM higher / lower / equal |", "|---" * 5 + "|"]
    for s, d in enumerate(dirs):
        recs = [json.loads(x) for x in (d / "variants" / variant / "metrics.jsonl").read_text().splitlines()]
        dyn = [r for r in recs if r.get("stage") == "dynamics" and "reward_pass@2/prm" in r]
        prm = [r["reward_pass@2/prm"] for r in dyn]
        lp = [r["reward_pass@2/mean_logprob"] for r in dyn]
        pairs = list(zip(prm, lp))
        wins = sum(a > b for a, b in pairs), sum(a < b for a, b in pairs), sum(a == b for a, b in pairs)
        lines.append(f"| {s} | {len(dyn)} | {100 * sum(prm) / len(prm):.1f} | {100 * sum(lp) / len(lp):.1f} | "
                     f"{wins[0]} / {wins[1]} / {wins[2]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    dirs = [Path(a) for a in sys.argv[1:]]
    print(accuracy_table([json.loads((d / "study.json").read_text()) for d in dirs]))
    print()
    print(prm_table(dirs))
    print()
    print(reward_pass_table(dirs))
