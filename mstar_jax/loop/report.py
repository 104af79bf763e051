"""report.md in the paper's form: one row per stage/method, in-domain and out-of-domain accuracy, per-task columns."""

from __future__ import annotations

from pathlib import Path

from mstar_jax.io import write_atomic
from mstar_jax.reporting import markdown_table


def results_table(rows: dict[str, dict]) -> str:
    """Markdown table: model | test_id | test_ood | per-task (out-of-domain) accuracy in percent."""
    tasks = sorted({t for r in rows.values() for t in r.get("test_ood", {}).get("per_task", {})})
    header = ["model", "in-domain", "out-of-domain"] + [f"OOD {t}" for t in tasks]
    body = []
    for name, r in rows.items():
        line = [name, r.get("test_id", {}).get("accuracy", float("nan")),
                r.get("test_ood", {}).get("accuracy", float("nan"))]
        line += [r.get("test_ood", {}).get("per_task", {}).get(t, float("nan")) for t in tasks]
        body.append(line)
    return markdown_table(header, body)


def prm_section(prm: dict, records: list[dict]) -> list[str]:
    """The PRM part of report.md: labels, held-out fit, verifier curves, Reward-Pass@2 by PRM vs mean-logprob."""
    from mstar_jax.prm.labels import balance_line
    from mstar_jax.prm.verify import curves_table

    lines = ["## Process reward model", ""]
    lab, tr = prm.get("labels"), prm.get("train")
    if lab:
        lines += [f"- Labels: {lab['questions']} questions x samples -> {balance_line(lab['balance'])}; "
                  f"{lab['steps']} steps ({lab['steps_per_response']:.1f} per response), {lab['completions']} "
                  f"completions. Mean step label {lab['label_mean']:.3f}: {lab['label_mean_correct']:.3f} on correct "
                  f"responses, {lab['label_mean_wrong']:.3f} on wrong ones. Questions with every sample correct: "
                  f"{lab['questions_all_correct']}, every sample wrong: {lab['questions_all_wrong']}."]
    if tr:
        lines += [f"- Training: {tr['updates']} updates on {tr['train_records']} responses. Held-out "
                  f"({tr['heldout_records']} responses, {tr['heldout_steps']} steps): step-label MSE "
                  f"{tr['heldout_mse']:.4f} (predicting the mean label: {tr.get('heldout_mse_constant', float('nan')):.4f}),"
                  f" correlation {tr['heldout_corr']:.3f}."]
    for split, ver in prm.get("verifier", {}).items():
        curves = {int(n): c for n, c in ver["curves"].items()}
        lines += ["", f"### The PRM as a verifier ({split}, {ver['questions']} questions, warm-up policy, "
                  f"T={ver['temperature']:g})", "", curves_table(curves, ver["greedy"]),
                  f"![verifier {split}](plots/prm_verifier_{split}.png)"]
    dyn = [r for r in records if r.get("stage") == "dynamics" and "reward_pass@2/prm" in r]
    if dyn:
        import numpy as np

        by_it: dict[int, list[dict]] = {}
        for r in dyn:
            by_it.setdefault(int(r["iteration"]), []).append(r)
        body = [[it, 100 * float(np.mean([r["reward_pass@2/prm"] for r in rs])),
                 100 * float(np.mean([r["reward_pass@2/mean_logprob"] for r in rs])),
                 100 * float(np.mean([r["pass@k"] for r in rs])), 100 * float(np.mean([r["greedy"] for r in rs]))]
                for it, rs in sorted(by_it.items())]
        lines += ["", "### Reward-Pass@2 on the validation set: PRM vs mean log-probability", "",
                  "Mean over the temperature grid, per iteration (%).", "",
                  markdown_table(["iteration", "Reward-Pass@2 (PRM)", "Reward-Pass@2 (mean-logprob)", "Pass@K",
                                  "greedy"], body)]
    return lines + [""]


def write_report(path: Path, rows: dict[str, dict], records: list[dict], plots: list[Path],
                 prm: dict | None = None) -> None:
    """Write report.md: results table, the temperature choices, the PRM, and links to the dynamics plots."""
    scorer = next((r.get("scorer") for r in records if r.get("stage") == "dynamics"), "mean_logprob")
    lines = ["# M-STaR run report", "", "Greedy accuracy (%) with the chain-of-thought prompt.", "",
             results_table(rows), ""]
    temps = [r for r in records if r.get("stage") == "temperature"]
    if temps:
        lines += ["## Adaptive temperature", ""] + [f"- {r['reason']}" for r in temps] + [""]
    thresholds = [r for r in records if r.get("stage") == "threshold"]
    if thresholds:
        lines += ["## Selection threshold", ""] + [f"- {r['reason']}" for r in thresholds] + [""]
    iters = [r for r in records if r.get("stage") == "iteration"]
    if iters:
        unl = any("unlabeled_queries" in r for r in iters)
        header = ["iteration", "T", "queries", "solved", "examples", "loss"] + (
            ["unlabeled queries", "pseudo-label accuracy", "unlabeled examples"] if unl else [])
        body = []
        for r in iters:
            row = [r["iteration"], r["temperature"], r["queries"], r["queries_with_correct"], r["examples"],
                   r.get("loss", float("nan"))]
            if unl:
                acc = r.get("pseudo_label_accuracy", float("nan"))
                row += [r.get("unlabeled_queries", 0), 100 * acc if acc == acc else "-", r.get("examples_unlabeled", 0)]
            body.append(row)
        lines += ["## Iterations", "", markdown_table(header, body), ""]
    if prm:
        lines += prm_section(prm, records)
    if plots:
        lines += [f"## Training dynamics (Reward-Pass@2 ranked by `{scorer}`)", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    write_atomic(path, "\n".join(lines))
