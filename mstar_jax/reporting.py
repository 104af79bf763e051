"""Run outputs: metrics.jsonl, TensorBoard scalars (no TensorFlow needed), dynamics plots and report.md."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from mstar_jax.io import write_atomic  # noqa: F401  (its home is mstar_jax.io; imported here by older callers)
from mstar_jax.workdir import publish

DYNAMICS_METRICS = ("greedy", "pass@k", "pass@k-greedy", "reward_pass@2")


class MetricsLog:
    """Append-only metrics.jsonl plus TensorBoard events; `records` is the authoritative in-memory list.

    In a remote workdir both are uploaded whole after every record: metrics.jsonl is small, and the events file
    only grows by a record, so the remote is never more than the current record behind."""

    def __init__(self, workdir: str | Path, records: Iterable[dict] = (), tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.records: list[dict] = list(records)
        # Resume rewrites the file from the checkpointed records: lines written after the checkpoint vanish.
        write_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))
        self._tb = None
        if tensorboard and (os.environ.get("JAX_PROCESS_INDEX", "0") == "0"):
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._tb = EventFileWriter(str(Path(workdir) / "tensorboard"))
        self._tb_dir = Path(workdir) / "tensorboard"

    def log(self, record: dict[str, Any], step: int) -> None:
        """Record a dict of metrics (numbers go to TensorBoard under `stage/name`)."""
        record = {**record, "step": int(step)}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            prefix = "/".join(str(record[k]) for k in ("stage", "split") if k in record)
            suffix = f"/T={record['temperature']:g}" if isinstance(record.get("temperature"), (int, float)) else ""
            values = [summary_pb2.Summary.Value(tag=f"{prefix}/{k}{suffix}", simple_value=float(v))
                      for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "temperature")]
            if values:
                self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                                   summary=summary_pb2.Summary(value=values)))
                self._tb.flush()
                publish(self._tb_dir)
        publish(self.path)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._tb is not None:
            self._tb.close()
            publish(self._tb_dir)


PLOT_DPI = 110


def dynamics_figure(records: list[dict], metric: str, scorer: str = "mean_logprob"):
    """The figure of one dynamics metric: a line per temperature over iterations (paper figures 3-5), or None
    when no dynamics record has the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series: dict[float, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r.get("stage") == "dynamics" and metric in r:
            series[float(r["temperature"])].append((int(r["iteration"]), 100 * float(r[metric])))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=PLOT_DPI)
    cmap = plt.get_cmap("viridis")
    temps = sorted(series)
    for i, t in enumerate(temps):
        pts = sorted(series[t])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                color=cmap(i / max(1, len(temps) - 1)), label=f"T={t:g}")
    chosen = sorted((int(r["iteration"]), float(r["temperature"])) for r in records
                    if r.get("stage") == "temperature")
    ax.set_title(metric if metric != "reward_pass@2" else f"Reward-Pass@2 (ranked by {scorer})")
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("% of validation queries")
    if chosen and metric == "reward_pass@2":
        ax.text(0.01, 0.01, "chosen T: " + ", ".join(f"{it}:{t:g}" for it, t in chosen), fontsize=7,
                transform=ax.transAxes)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def plot_dynamics(records: list[dict], out_dir: str | Path, scorer: str = "mean_logprob") -> list[Path]:
    """One PNG per dynamics metric that has records (see `dynamics_figure`)."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in DYNAMICS_METRICS:
        fig = dynamics_figure(records, metric, scorer)
        if fig is None:
            continue
        path = out_dir / f"{metric.replace('@', '_at_').replace('-', '_minus_')}.png"
        fig.savefig(path, dpi=PLOT_DPI)
        plt.close(fig)
        publish(path)
        paths.append(path)
    return paths


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats print with one decimal."""
    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
