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
from mstar_jax.io import write_atomic
from mstar_jax.reporting import markdown_table
from mstar_jax.workdir import publish

# Paper table 1 (MiniCPM-V-2.5; MathV360K in-domain, MathVista out-of-domain), for the ordering comparison.
PAPER_TABLE1 = {
    "iterative_rft@100%": (42.3, 55.7), "rest_em@100%": (42.3, 55.1), "continuous@100%": (42.2, 56.7),
    "continuous@50%": (43.1, 56.2), "continuous@25%": (43.1, 57.2), "continuous@12.5%": (42.3, 56.1),
    "continuous@6.25%": (41.0, 56.8),
}
# Paper table 2 (selection; continuous at a 25 % interval). Our copy of the paper keeps these rows' labels; its
# other PRM rows (Top-K / threshold values) lost theirs, so only these three enter the ordering comparison.
PAPER_TABLE2 = {"all": (43.1, 57.2), "random2": (41.0, 55.5), "prm_top2": (45.3, 59.2)}
# Paper table 3 (unlabeled prompts mixed in at a point of the run, with PRM top-2; oracle = true answers).
PAPER_TABLE3 = {"labeled only, all": (43.1, 57.2), "labeled only, prm_top2": (45.3, 59.2),
                "oracle@0%, all": (42.5, 58.2), "oracle@0%, prm_top2": (42.9, 59.1),
                "unlabeled@25%, prm_top2": (42.4, 57.6), "unlabeled@50%, prm_top2": (42.9, 58.2),
                "unlabeled@75%, prm_top2": (45.0, 58.8)}
_VARIANT = re.compile(r"^(?P<method>[a-z_]+)@(?P<pct>[0-9.]+)%(?P<options>(\+[a-z0-9_@.%]+)*)$")
# Selections of table 2: name -> (train.selection, train.scorer, k)
SELECTIONS = {"all": ("all", "prm", 2), "prm_top2": ("top_k", "prm", 2), "logprob_top2": ("top_k", "mean_logprob", 2),
              "prm_threshold": ("threshold", "prm", 2), "random2": ("random_k", "prm", 2)}
_UNLABELED = re.compile(r"^(?P<mode>unlabeled|oracle)@(?P<pct>[0-9.]+)%$")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One cell of the design space."""

    method: str
    interval: float  # fraction of the query set per iteration
    adaptive: bool
    selection: str = "all"  # a key of SELECTIONS (table 1 rows use all correct responses, as the paper)
    unlabeled: str = ""  # "" | "unlabeled@25%" (pseudo labels) | "oracle@0%" (table 3)

    @property
    def key(self) -> str:
        """`method@pct%`, the paper's row name (without the temperature choice)."""
        return f"{self.method}@{100 * self.interval:g}%"

    @property
    def name(self) -> str:
        """Directory-safe name, e.g. continuous_25pct_adaptive or continuous_25pct_fixed_prm_top2_unlabeled25."""
        name = f"{self.method}_{100 * self.interval:g}pct_{'adaptive' if self.adaptive else 'fixed'}"
        if self.selection != "all":
            name += f"_{self.selection}"
        if self.unlabeled:
            m = _UNLABELED.match(self.unlabeled)
            name += f"_{m['mode']}{float(m['pct']):g}"
        return name

    @property
    def label(self) -> str:
        """The variant as the study table shows it."""
        return self.key + (" +adaptive" if self.adaptive else "") + f" {self.selection}" + (
            f" +{self.unlabeled}" if self.unlabeled else "")

    def config(self, cfg):
        """`cfg` with this variant's method, interval, temperature mode, selection and unlabeled prompts."""
        out = cfg.copy_and_resolve_references()
        selection, scorer, k = SELECTIONS[self.selection]
        with out.unlocked():
            out.train.method, out.train.interval, out.adaptive.enabled = self.method, self.interval, self.adaptive
            out.train.selection, out.train.scorer, out.train.rerank_top = selection, scorer, k
            out.unlabeled.enabled = bool(self.unlabeled)
            if self.unlabeled:
                m = _UNLABELED.match(self.unlabeled)
                out.unlabeled.mode = "pseudo" if m["mode"] == "unlabeled" else "oracle"
                out.unlabeled.start = float(m["pct"]) / 100
        out.lock()
        return out


def parse_variants(spec: str) -> list[Variant]:
    """'rest_em@100%, continuous@25%+adaptive, ...' -> variants (errors name the bad entry)."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        m = _VARIANT.match(part)
        if not m:
            raise ConfigError(f"study.variants: {part!r} is not METHOD@PERCENT%[+adaptive][+SELECTION]"
                              "[+unlabeled@P%|+oracle@P%] (e.g. continuous@25%+adaptive+prm_top2)")
        if m["method"] not in METHODS:
            raise ConfigError(f"study.variants: {part!r}: method must be one of {', '.join(METHODS)}")
        interval = float(m["pct"]) / 100
        iterations_per_pass(interval)  # validates the range
        adaptive, selection, unlabeled = False, "all", ""
        for opt in [o for o in m["options"].split("+") if o]:
            if opt == "adaptive":
                adaptive = True
            elif opt in SELECTIONS:
                selection = opt
            elif _UNLABELED.match(opt) and float(_UNLABELED.match(opt)["pct"]) < 100:
                unlabeled = opt
            else:
                raise ConfigError(f"study.variants: {part!r}: unknown option {opt!r}; options are adaptive, "
                                  f"{', '.join(SELECTIONS)}, unlabeled@P% and oracle@P% (P < 100)")
        out.append(Variant(m["method"], interval, adaptive, selection, unlabeled))
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
                                          v.name: finals[v.name]}, records[v.name], plots, prep.results.get("prm"))
    rows = {"base": prep.results["base"], "+warm-up": prep.results["warmup"], **finals}
    plot = plot_study(variants, rows, records, workdir / "plots" / "study.png")
    write_atomic(workdir / "study.json", json.dumps(
        {"variants": [dataclasses.asdict(v) | {"name": v.name} for v in variants],
         "accuracy": {n: {s: r[s]["accuracy"] for s in ("test_id", "test_ood") if s in r} for n, r in rows.items()}},
        indent=1))
    write_atomic(workdir / "study.md", study_markdown(cfg, variants, rows, plot, len(prep.splits["train"]), records))
    say(f"study: {wd.show('study.md')}; plot: {wd.show('plots/study.png')}")
    return finals


def _read_records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def study_table(variants: list[Variant], rows: dict[str, dict], num_queries: int, passes: float) -> str:
    """Markdown: model | method | interval (#queries) | temperature | in-domain | out-of-domain | per-task OOD."""
    tasks = sorted({t for r in rows.values() for t in r.get("test_ood", {}).get("per_task", {})})
    tasks = tasks if len(tasks) > 1 else []  # one task's column would repeat the out-of-domain one
    header = ["model", "method", "interval (#queries)", "iterations", "temperature", "selection", "unlabeled",
              "in-domain", "out-of-domain"] + [f"OOD {t}" for t in tasks]
    by_name = {v.name: v for v in variants}
    body = []
    for name, r in rows.items():
        v = by_name.get(name)
        line = [name] + (["-"] * 6 if v is None else [
            v.method, f"{100 * v.interval:g}% ({round(v.interval * num_queries)})",
            math.ceil(iterations_per_pass(v.interval) * passes), "adaptive" if v.adaptive else "fixed",
            v.selection, v.unlabeled or "-"])
        line += [r.get(s, {}).get("accuracy", float("nan")) for s in ("test_id", "test_ood")]
        line += [r.get("test_ood", {}).get("per_task", {}).get(t, float("nan")) for t in tasks]
        body.append(line)
    return markdown_table(header, body)


def standard_error(accuracy_pct: float, n: int) -> float:
    """Binomial standard error of an accuracy in percentage points."""
    p = accuracy_pct / 100
    return 100 * math.sqrt(max(p * (1 - p), 1e-12) / max(1, n))


def ordering_notes(variants: list[Variant], rows: dict[str, dict]) -> list[str]:
    """Compare the ranking of the fixed-temperature table-1 variants (all correct responses, labeled prompts only)
    with the paper's table 1, with the noise level."""
    ours = {v.key: rows[v.name] for v in variants
            if not v.adaptive and v.key in PAPER_TABLE1 and v.selection == "all" and not v.unlabeled}
    return compare_ordering(ours, PAPER_TABLE1)


def selection_notes(variants: list[Variant], rows: dict[str, dict]) -> list[str]:
    """Table 2: selections of one method and interval (fixed temperature, labeled prompts) against the paper."""
    groups: dict[tuple, dict[str, dict]] = {}
    for v in variants:
        if not v.adaptive and not v.unlabeled:
            groups.setdefault((v.method, v.interval), {})[v.selection] = rows[v.name]
    lines = []
    for (method, interval), ours in groups.items():
        if len(ours) >= 2:
            lines.append(f"- {method}@{100 * interval:g}%:")
            lines += ["  " + x for x in compare_ordering({k: r for k, r in ours.items() if k in PAPER_TABLE2},
                                                         PAPER_TABLE2)]
            lines += [f"  - {k}: {_acc(r)} (not in the paper's labelled rows)" for k, r in ours.items()
                      if k not in PAPER_TABLE2]
    return lines


def unlabeled_notes(variants: list[Variant], rows: dict[str, dict], records: dict[str, list[dict]]) -> list[str]:
    """Table 3: unlabeled prompts mixed in from a point of the run (pseudo labels or oracle), next to the paper."""
    import numpy as np

    lines = []
    for v in variants:
        if not v.unlabeled and not v.adaptive:
            key = f"labeled only, {v.selection}"
        elif v.unlabeled and not v.adaptive:
            key = f"{v.unlabeled}, {v.selection}"
        else:
            continue
        if not v.unlabeled and not any(w.unlabeled for w in variants):
            continue
        accs = [r["pseudo_label_accuracy"] for r in records.get(v.name, [])
                if r.get("stage") == "iteration" and r.get("pseudo_label_accuracy") == r.get("pseudo_label_accuracy")
                and "pseudo_label_accuracy" in r]
        paper = PAPER_TABLE3.get(key)
        lines.append(f"- {key}: ours {_acc(rows[v.name])}" + (f"; paper {paper[0]:.1f} / {paper[1]:.1f}" if paper
                                                               else "")
                     + (f"; pseudo labels right on {100 * float(np.mean(accs)):.1f}% of voted unlabeled queries"
                        if accs else ""))
    return lines


def _acc(r: dict) -> str:
    return " / ".join(f"{r[s]['accuracy']:.1f}" for s in ("test_id", "test_ood") if s in r)


def compare_ordering(ours: dict[str, dict], paper: dict[str, tuple[float, float]]) -> list[str]:
    """For each test split: our ranking of the rows next to the paper's, and the test set's noise level."""
    lines = []
    for col, split, label in ((0, "test_id", "in-domain"), (1, "test_ood", "out-of-domain")):
        have = {k: r[split]["accuracy"] for k, r in ours.items() if split in r}
        if len(have) < 2:
            continue
        n = next(r[split]["n"] for r in ours.values() if split in r)
        paper_rank = sorted(have, key=lambda k: -paper[k][col])
        our_rank = sorted(have, key=lambda k: -have[k])
        mean = sum(have.values()) / len(have)
        se = standard_error(mean, n)
        spread = max(have.values()) - min(have.values())
        agree = "the same as" if our_rank == paper_rank else "different from"
        lines.append(
            f"- {label}: ours {' > '.join(f'{k} {have[k]:.1f}' for k in our_rank)}; paper "
            f"{' > '.join(f'{k} {paper[k][col]:.1f}' for k in paper_rank)}. The order is {agree} the "
            f"paper's. Our variants span {spread:.1f} points on {n} questions, where one standard error is "
            f"{se:.1f} points (a difference under ~{2 * math.sqrt(2) * se:.1f} points between two variants is "
            "not significant at 95 %).")
    return lines


def study_markdown(cfg, variants: list[Variant], rows: dict[str, dict], plot: Path, num_queries: int,
                   records: dict[str, list[dict]] | None = None) -> str:
    """study.md: the comparison table, the orderings against the paper's tables 1-3, the adaptive temperature."""
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
    sel = selection_notes(variants, rows)
    if sel:
        lines += ["", "## Selection of correct responses (paper table 2)", ""] + sel
    unl = unlabeled_notes(variants, rows, records or {})
    if any(v.unlabeled for v in variants):
        lines += ["", "## Unlabeled prompts (paper table 3)", ""] + unl
    pairs = [(v, w) for v in variants for w in variants
             if v.adaptive and not w.adaptive and (v.method, v.interval, v.selection, v.unlabeled) ==
             (w.method, w.interval, w.selection, w.unlabeled)]
    if pairs:
        lines += ["", "## Adaptive vs fixed temperature (paper 4.2)", ""]
        lines += [f"- {w.key} {w.selection}: fixed {_acc_line(rows[w.name])}; adaptive {_acc_line(rows[v.name])}"
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
