"""report.md in the paper's form: one row per stage/method, in-domain and out-of-domain accuracy, per-task columns."""

from __future__ import annotations

from pathlib import Path

from mstar_jax.reporting import markdown_table, write_atomic


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


def write_report(path: Path, rows: dict[str, dict], records: list[dict], plots: list[Path]) -> None:
    """Write report.md: results table, the temperature choices, and links to the dynamics plots."""
    scorer = next((r.get("scorer") for r in records if r.get("stage") == "dynamics"), "mean_logprob")
    lines = ["# M-STaR run report", "", "Greedy accuracy (%) with the chain-of-thought prompt.", "",
             results_table(rows), ""]
    temps = [r for r in records if r.get("stage") == "temperature"]
    if temps:
        lines += ["## Adaptive temperature", ""] + [f"- {r['reason']}" for r in temps] + [""]
    iters = [r for r in records if r.get("stage") == "iteration"]
    if iters:
        lines += ["## Iterations", "", markdown_table(
            ["iteration", "T", "queries", "solved", "examples", "loss"],
            [[r["iteration"], r["temperature"], r["queries"], r["queries_with_correct"], r["examples"],
              r.get("loss", float("nan"))] for r in iters]), ""]
    if plots:
        lines += [f"## Training dynamics (Reward-Pass@2 ranked by `{scorer}`, no PRM yet)", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    write_atomic(path, "\n".join(lines))
