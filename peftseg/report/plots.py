"""pareto.png: mask AP against trainable parameters, one panel per model·dataset group."""

from __future__ import annotations

import io
import math
from pathlib import Path

from peftseg.io.atomic import write_atomic
from peftseg.report.collect import Group, fronts_by_size, method_rank, plottable, training_set_size
from peftseg.report.tables import knob_header, knob_text


_SPARE = ("#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def method_colour(method: str) -> str:
    """One colour per method in every picture (pareto.png, curves), whatever the sweep holds:
    the registered `colour`, else (a method without one, or unknown to this install) a stable
    colour from its name."""
    from peftseg.registry import METHODS

    if method in METHODS and METHODS.get(method).colour:
        return METHODS.get(method).colour
    return _SPARE[sum(map(ord, str(method))) % len(_SPARE)]  # not hash(): that changes per process


def readable_x_axis(ax, xs: list[float]) -> None:
    """Log scale only where the runs span a decade or more; plain numbers as tick labels.

    matplotlib's log ticks label a narrow range (67.4 … 67.5 %) with minor ticks such as
    "6.74×10¹" that overlap into a smear."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    lo, hi = min(xs), max(xs)
    if hi / lo >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        pad = (hi - lo) * 0.15 or max(abs(hi) * 0.01, 1e-3)
        ax.set_xlim(lo - pad, hi + pad)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(_plain_formatter())


def _plain_formatter():
    """Fixed-point tick labels with as many decimals as the spacing needs: no offset or
    "×10ⁿ" text, which sits apart from the ticks and is easy to misread."""
    from matplotlib.ticker import ScalarFormatter

    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    return formatter


# one marker shape per method (in registry order), so a method's points stay told apart where
# colours are hard to tell (print, colour blindness) and where they sit on each other
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")


def method_marker(method: str) -> str:
    return _MARKERS[method_rank(method)[0] % len(_MARKERS)]


# label placement, in display pixels: candidate offsets around a point, nearest first
_RINGS = (10, 22, 36, 52)
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0))


def _overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(points: list[tuple[float, float]], sizes: list[tuple[float, float]], marker: float,
                 bounds: tuple[float, float, float, float] | None = None) -> list[tuple[float, float]]:
    """Offsets (dx, dy) in pixels for one label per point, so that no label box covers another
    label or any point's marker (a square of side 2·marker around it) and, given `bounds`
    (x0, y0, x1, y1), stays inside them. Greedy: nearest free spot first, on rings of growing
    distance; a label placed away from its point gets a leader line from the caller. When every
    candidate is taken (an absurdly crowded panel) the least-overlapping one is used."""
    markers = [(x - marker, y - marker, x + marker, y + marker) for x, y in points]
    placed: list[tuple] = []
    out = []
    for (x, y), (w, h) in zip(points, sizes):
        best, best_hits = None, None
        for ring in _RINGS:
            for ux, uy in _DIRECTIONS:
                # anchor the box on the side it moves to, so it never straddles its own point
                cx, cy = x + ux * ring, y + uy * ring
                box = (cx - (w if ux < 0 else 0 if ux > 0 else w / 2), cy - (h if uy < 0 else 0 if uy > 0 else h / 2))
                box = (box[0], box[1], box[0] + w, box[1] + h)
                hits = sum(_overlaps(box, o) for o in placed + markers)
                if bounds and not (box[0] >= bounds[0] and box[1] >= bounds[1] and box[2] <= bounds[2]
                                   and box[3] <= bounds[3]):
                    hits += 1
                if best_hits is None or hits < best_hits:
                    best, best_hits = box, hits
                if hits == 0:
                    break
            if best_hits == 0:
                break
        placed.append(best)
        out.append((best[0] - x, best[1] - y))
    return out


# the fronts of a data-efficiency sweep, one per training-set size, largest first
_FRONT_STYLES = ("--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)))


def _size_order(r) -> tuple:
    """Largest training set first; a size only known by its dataset.train_subset text after them."""
    return (0, -r.train_images, "") if r.train_images is not None else (1, 0, str(training_set_size(r)))


def _size_label(r) -> str:
    if r.train_images is not None:
        return f"{r.train_images} training images"
    return f"train_subset={knob_text(r.knob('dataset.train_subset') or 'all')}"


def run_labels(group: Group) -> dict[int, str]:
    """id() of each run of the group -> its label in the pictures: its method and the knobs that
    tell it from the others (`lora rank=8`), then `(resumed)` and a status other than ok. Settings
    that only say how or where a run ran (the ones a resumed run may change: its train.resume
    path, data-loader workers, log period, …; peftseg.checkpoint.resume.APPLICABLE) never label
    it. Runs that would still share a label get their folder's name after it."""
    from collections import Counter

    from peftseg.checkpoint.resume import APPLICABLE

    how_it_ran = APPLICABLE - {"model.weights"}  # other base weights are another experiment
    labels = {}
    for r in group.records:
        words = [str(r.knob("method.name"))] + [f"{knob_header(k)}={knob_text(r.knob(k))}" for k in group.knobs
                                                if k not in how_it_ran and r.knob(k) not in (None, "")]
        notes = (["resumed"] if r.knob("train.resume") else []) + ([str(r.status)] if r.status != "ok" else [])
        labels[id(r)] = " ".join(words) + (f" ({', '.join(notes)})" if notes else "")
    shared = Counter(labels.values())
    for r in group.records:
        if shared[labels[id(r)]] > 1:
            labels[id(r)] += f" · {Path(r.run.dir or str(r.run.id)).name}"
    return labels


def write_plot(path: Path, groups: list[Group]) -> None:
    """One panel per group. Every plotted run is numbered; the numbers sit beside their points
    (never on another label or point, with a leader line when moved away) and the key under
    the panel spells out each number's method and knobs, so a grid of 1…4 adapters per block
    stays readable. Methods differ in colour and marker; larger markers are drawn first, so
    runs at the same place show as nested shapes instead of hiding each other."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or on a cluster node
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    methods = sorted({str(r.knob("method.name")) for g in groups for r in g.records}, key=method_rank)
    sizes = {m: 170 - 110 * i / max(len(methods) - 1, 1) for i, m in enumerate(methods)}  # points², big first
    keys = []
    for g in groups:
        labels = run_labels(g)
        keys.append([f"{i}  {labels[id(r)]}" for i, r in enumerate((r for r in g.records if plottable(r)), 1)])
    n = len(groups)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    key_lines = max((len(k) for k in keys), default=0)
    panel_h = 4.5 + 0.17 * key_lines  # room for the key under each panel
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, panel_h * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    panels = []  # (axes, points) of the panels with runs
    for ax, g, key in zip(axes.flat, groups, keys):
        runs = [r for r in g.records if plottable(r)]
        ax.set_title(g.title)
        ax.set_xlabel("trainable parameters (% of the model)")
        ax.set_ylabel("mask AP")
        ax.grid(True, which="both", alpha=0.3)
        if not runs:
            ax.text(0.5, 0.5, "no successful run to plot", ha="center", va="center", transform=ax.transAxes)
            continue
        points = [(100 * r.trainable_ratio, r.mask_ap) for r in runs]
        readable_x_axis(ax, [x for x, _ in points])
        ax.yaxis.set_major_formatter(_plain_formatter())  # no "1e-5" offset text above the axis
        ys = [y for _, y in points]
        pad = (max(ys) - min(ys)) * 0.25 or max(abs(max(ys)) * 0.05, 0.5)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)  # room for labels above and below
        handles = []
        for m in methods:
            mine = [p for p, r in zip(points, runs) if str(r.knob("method.name")) == m]
            if mine:
                # translucent faces, solid edges: a point under another still shows its outline
                ax.scatter([x for x, _ in mine], [y for _, y in mine], s=sizes[m], marker=method_marker(m),
                           facecolors=matplotlib.colors.to_rgba(method_colour(m), 0.3),
                           edgecolors=method_colour(m), linewidths=1.6, zorder=3 + methods.index(m) / 100)
                handles.append(Line2D([], [], linestyle="", marker=method_marker(m), color=method_colour(m),
                                      markersize=8, label=m))
        # one front per training-set size (a data-efficiency sweep): fewer images is another budget.
        # Each has its own line style and legend entry, largest training set first
        fronts = sorted(fronts_by_size(runs), key=lambda front: _size_order(runs[front[0]]))
        for front, style in zip(fronts, _FRONT_STYLES * len(fronts)):
            xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
            ax.scatter(xs, ys, s=260, facecolors="none", edgecolors="black", linewidths=1, zorder=2)
            if len(front) >= 2:  # a front of one point is only its ring; no line to explain
                ax.step(xs, ys, where="post", color="black", linestyle=style, linewidth=1.2, zorder=1)
            what = "Pareto front" + (f", {_size_label(runs[front[0]])}" if len(fronts) > 1 else "")
            if len(front) >= 2:
                handles.append(Line2D([], [], color="black", linestyle=style, linewidth=1.2, marker="o",
                                      markerfacecolor="none", markersize=10, label=what))
            else:
                handles.append(Line2D([], [], linestyle="", marker="o", markerfacecolor="none",
                                      markeredgecolor="black", markersize=10, label=f"{what} (ringed)"))
        # the legend sits outside the data, to the right of the panel
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.text(0.0, -0.16, "\n".join(key), transform=ax.transAxes, va="top", ha="left", fontsize=7.5,
                family="monospace")
        panels.append((ax, points))
    fig.tight_layout()
    fig.canvas.draw()  # final transforms: the numbers are placed in pixels, after the layout
    dpi_scale = fig.dpi / 72
    for ax, points in panels:
        px = [tuple(ax.transData.transform(p)) for p in points]
        label_sizes = [(6.2 * len(str(i)) * dpi_scale + 2, 11 * dpi_scale) for i in range(1, len(points) + 1)]
        bbox = ax.get_window_extent()
        offsets = place_labels(px, label_sizes, marker=8 * dpi_scale, bounds=(bbox.x0, bbox.y0, bbox.x1, bbox.y1))
        for i, (p, (dx, dy), (w, h)) in enumerate(zip(points, offsets, label_sizes), 1):
            cx, cy = (dx + w / 2) / dpi_scale, (dy + h / 2) / dpi_scale  # label centre, points from its point
            ax.annotate(str(i), xy=p, xytext=(cx, cy), textcoords="offset points", ha="center", va="center",
                        fontsize=7.5, zorder=6, annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "color": "0.4", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 5}
                        if math.hypot(cx, cy) > 20 else None)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")  # keeps the outside legend and key
    plt.close(fig)
    write_atomic(path, buf.getvalue())


DATA_PLOT_NAME = "data_efficiency.png"


def varies_training_images(group: Group) -> bool:
    """A data-efficiency sweep: the group's ok runs trained on more than one number of images."""
    return len({r.train_images for r in group.records if plottable(r) and r.train_images}) > 1


def efficiency_lines(group: Group) -> dict[tuple[str, tuple[str, ...]], list[tuple[int, float]]]:
    """(method, its knob settings) -> [(training images, mask AP)] sorted by images, in report
    order: one line per method setting; the subset size is the x axis, never part of a line."""
    lines: dict[tuple, list[tuple[int, float]]] = {}
    for r in group.records:
        if plottable(r) and r.train_images:
            knobs = tuple(f"{knob_header(k)}={knob_text(r.knob(k))}" for k in group.knobs
                          if k.startswith("method.") and k in r.config and not k.endswith(".train_subset"))
            lines.setdefault((str(r.knob("method.name")), knobs), []).append((r.train_images, r.mask_ap))
    return {key: sorted(pts) for key, pts in sorted(lines.items(), key=lambda kv: (method_rank(kv[0][0]), kv[0][1]))}


def write_data_efficiency_plot(path: Path, groups: list[Group]) -> bool:
    """data_efficiency.png: mask AP against the number of training images (log scale), one
    line per method (per method and knob setting when knobs vary), for the groups whose runs
    differ in `dataset.train_subset`. False (nothing written) when no group does."""
    groups = [g for g in groups if varies_training_images(g)]
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(7.5 * len(groups), 4.8), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        lines = efficiency_lines(g)
        for (method, knobs), pts in lines.items():
            ax.plot([n for n, _ in pts], [ap for _, ap in pts], marker=method_marker(method), markersize=6,
                    color=method_colour(method), label=" ".join((method, *knobs)), linewidth=1.5)
        ax.set_xscale("log")
        counts = sorted({n for pts in lines.values() for n, _ in pts})
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training images (dataset.train_subset)")
        ax.set_ylabel("mask AP")
        ax.set_title(g.title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return True
