"""The loss curve: a real PNG of the promised size, drawn from events and/or metrics.json; nothing to draw -> None."""

from __future__ import annotations

import io
import json
import math
import struct

import numpy as np
from matplotlib.image import imread

from bot.charts import (
    EVAL_COLOR,
    TRAIN_COLOR,
    build_figure,
    loss_series,
    render_loss_curve,
)
from payload.events import make_event


def step_events(n: int, start: float = 3.0) -> list[dict]:
    return [make_event("step", step=s, total_steps=n, epoch=s / n, loss=start / (1 + 0.1 * s), lr=1e-4,
                       tokens_per_s=1000.0, eta_s=10) for s in range(1, n + 1)]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def has_color(pixels: np.ndarray, hex_color: str, tol: float = 0.06) -> bool:
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(pixels[..., :3] - rgb).max(axis=-1) < tol).sum() > 50)


def test_train_and_eval_curves_become_a_png_of_the_promised_size():
    events = step_events(60)
    events += [make_event("eval", step=s, eval_loss=2.0 - s / 100) for s in (20, 40, 60)]
    events += [make_event("checkpoint", step=20, path="checkpoint-20"), {"type": "start", "total_steps": 60}]
    png = render_loss_curve(events, "ft-0042")
    assert png_size(png) == (900, 500)
    assert 10_000 < len(png) < 400_000
    pixels = imread(io.BytesIO(png), format="png")
    assert pixels.shape[:2] == (500, 900)
    assert has_color(pixels, TRAIN_COLOR) and has_color(pixels, EVAL_COLOR)


def test_the_figure_says_what_it_shows():
    events = step_events(10) + [make_event("eval", step=10, eval_loss=1.1, base_eval_loss=2.5, final=True)]
    fig = build_figure(loss_series(events), "ft-0042")
    ax = fig.axes[0]
    assert ax.get_title() == "ft-0042: loss"
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["train loss", "eval loss", "base model eval loss"]
    train, ev, base = ax.get_lines()
    assert list(train.get_xdata()) == list(range(1, 11))
    assert math.isclose(train.get_ydata()[0], 3.0 / 1.1)
    assert list(ev.get_xdata()) == [10] and list(ev.get_ydata()) == [1.1]
    assert list(base.get_ydata()) == [2.5, 2.5]


def test_metrics_json_history_alone_and_with_events():
    metrics = json.loads(json.dumps({"run_id": "ft-0007", "loss_history": [[1, 2.5], [2, 2.0], [3, 1.7]],
                                     "eval_history": [[3, 1.9]], "base_eval_loss": 2.4}))
    series = loss_series(metrics=metrics)
    assert series.train == [(1, 2.5), (2, 2.0), (3, 1.7)] and series.eval == [(3, 1.9)]
    assert series.base_eval_loss == 2.4
    png = render_loss_curve(metrics=metrics)
    assert png_size(png) == (900, 500)
    fig = build_figure(series, "ft-0007")
    assert fig.axes[0].get_title() == "ft-0007: loss"
    # Events after the metrics (a resumed run's later steps) extend and override them.
    merged = loss_series([{"type": "step", "step": 3, "loss": 1.6}, {"type": "step", "step": 4, "loss": 1.5}],
                         metrics)
    assert merged.train == [(1, 2.5), (2, 2.0), (3, 1.6), (4, 1.5)]


def test_a_resumed_run_repeats_steps_and_the_last_value_wins():
    first = step_events(12)
    resumed = [dict(e, loss=e["loss"] - 0.5) for e in step_events(15)[10:]]  # continues from checkpoint 10
    series = loss_series(first + resumed)
    assert [s for s, _ in series.train] == list(range(1, 16))
    assert dict(series.train)[11] == resumed[0]["loss"]


def test_trainer_log_history_dicts_are_read_too():
    history = [{"loss": 2.0, "step": 5, "epoch": 0.5}, {"eval_loss": 1.8, "step": 5}, {"train_runtime": 3.0,
                                                                                       "step": 10}]
    series = loss_series(history)
    assert series.train == [(5, 2.0)] and series.eval == [(5, 1.8)]


def test_non_finite_losses_are_left_out_and_said_so():
    events = step_events(5)
    events[2]["loss"] = float("nan")
    events[3]["loss"] = "garbage"
    series = loss_series(events)
    assert [s for s, _ in series.train] == [1, 2, 5] and series.dropped == 2
    fig = build_figure(series, "ft-0001")
    assert any("non-finite" in t.get_text() for t in fig.texts)


def test_nothing_to_draw_gives_none():
    assert render_loss_curve([]) is None
    assert render_loss_curve([{"type": "start", "total_steps": 10}], "ft-0001", metrics={}) is None
    assert render_loss_curve([{"type": "step", "step": 1, "loss": float("inf")}]) is None
    assert render_loss_curve(metrics={"loss_history": [], "eval_history": []}) is None


def test_one_point_still_draws_a_visible_marker():
    png = render_loss_curve([{"type": "eval", "step": 0, "eval_loss": 1.5}], "ft-0003", width_px=400,
                            height_px=300)
    assert png_size(png) == (400, 300)
    assert has_color(imread(io.BytesIO(png), format="png"), EVAL_COLOR, tol=0.1)
