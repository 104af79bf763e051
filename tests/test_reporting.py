"""metrics.jsonl, TensorBoard events and dynamics plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mstar_jax.reporting import DYNAMICS_METRICS, MetricsLog, dynamics_figure, markdown_table, plot_dynamics


def test_metrics_log_writes_jsonl_and_tensorboard(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"stage": "train", "loss": 1.25}, step=3)
    log.log({"stage": "dynamics", "iteration": 1, "temperature": 0.7, "greedy": 0.5}, step=3)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"stage": "train", "loss": 1.25, "step": 3}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "dynamics/greedy/T=0.7" in acc.Tags()["scalars"]
    assert acc.Scalars("train/loss")[0].value == 1.25


def test_resume_rewrites_metrics_from_checkpointed_records(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log({"stage": "train", "loss": 1.0}, step=1)
    log.log({"stage": "train", "loss": 0.5}, step=2)  # written after the last checkpoint
    kept = log.records[:1]
    MetricsLog(tmp_path, records=kept, tensorboard=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def assert_png_draws(fig, png) -> None:
    """Every data point of every line of `fig` is drawn in the PNG file in its line's colour (or in the colour of
    a later line with a point on the same spot, drawn over it): a blank or data-free PNG fails."""
    from matplotlib.colors import to_rgb
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    fig.canvas.draw()  # the layout the file was saved with (same dpi)
    assert image.shape[1::-1] == fig.canvas.get_width_height()
    ax = fig.axes[0]
    points = []  # (line index, x px, y px from the top)
    for i, line in enumerate(ax.get_lines()):
        for x, y in ax.transData.transform(line.get_xydata()):
            points.append((i, x, image.shape[0] - y))
    assert points, "the figure draws no data"
    colours = [np.array(to_rgb(line.get_color())) * 255 for line in ax.get_lines()]
    for i, x, y in points:
        top = max(j for j, x2, y2 in points if abs(x2 - x) < 4 and abs(y2 - y) < 4)
        pixel = image[int(y), int(x)]
        assert np.abs(pixel - colours[top]).max() <= 40, (png, i, x, y, pixel, colours[top])


def test_plots_draw_every_record_of_their_metric(tmp_path):
    import matplotlib.pyplot as plt

    records = [{"stage": "dynamics", "iteration": i, "temperature": t, "greedy": 0.1 * i + 0.2 * t, "pass@k": 0.5,
                "pass@k-greedy": 0.5 - 0.1 * i, "reward_pass@2": 0.3 + 0.05 * i * t}
               for i in range(1, 4) for t in (0.5, 1.0)]
    paths = plot_dynamics(records, tmp_path)
    assert [p.name for p in paths] == ["greedy.png", "pass_at_k.png", "pass_at_k_minus_greedy.png",
                                       "reward_pass_at_2.png"]
    for metric, path in zip(DYNAMICS_METRICS, paths):
        fig = dynamics_figure(records, metric)
        lines = fig.axes[0].get_lines()
        assert [line.get_label() for line in lines] == ["T=0.5", "T=1"]
        for line, t in zip(lines, (0.5, 1.0)):  # the plotted values are the records' (in percent)
            want = [[r["iteration"], 100 * r[metric]] for r in records if r["temperature"] == t]
            np.testing.assert_allclose(line.get_xydata(), want)
        assert_png_draws(fig, path)
        plt.close(fig)
    assert dynamics_figure([{"stage": "iteration", "greedy": 0.5}], "greedy") is None  # no dynamics, no figure


def test_a_blank_png_fails_the_drawn_data_check(tmp_path):
    """The check above is not met by a PNG of the right size that shows nothing."""
    from PIL import Image

    records = [{"stage": "dynamics", "iteration": i, "temperature": 1.0, "greedy": 0.2 * i} for i in range(1, 4)]
    fig = dynamics_figure(records, "greedy")
    w, h = fig.canvas.get_width_height()
    Image.new("RGB", (w, h), "white").save(tmp_path / "blank.png")
    with pytest.raises(AssertionError):
        assert_png_draws(fig, tmp_path / "blank.png")


def test_markdown_table():
    assert markdown_table(["a", "b"], [["x", 1.25]]) == "| a | b |\n|---|---|\n| x | 1.2 |\n"
