"""`mstar study`: the paper's design-space comparison (section 3.2 table 1, section 4.2) on one base and warm-up.

The stages up to the warm-up model run once in the study workdir (exactly as `mstar train` runs them); then every
variant -- a method, an iteration interval and a fixed or adaptive temperature -- runs its self-evolving
iterations in `variants/<name>/` with its own checkpoints, rollouts and metrics, so an interrupted study resumes
variant by variant. All variants see the same number of passes over the queries (`train.passes`), hence the
same rollout and training budget. The outputs are `study.md` (one table in the paper's form, the ordering of
the methods next to the paper's, and the noise level of the test sets) and `plots/study.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from mstar_jax.errors import ConfigError
from mstar_jax.loop.self_evolve import METHODS, iterations_per_pass
from mstar_jax.reporting import markdown_table, write_atomic
from mstar_jax.workdir import publish

# Paper table 1 (MiniCPM-V-2.5; MathV360K in-domain, MathVista out-of-domain), for the ordering comparison.
PAPER_TABLE1 = {
    "iterative_rft@100%": (42.3, 55.7), "rest_em@100%": (42.3, 55.1), "continuous@100%": (42.2, 56.7),
    "continuous@50%": (43.1, 56.2), "continuous@25%": (43.1, 57.2), "continuous@12.5%": (42.3, 56.1),
    "continuous@6.25%": (41.0, 56.8),
}
_VARIANT = re.compile(r"^(?P<method>[a-z_]+)@(?P<pct>[0-9.]+)%(?P<adaptive>\+adaptive)?$")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One cell of the design space."""

    method: str
    interval: float  # fraction of the query set per iteration
    adaptive: bool

    @property
    def key(self) -> str:
        """`method@pct%`, the paper's row name (without the temperature choice)."""
        return f"{self.method}@{100 * self.interval:g}%"

    @property
    def name(self) -> str:
        """Directory-safe name, e.g. continuous_25pct_adaptive."""
        return f"{self.method}_{100 * self.interval:g}pct_{'adaptive' if self.adaptive else 'fixed'}"

    def config(self, cfg):
        """`cfg` with this variant's method, interval and temperature mode."""
        out = cfg.copy_and_resolve_references()
        with out.unlocked():
            out.train.method, out.train.interval, out.adaptive.enabled = self.method, self.interval, self.adaptive
        out.lock()
        return out


def parse_variants(spec: str) -> list[Variant]:
    """'rest_em@100%, continuous@25%+adaptive, ...' -> variants (errors name the bad entry)."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        m = _VARIANT.match(part)
        if not m:
            raise ConfigError(f"study.variants: {part!r} is not METHOD@PERCENT%[+adaptive] "
                              "(e.g. continuous@25%+adaptive)")
        if m["method"] not in METHODS:
            raise ConfigError(f"study.variants: {part!r}: method must be one of {', '.join(METHODS)}")
        interval = float(m["pct"]) / 100
        iterations_per_pass(interval)  # validates the range
        out.append(Variant(m["method"], interval, bool(m["adaptive"])))
    if not out:
        raise ConfigError("study.variants is empty")
    if len({v.name for v in out}) != len(out):
        raise ConfigError(f"study.variants lists a variant twice: {spec}")
    return out


def run_study(cfg, workdir: str | Path) -> dict:
    """Run (or resume) every variant from one base and warm-up model; returns {variant name: final results}."""
    from mstar_jax.loop.report import write_report
    from mstar_jax.loop.run import Console, check_workdir_config, open_workdir, prepare, run_self_evolving
    from mstar_jax.reporting import plot_dynamics

    if "study" not in cfg:
        raise ConfigError("this config has no `study` section; use configs/study_demo.py or configs/study_paper.py "
                          "(or add study.variants to yours)")
    variants = parse_variants(cfg.study.variants)
    say = Console()
    wd = open_workdir(workdir, say)
    workdir = wd.local
    # Variants may be added to a study later: the shared stages only depend on the config outside `study`.
    prep = prepare(cfg, wd, say, ignore=("study",))
    finals, records = {}, {}
    for k, v in enumerate(variants):
        vwd = wd.sub(f"variants/{v.name}")  # its own checkpoints, rollouts, metrics (on the remote too)
        vcfg, vdir = v.config(cfg), vwd.local
        say(f"study variant {k + 1}/{len(variants)}: {v.name}")
        check_workdir_config(vcfg, vwd, ignore=("study",))
        finals[v.name], _ = run_self_evolving(vcfg, vwd, prep, say)
        records[v.name] = _read_records(vdir / "metrics.jsonl")
        plots = plot_dynamics(records[v.name], vdir / "plots")
        write_report(vdir / "report.md", {"base": prep.results["base"], "+warm-up": prep.results["warmup"],
                                          v.name: finals[v.name]}, records[v.name], plots)
    rows = {"base": prep.results["base"], "+warm-up": prep.results["warmup"], **finals}
    plot = plot_study(variants, rows, records, workdir / "plots" / "study.png")
    write_atomic(workdir / "study.json", json.dumps(
        {"variants": [dataclasses.asdict(v) | {"name": v.name} for v in variants],
         "accuracy": {n: {s: r[s]["accuracy"] for s in ("test_id", "test_ood") if s in r} for n, r in rows.items()}},
        indent=1))
    write_atomic(workdir / "study.md", study_markdown(cfg, variants, rows, plot, len(prep.splits["train"])))
    say(f"study: {wd.show('study.md')}; plot: {wd.show('plots/study.png')}")
    return finals


def _read_records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def study_table(variants: list[Variant], rows: dict[str, dict], num_queries: int, passes: float) -> str:
    """Markdown: model | method | interval (#queries) | temperature | in-domain | out-of-domain | per-task OOD."""
    tasks = sorted({t for r in rows.values() for t in r.get("test_ood", {}).get("per_task", {})})
    header = ["model", "method", "interval (#queries)", "iterations", "temperature", "in-domain",
              "out-of-domain"] + [f"OOD {t}" for t in tasks]
    by_name = {v.name: v for v in variants}
    body = []
    for name, r in rows.items():
        v = by_name.get(name)
        line = [name] + (["-"] * 4 if v is None else [
            v.method, f"{100 * v.interval:g}% ({round(v.interval * num_queries)})",
            math.ceil(iterations_per_pass(v.interval) * passes), "adaptive" if v.adaptive else "fixed"])
        line += [r.get(s, {}).get("accuracy", float("nan")) for s in ("test_id", "test_ood")]
        line += [r.get("test_ood", {}).get("per_task", {}).get(t, float("nan")) for t in tasks]
        body.append(line)
    return markdown_table(header, body)


def standard_error(accuracy_pct: float, n: int) -> float:
    """Binomial standard error of an accuracy in percentage points."""
    p = accuracy_pct / 100
    return 100 * math.sqrt(max(p * (1 - p), 1e-12) / max(1, n))


def ordering_notes(variants: list[Variant], rows: dict[str, dict]) -> list[str]:
    """Compare the ranking of the fixed-temperature variants with the paper's table 1, with the noise level."""
    ours = {v.key: rows[v.name] for v in variants if not v.adaptive and v.key in PAPER_TABLE1}
    lines = []
    for col, split, label in ((0, "test_id", "in-domain"), (1, "test_ood", "out-of-domain")):
        have = {k: r[split]["accuracy"] for k, r in ours.items() if split in r}
        if len(have) < 2:
            continue
        n = next(r[split]["n"] for r in ours.values() if split in r)
        paper_rank = sorted(have, key=lambda k: -PAPER_TABLE1[k][col])
        our_rank = sorted(have, key=lambda k: -have[k])
        mean = sum(have.values()) / len(have)
        se = standard_error(mean, n)
        spread = max(have.values()) - min(have.values())
        agree = "the same as" if our_rank == paper_rank else "different from"
        lines.append(
            f"- {label}: ours {' > '.join(f'{k} {have[k]:.1f}' for k in our_rank)}; paper "
            f"{' > '.join(f'{k} {PAPER_TABLE1[k][col]:.1f}' for k in paper_rank)}. The order is {agree} the "
            f"paper's. Our variants span {spread:.1f} points on {n} questions, where one standard error is "
            f"{se:.1f} points (a difference under ~{2 * math.sqrt(2) * se:.1f} points between two variants is "
            "not significant at 95 %).")
    return lines


def study_markdown(cfg, variants: list[Variant], rows: dict[str, dict], plot: Path, num_queries: int) -> str:
    """study.md: the comparison table, the ordering against the paper, the adaptive-temperature effect."""
    from mstar_jax.loop.run import _acc_line

    lines = ["# M-STaR design-space study", "",
             f"One base and one warm-up model; every variant runs {cfg.train.passes:g} pass(es) over the queries "
             f"with K={cfg.train.num_samples} samples at T={cfg.train.temperature:g} (fixed) or the adaptive "
             f"choice every {cfg.adaptive.every} iterations, lr {cfg.train.lr:g}, global batch "
             f"{cfg.train.global_batch}. Greedy test accuracy (%) with the chain-of-thought prompt.", "",
             study_table(variants, rows, num_queries, cfg.train.passes), "",
             "## Ordering of the methods (paper table 1)", ""]
    notes = ordering_notes(variants, rows)
    lines += notes or ["- fewer than two of the paper's table-1 rows were run; no ordering to compare."]
    pairs = [(v, w) for v in variants for w in variants
             if v.adaptive and not w.adaptive and (v.method, v.interval) == (w.method, w.interval)]
    if pairs:
        lines += ["", "## Adaptive vs fixed temperature (paper 4.2)", ""]
        lines += [f"- {w.key}: fixed {_acc_line(rows[w.name])}; adaptive {_acc_line(rows[v.name])}"
                  for v, w in pairs]
    lines += ["", f"![study](plots/{plot.name})", "",
              "Per-variant dynamics plots and reports: `variants/<name>/report.md`.", ""]
    return "\n".join(lines)


def plot_study(variants: list[Variant], rows: dict[str, dict], records: dict[str, list[dict]], path: Path) -> Path:
    """Left: final accuracy per variant (base and warm-up as lines); right: validation greedy over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    names = [v.name for v in variants]
    x = np.arange(len(names))
    for j, (split, label) in enumerate((("test_id", "in-domain"), ("test_ood", "out-of-domain"))):
        vals = [rows[n].get(split, {}).get("accuracy", np.nan) for n in names]
        ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=label, color=f"C{j}")
        for stage, style in (("base", ":"), ("+warm-up", "--")):
            if split in rows[stage]:
                ax.axhline(rows[stage][split]["accuracy"], color=f"C{j}", ls=style, lw=1,
                           label=f"{stage} {label}")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("greedy test accuracy (%)")
    ax.set_title("final models")
    ax.legend(fontsize=6)
    for k, v in enumerate(variants):
        pts = sorted({(r["iteration"] * v.interval, 100 * r["greedy"]) for r in records.get(v.name, [])
                      if r.get("stage") == "dynamics"})
        if pts:
            bx.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=v.name, color=f"C{k}")
    bx.set_xlabel("passes over the queries")
    bx.set_ylabel("validation greedy accuracy (%)")
    bx.set_title("training dynamics")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    publish(path)
    return path
