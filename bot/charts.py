"""The loss-curve picture posted in a run's thread: train and eval loss against step, as PNG bytes.

Built on matplotlib's object API with the Agg canvas (no pyplot, no global figure state), so that it is safe in a
server that renders charts for several runs at once.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TRAIN_COLOR = "#1f77b4"
EVAL_COLOR = "#ff7f0e"
BASE_COLOR = "#7f7f7f"


@dataclass
class LossSeries:
    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)
    base_eval_loss: float | None = None
    dropped: int = 0  # points with a non-finite or unreadable loss (a diverged run shows NaN)

    def __bool__(self) -> bool:
        return bool(self.train or self.eval)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _step(value: Any) -> int | None:
    x = _number(value)
    return int(x) if x is not None and x >= 0 else None


def loss_series(points: Iterable[Mapping[str, Any]] = (), metrics: Mapping[str, Any] | None = None) -> LossSeries:
    """Collect the loss points of a run (pure).

    `points`: the payload's progress events (step events carry `loss`, eval events `eval_loss`) or any dicts with
    `step` and `loss` / `eval_loss` (a trainer's log history). `metrics`: metrics.json, whose `loss_history` and
    `eval_history` are [step, loss] pairs. When a step appears more than once (a resumed run repeats the steps
    after its last checkpoint), the last value read wins: metrics first, then the events in order.
    """
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    base: float | None = None
    dropped = 0

    def put(target: dict[int, float], step: Any, loss: Any) -> None:
        nonlocal dropped
        s, x = _step(step), _number(loss)
        if s is None or x is None:
            dropped += 1
        else:
            target[s] = x

    if metrics:
        for key, target in (("loss_history", train), ("eval_history", evals)):
            for pair in metrics.get(key) or ():
                if isinstance(pair, (list, tuple)) and len(pair) >= 2:
                    put(target, pair[0], pair[1])
                elif isinstance(pair, Mapping):
                    put(target, pair.get("step"), pair.get("loss", pair.get("eval_loss")))
        base = _number(metrics.get("base_eval_loss"))
    for p in points:
        if not isinstance(p, Mapping) or "step" not in p:
            continue
        kind = p.get("type")
        if "eval_loss" in p and kind in (None, "eval"):
            put(evals, p["step"], p["eval_loss"])
            if _number(p.get("base_eval_loss")) is not None:
                base = _number(p["base_eval_loss"])
        elif "loss" in p and kind in (None, "step"):
            put(train, p["step"], p["loss"])
    return LossSeries(sorted(train.items()), sorted(evals.items()), base, dropped)


def build_figure(series: LossSeries, run_id: str = "", *, width_px: int = 900, height_px: int = 500,
                 dpi: int = 100) -> Figure:
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if series.train:
        steps, losses = zip(*series.train)
        ax.plot(steps, losses, color=TRAIN_COLOR, linewidth=1.8, label="train loss",
                marker="o" if len(steps) <= 30 else None, markersize=3)
    if series.eval:
        steps, losses = zip(*series.eval)
        ax.plot(steps, losses, color=EVAL_COLOR, linewidth=1.8, marker="o", markersize=5, label="eval loss")
    if series.base_eval_loss is not None:
        ax.axhline(series.base_eval_loss, color=BASE_COLOR, linestyle="--", linewidth=1.2,
                   label="base model eval loss")
    ax.set_title(f"{run_id}: loss" if run_id else "Loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    if series.dropped:
        fig.text(0.01, 0.01, f"{series.dropped} point(s) with a non-finite loss not shown", fontsize=8,
                 color="#d62728")
    fig.tight_layout()
    return fig


def render_loss_curve(points: Iterable[Mapping[str, Any]] = (), run_id: str = "", *,
                      metrics: Mapping[str, Any] | None = None, width_px: int = 900, height_px: int = 500,
                      dpi: int = 100) -> bytes | None:
    """PNG bytes of the run's loss curve, or None when there is no loss to draw (a run that failed before its
    first logged step): the caller then posts no chart, rather than an empty one.

    `run_id` defaults to metrics.json's `run_id`.
    """
    series = loss_series(points, metrics)
    if not series:
        return None
    run_id = run_id or str((metrics or {}).get("run_id") or "")
    fig = build_figure(series, run_id, width_px=width_px, height_px=height_px, dpi=dpi)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
