"""Training curves of a group of runs: total loss and learning rate per iteration.

Read from each run's `metrics.json` (detectron2's JSONWriter: one JSON object per line,
written every `train.log_period` iterations, plus the evaluation lines without losses).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from peftseg.report.collect import Group
from peftseg.report.plots import method_colour, run_labels

CURVE_KEYS = ("total_loss", "lr")


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """key -> [(iteration, value)] for CURVE_KEYS; empty lists when the file is missing."""
    from peftseg.io.training_log import read_training_log

    curves: dict[str, list[tuple[int, float]]] = {k: [] for k in CURVE_KEYS}
    for _, row in read_training_log(run_dir):
        for key in CURVE_KEYS:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                curves[key].append((int(row["iteration"]), float(value)))
    return curves


def write_curves_png(path: Path, title: str, runs: list[tuple[str, str, Path]], colour_of) -> bool:
    """One PNG: loss (left) and lr (right) against iteration, one line per run.

    runs: (label, method name, run dir); colour_of(method) gives the method's fixed colour.
    Returns False (and writes nothing) when no run has a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftseg.io.atomic import write_atomic

    curves = [(label, method, read_curves(d)) for label, method, d in runs]
    curves = [c for c in curves if any(c[2].values())]
    if not curves:
        return False
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for label, method, c in curves:
        style = styles[seen.get(method, 0) % len(styles)]  # same method: same colour, other dash
        seen[method] = seen.get(method, 0) + 1
        for ax, key in ((loss_ax, "total_loss"), (lr_ax, "lr")):
            if c[key]:
                # markers: a short run logs only a point or two, which a bare line would not show
                ax.plot(*zip(*c[key]), style, marker="o", markersize=3, color=colour_of(method), label=label,
                        linewidth=1.5)
    loss_ax.set_ylabel("total loss (sum of the model's losses)")
    lr_ax.set_ylabel("learning rate (base group)")
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, lr_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
    # no "1e-5+2.9043" offset labels: a flat stretch of loss reads as its plain values
    loss_ax.ticklabel_format(axis="y", useOffset=False)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2), useOffset=False)
    # one legend for both panels, under them: it never covers a curve, and long labels stay whole
    handles, labels = loss_ax.get_legend_handles_labels()
    fig.suptitle(f"training curves · {title}")
    fig.tight_layout()
    fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=max(1, min(3, len(labels))), frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # the legend below is kept
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return True


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def curves_path(root: Path, group: Group) -> Path:
    return Path(root) / f"curves_{_slug(group.model)}_{_slug(group.label or group.dataset)}.png"


def write_group_curves(root: Path, group: Group) -> Path | None:
    """curves_<model>_<dataset>.png under root: loss and lr of every run of the group."""
    labels = run_labels(group)  # method and knobs, never a resume path
    runs = [(labels[id(r)], str(r.knob("method.name")), Path(r.run.dir or "")) for r in group.records]
    path = curves_path(root, group)
    return path if write_curves_png(path, group.title, runs, method_colour) else None
