"""`peftseg report`: table, report.csv and pareto.png over the records under a folder."""

import csv
import io
import json
import os
from pathlib import Path

import matplotlib.image
import pytest
from rich.console import Console

from conftest import records_under
from helpers import cli_in_process

from peftseg.errors import UserError
from peftseg.report import build_report
from peftseg.report.collect import pareto_front
from peftseg.io.atomic import write_json

EXPECTED_COLUMNS = {
    "run.id", "status", "model.name", "dataset.name", "method.name", "method.adapters_per_block", "method.bottleneck",
    "train.max_iter", "params.total", "params.trainable", "params.ratio", "metrics.segm.AP",
    "metrics.bbox.AP", "efficiency.peak_memory_bytes", "efficiency.mean_step_time_s",
    "efficiency.images_per_s", "efficiency.train_wall_time_s", "efficiency.checkpoint_bytes",
}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn on it


def table_rows(stdout: str, method: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("│") and f"│ {method} " in line]


def test_report_of_a_sweep(smoke_sweep, tmp_path, shapes_cache):
    _, sweep_dir = smoke_sweep
    proc = cli_in_process("report", str(sweep_dir), cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout, "adapter")
    assert len(rows) == 3
    # The knob that varies gets a column; the ones every member shares do not.
    header = next(line for line in proc.stdout.splitlines() if "method" in line and "mask AP" in line)
    assert "adapters_per_block" in header and "bottleneck" not in header and "sites" not in header
    assert [row.split("│")[2].strip() for row in rows] == ["1", "2", "3"]
    assert all(row.rstrip("│ ").endswith("ok") for row in rows)
    assert "vitdet_tiny · shapes" in proc.stdout

    table = read_csv(sweep_dir / "report.csv")
    assert len(table) == 3
    assert EXPECTED_COLUMNS <= set(table[0])
    by_id = {row["run.id"]: row for row in table}
    for record in records_under(sweep_dir):
        row = by_id[record["run"]["id"]]
        assert row["status"] == "ok"
        assert float(row["params.ratio"]) == pytest.approx(record["params"]["ratio"])
        assert float(row["metrics.segm.AP"]) == pytest.approx(record["metrics"]["segm"]["AP"])
        assert int(row["efficiency.checkpoint_bytes"]) == record["efficiency"]["checkpoint_bytes"]
    assert_png(sweep_dir / "pareto.png")
    assert not list(sweep_dir.glob(".*.tmp"))


def fake(root: Path, name: str, *, model="vitdet_tiny", dataset="shapes", method="lora", status="ok",
         ap=30.0, box=35.0, ratio=0.05, step=0.5, mem=600, ckpt=100, data=None, images=None, **knobs) -> dict:
    """A record as a run writes it; `data`: dataset.* knobs, `images`: the training images it used."""
    config = {"model.name": model, "dataset.name": dataset, "method.name": method,
              **{f"dataset.{k}": v for k, v in (data or {}).items()},
              **{f"method.{k}": v for k, v in knobs.items()}, "train.max_iter": 100}
    ok = status == "ok"
    record = {
        "run": {"id": name, "dir": str(root / name), "start_time": "2024-01-01T00:00:00+00:00"},
        "config": config,
        "params": {"total": 1000, "trainable": int(1000 * ratio), "ratio": ratio},
        "metrics": {"segm": {"AP": ap}, "bbox": {"AP": box}} if ok else None,
        "efficiency": {"mean_step_time_s": step, "peak_memory_bytes": mem, "peak_memory_kind": "cpu_peak_rss",
                       "checkpoint_bytes": ckpt} if ok else None,
        "status": status,
        "error": None if ok else {"type": "RuntimeError", "message": "boom", "traceback": "..."},
        "data": None if images is None else {"train_images": images},
    }
    write_json(root / name / "results.json", record)  # a record as a run writes it
    return record


@pytest.fixture
def two_groups(tmp_path):
    fake(tmp_path, "a/full", method="full", ap=40.0, ratio=1.0, step=1.0, mem=1000)
    fake(tmp_path, "a/heads", method="heads", ap=32.0, ratio=0.4, step=0.6, mem=700)
    fake(tmp_path, "a/lora4", rank=4, alpha=8, ap=37.0, ratio=0.01, step=0.5, mem=600)
    fake(tmp_path, "a/lora16", rank=16, alpha=8, ap=36.0, ratio=0.04, step=0.55, mem=650)
    fake(tmp_path, "a/lora0", rank=0, alpha=8, status="failed")
    fake(tmp_path, "b/lora8", model="vitdet_b", dataset="coco", rank=8, alpha=8)
    return tmp_path


def test_baseline_adds_delta_ap_and_ratios_per_model_and_dataset(two_groups):
    out = io.StringIO()
    build_report(two_groups, "full", Console(file=out, width=200))
    text = out.getvalue()
    rows = {row["run.id"]: row for row in read_csv(two_groups / "report.csv")}
    assert len(rows) == 6
    lora4 = rows["a/lora4"]
    assert float(lora4["baseline.delta_mask_AP"]) == pytest.approx(-3.0)
    assert float(lora4["baseline.step_time_ratio"]) == pytest.approx(0.5)
    assert float(lora4["baseline.peak_memory_ratio"]) == pytest.approx(0.6)
    assert lora4["baseline.run_id"] == "a/full"
    assert float(rows["a/full"]["baseline.delta_mask_AP"]) == 0.0
    # A failed member is a row with its status and no numbers.
    assert rows["a/lora0"]["status"] == "failed" and rows["a/lora0"]["metrics.segm.AP"] == ""
    assert rows["a/lora0"]["error.message"] == "boom"
    # No `full` run for vitdet_b on coco: blanks and a note, not a crash.
    assert rows["b/lora8"]["baseline.delta_mask_AP"] == ""
    assert "no successful `full` run for vitdet_b · coco" in text
    assert "-3.00" in text and "0.50×" in text and "0.60×" in text
    (failed_row,) = [line for line in text.splitlines() if "failed" in line and "│" in line]
    assert failed_row.count("—") >= 6
    assert_png(two_groups / "pareto.png")


def test_rows_are_grouped_and_knobs_shown_only_where_they_vary(two_groups):
    out = io.StringIO()
    build_report(two_groups, None, Console(file=out, width=200))
    text = out.getvalue()
    assert text.index("vitdet_b · coco") < text.index("vitdet_tiny · shapes")  # one table each
    tiny = text[text.index("vitdet_tiny · shapes"):]
    header = next(line for line in tiny.splitlines() if "mask AP" in line)
    assert "rank" in header and "alpha" not in header and "ΔAP" not in header
    methods = [line.split("│")[1].strip() for line in tiny.splitlines() if line.startswith("│")]
    assert methods == ["full", "heads", "lora", "lora", "lora"]
    ranks = [line.split("│")[2].strip() for line in tiny.splitlines() if line.startswith("│")]
    assert ranks == ["", "", "0", "4", "16"]  # numeric order, blank for methods without the knob


def test_pareto_front_keeps_the_best_ap_at_each_budget():
    points = [(1.0, 30.0), (4.0, 36.0), (40.0, 32.0), (100.0, 40.0), (4.0, 20.0)]
    assert pareto_front(points) == [0, 1, 3]


def test_missing_or_empty_folder_is_a_user_error(tmp_path, shapes_cache):
    proc = cli_in_process("report", str(tmp_path / "nope"), cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr
    with pytest.raises(UserError, match="No results.json under .*peftseg train -m"):
        build_report(tmp_path, None, Console(file=io.StringIO()))


@pytest.mark.parametrize("bad", [
    "[1, 2]", '"text"', '{"config": "x", "status": "ok"}', '{"config": {}}',
    '{"run": {"id": "b", "dir": "d", "start_time": "t"}, "config": {}, "status": 3}', '{"run": {"id": "b", "dir": "d", "start_time": "t"}, "config": {}, "status": "ok", "efficiency": "fast"}',
    '{"run": {"id": "b", "dir": "d", "start_time": "t"}, "config": {}, "status": "ok", "metrics": {"segm": {"AP": "high"}}}',
    '{"run": {"id": "b", "dir": "d", "start_time": "t"}, "config": {}, "status": "ok", "metrics": [1]}', '{"run": {"id": "b", "dir": "d", "start_time": "t"}, "config": {}, "status": "ok", "params": {"ratio": "1%"}}',
])
def test_records_of_the_wrong_shape_are_named_and_skipped(tmp_path, bad):
    from peftseg.io.atomic import write_json

    write_json(tmp_path / "good" / "results.json", {
        "run": {"id": "good", "dir": str(tmp_path / "good"), "start_time": "2024-01-01T00:00:00+00:00"},
        "config": {"model.name": "vitdet_tiny", "dataset.name": "shapes", "method.name": "lora"},
        "params": {"total": 10, "trainable": 1, "ratio": 0.1}, "metrics": {"segm": {"AP": 33.0}},
        "status": "ok"})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text(bad)
    out = io.StringIO()
    csv_path, _ = build_report(tmp_path, None, Console(file=out, width=200))
    text = " ".join(out.getvalue().split())
    assert f"skipping {tmp_path / 'bad' / 'results.json'}: not a peftseg run record" in text
    (row,) = read_csv(csv_path)
    assert float(row["metrics.segm.AP"]) == 33.0


def test_report_md_curves_and_backbone_share_of_a_sweep(smoke_sweep):
    _, sweep_dir = smoke_sweep
    out = io.StringIO()
    build_report(sweep_dir, "full", Console(file=out, width=250))
    text = out.getvalue()
    md = (sweep_dir / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| adapter |")]
    assert len(table) == 3 and "| backbone % |" in md and "| front |" in md
    records = {r["config"]["method.adapters_per_block"]: r for r in records_under(sweep_dir)}
    for n, record in records.items():
        groups = record["params"]["by_group"]
        share = 100 * (groups["backbone"]["trainable"] + groups["peft"]["trainable"]) / groups["backbone"]["total"]
        assert f"{share:.3f}" in text and f"{share:.3f}" in md
    assert "![training curves, vitdet_tiny · shapes](curves_vitdet_tiny_shapes.png)" in md
    assert "![mask AP vs trainable %](pareto.png)" in md
    assert_png(sweep_dir / "curves_vitdet_tiny_shapes.png")
    # the baseline hint is the member's own command with the method swapped, into this folder
    hint = " ".join(text.split())
    assert f"peftseg train method=full train=smoke train.max_iter=8 train.warmup_iters=0 model.score_thresh_test=0.0 hydra.run.dir={sweep_dir / 'baseline_full'}" in hint
    assert "peak RSS" in md  # CPU memory is marked as not comparable


def test_narrow_trainable_range_gets_plain_ticks_and_methods_keep_their_colour():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftseg.report.plots import method_colour, readable_x_axis

    fig, ax = plt.subplots()
    ax.scatter([67.40, 67.45, 67.50], [1, 2, 3])
    readable_x_axis(ax, [67.40, 67.45, 67.50])
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert ax.get_xscale() == "linear" and 2 <= len(labels) <= 7
    assert all(67.3 <= float(label) <= 67.6 for label in labels)  # plain numbers, not "6.74×10¹"
    plt.close(fig)
    assert method_colour("lora") == "#9467bd" and method_colour("my_method") == method_colour("my_method")


def test_point_labels_never_cover_each_other_or_a_point():
    from peftseg.report.plots import place_labels

    # a study grid's worst case: adapters_per_block=1…4 and a LoRA run on one spot, plus neighbours
    points = [(200.0, 150.0)] * 6 + [(203.0, 152.0), (215.0, 150.0), (400.0, 300.0)]
    sizes = [(14.0, 18.0)] * len(points)
    offsets = place_labels(points, sizes, marker=13.0, bounds=(0, 0, 640, 480))
    boxes = [(x + dx, y + dy, x + dx + w, y + dy + h) for (x, y), (dx, dy), (w, h) in zip(points, offsets, sizes)]
    marks = [(x - 13, y - 13, x + 13, y + 13) for x, y in points]
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[2] <= 640 and 0 <= a[1] and a[3] <= 480
        for b in boxes[i + 1:] + marks:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_console_table_keeps_method_and_mask_ap_whole_whatever_the_knobs(tmp_path):
    from rich.console import Console

    from peftseg.report.collect import group_records, load_records
    from peftseg.report.tables import group_table

    long = ["deform_attn", "decoder_self_attn", "attn_qkv", "attn_proj", "mlp", "task_heads"]
    for i in range(3):
        fake(tmp_path, f"r{i}", method="adapter_lora", ap=30.0 + i + 0.123, ratio=0.01 * (i + 1),
             targets=long[i:], sites=long[:i + 1], bottleneck=8 * (i + 1), scale=0.1 * i, rank=2 ** i,
             dropout=0.05 * i, weights=f"/data/checkpoints/very/long/path/model_{i}_with_a_long_name.pth")
    (group,) = group_records(load_records(tmp_path))
    for width in (160, 200):
        console = Console(width=width, record=True, file=open(os.devnull, "w"))
        console.print(group_table(group, None, {}, width=width))
        text = console.export_text()
        assert all(len(line) <= width for line in text.splitlines())
        for i in range(3):
            assert f"{30.0 + i + 0.123:.2f}" in text  # mask AP whole
        assert sum(line.count("adapter_lora") for line in text.splitlines()) == 3  # method whole, each row
        assert "…" not in text


def _study_at_two_image_sizes(root: Path) -> dict[str, dict]:
    """A study as a paper's table has it: baselines and PEFT methods with their knobs, each at
    512 and 1024 px, one failed run; every mask AP different. run id -> record."""
    runs = {}
    for size, more in ((512, 0.0), (1024, 2.2)):
        def run(name, **kw):
            record = fake(root, f"{name}_{size}", model="vitdet_b", dataset="coco", mem=int(kw.pop("gib", 8) * 2**30),
                          ckpt=int(kw.pop("mb", 100) * 2**20), **kw)
            record["config"]["model.image_size"] = size
            record["efficiency"] and record["efficiency"].update(peak_memory_kind="cuda_max_allocated")
            write_json(root / f"{name}_{size}" / "results.json", record)
            runs[f"{name}_{size}"] = record

        run("full", method="full", ap=44.11 + more, ratio=1.0, step=0.91, gib=14.2, mb=420)
        run("heads", method="heads", ap=35.72 + more, ratio=0.2251, step=0.52, gib=6.1)
        run("bitfit", method="bitfit", ap=37.03 + more, ratio=0.2262, step=0.61, gib=9.1)
        for rank, targets in ((4, ["attn_qkv"]), (8, ["attn_qkv", "attn_proj"]), (16, ["attn_qkv", "attn_proj", "mlp"])):
            run(f"lora{rank}", rank=rank, alpha=2 * rank, targets=targets, ap=40.04 + rank / 8 + more,
                ratio=0.2251 + rank * 4e-4, step=0.66, gib=8.3)
        for per_block, dim in ((1, 16), (2, 64)):
            run(f"adapter{per_block}", method="adapter", adapters_per_block=per_block, bottleneck=dim,
                ap=39.56 + per_block + more, ratio=0.23 + per_block * dim * 1e-4, step=0.7, gib=8.8)
        run("vera", method="vera", rank=256, ap=38.47 + more, ratio=0.2252, step=0.69, gib=8.5)
        run("lora_oom", rank=32, alpha=64, targets=["attn_qkv"], status="failed")
    return runs


def test_the_console_report_of_a_study_fits_100_columns_with_every_number_in_the_csv(tmp_path, monkeypatch,
                                                                                     capsys):
    runs = _study_at_two_image_sizes(tmp_path)
    console = Console(width=100, record=True, file=open(os.devnull, "w"))
    build_report(tmp_path, "full", console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text  # nothing cut: every cell whole
    rows = [line for line in text.splitlines() if line.startswith("│")]
    for run_id, record in runs.items():
        if record["status"] != "ok":
            continue
        ap = record["metrics"]["segm"]["AP"]
        (row,) = [r for r in rows if f" {ap:.2f} " in r]  # mask AP whole, one row per run
        method = record["config"]["method.name"]
        assert row.startswith(f"│ {method} ")
        assert f" {100 * record['params']['ratio']:.3f} " in row  # trainable %
        full = runs[f"full_{record['config']['model.image_size']}"]["metrics"]["segm"]["AP"]
        assert f" {ap - full:+.2f} " in row  # ΔAP against the full run at the same image size
        assert f" {record['efficiency']['peak_memory_bytes'] / 2**30:.1f} GiB " in row
    assert sum(r.split("│")[-2].strip() == "failed" for r in rows) == 2
    # the knobs share a column, with short names the caption spells out
    knob_cells = " ".join(r.split("│")[2].strip() for r in rows)
    for shown in ("r=16", "alpha=32", "tgt=attn_qkv", "per_block=2", "dim=64", "px=512", "px=1024"):
        assert shown in knob_cells
    said = " ".join(text.split())
    assert "knobs: per_block = adapters_per_block, dim = bottleneck, r = rank, tgt = targets, px = image_size" in said
    assert "★ on the Pareto front" in said and "ckpt size, backbone %, mem ×, time ×: in report.md and report.csv" in said
    # report.csv keeps every column under its full name, report.md every column of the table
    csv_rows = {row["run.id"]: row for row in read_csv(tmp_path / "report.csv")}
    assert len(csv_rows) == len(runs)
    lora = csv_rows["lora16_1024"]
    assert (lora["method.rank"], lora["method.targets"], lora["model.image_size"]) == (
        "16", '["attn_qkv", "attn_proj", "mlp"]', "1024")
    assert int(csv_rows["full_512"]["efficiency.checkpoint_bytes"]) == 420 * 2**20
    assert float(lora["baseline.step_time_ratio"]) == pytest.approx(0.66 / 0.91)
    md = (tmp_path / "report.md").read_text()
    assert "ckpt size" in md and "backbone %" in md and "time ×" in md and "adapters_per_block" in md
    # the command in a CI log (80 columns, as piped output has): the same 100-column table
    from peftseg.cli import common, report as report_cli

    monkeypatch.setattr(common.console, "width", 80)
    assert report_cli.main([str(tmp_path), "--baseline", "full"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100 and "…" not in out
    assert out.count(" ok ") == len(runs) - 2  # a row per ok run, its status whole


def test_report_notes_that_step_time_ratios_come_from_separate_runs(two_groups):
    build_report(two_groups, "full", Console(file=open(os.devnull, "w"), width=160))
    md = (two_groups / "report.md").read_text()
    assert "step-time ratios compare runs timed one after another" in md


def test_a_data_efficiency_sweep_gets_ap_against_training_images(tmp_path):
    import json

    for method, aps in (("full", (10.0, 25.0, 40.0)), ("lora", (14.0, 27.0, 36.0))):
        for n, ap in zip((10, 30, 100), aps):
            record = fake(tmp_path, f"{method}{n}", method=method, ap=ap, ratio=1.0 if method == "full" else 0.02,
                          train_subset=n)
            record["data"] = {"train_images": n, "train_images_available": 300, "train_subset": n, "subset_seed": 0}
            (tmp_path / f"{method}{n}" / "results.json").write_text(json.dumps(record))
    build_report(tmp_path, None, Console(file=open(os.devnull, "w"), width=160))
    from peftseg.report.collect import group_records, load_records
    from peftseg.report.plots import efficiency_lines

    (group,) = group_records(load_records(tmp_path))
    assert efficiency_lines(group) == {("full", ()): [(10, 10.0), (30, 25.0), (100, 40.0)],
                                       ("lora", ()): [(10, 14.0), (30, 27.0), (100, 36.0)]}  # one line per method
    picture = matplotlib.image.imread(tmp_path / "data_efficiency.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 600
    assert "![mask AP vs training images](data_efficiency.png)" in (tmp_path / "report.md").read_text()
    # one number of images only: no such picture
    other = tmp_path / "other"
    fake(other, "a", method="full")
    build_report(other, None, Console(file=open(os.devnull, "w"), width=160))
    assert not (other / "data_efficiency.png").exists()


def test_two_domains_of_one_dataset_are_two_groups_with_no_ratio_across(tmp_path):
    # what scripts/transfer.py writes: dataset=shapes upstream (default domain) and downstream
    up, down = {"domain": "default", "num_train": 200}, {"domain": "downstream", "num_train": 50}
    fake(tmp_path, "up/full", method="full", ap=40.0, ratio=1.0, data={**up, "cache_dir": "/a"})
    fake(tmp_path, "up/lora", ap=37.0, ratio=0.02, data={**up, "cache_dir": "/b"})  # a cache is not other data
    fake(tmp_path, "down/lora", ap=18.0, ratio=0.02, data=down)
    fake(tmp_path, "down/heads", method="heads", ap=12.0, ratio=0.3, data=down)
    out = io.StringIO()
    build_report(tmp_path, "full", Console(file=out, width=200))
    text = out.getvalue()
    from peftseg.report.collect import group_records, load_records

    groups = group_records(load_records(tmp_path))
    assert [(g.title, sorted(r.run.id for r in g.records)) for g in groups] == [
        ("vitdet_tiny · shapes (domain=default, num_train=200)", ["up/full", "up/lora"]),
        ("vitdet_tiny · shapes (domain=downstream, num_train=50)", ["down/heads", "down/lora"])]
    rows = {row["run.id"]: row for row in read_csv(tmp_path / "report.csv")}
    assert float(rows["up/lora"]["baseline.delta_mask_AP"]) == pytest.approx(-3.0)
    for other in ("down/lora", "down/heads"):  # never against the full run on the other domain's images
        assert rows[other]["baseline.run_id"] == "" and rows[other]["baseline.delta_mask_AP"] == ""
    assert "no successful `full` run for vitdet_tiny · shapes (domain=downstream, num_train=50)" in text
    assert "## vitdet_tiny · shapes (domain=downstream, num_train=50)" in (tmp_path / "report.md").read_text()
    assert len(list(tmp_path.glob("curves_*.png"))) in (0, 2)  # one per group if any (fake runs have no curves)


def test_a_baseline_trained_on_the_same_subset_and_image_size_or_a_dash(tmp_path):
    for n in (10, 100):
        fake(tmp_path, f"full{n}", method="full", ap=n / 2, ratio=1.0, data={"train_subset": n}, images=n)
    for n in (10, 30, 100):
        fake(tmp_path, f"lora{n}", ap=n / 2 + 1, ratio=0.02, data={"train_subset": n}, images=n)
    fake(tmp_path, "lora100_big", ap=60.0, ratio=0.02, data={"train_subset": 100}, images=100)
    record = json.loads((tmp_path / "lora100_big" / "results.json").read_text())
    record["config"]["model.image_size"] = 1024  # the others ran at the preset's size (none recorded)
    write_json(tmp_path / "lora100_big" / "results.json", record)
    out = io.StringIO()
    build_report(tmp_path, "full", Console(file=out, width=200))
    text = out.getvalue()
    rows = {row["run.id"]: row for row in read_csv(tmp_path / "report.csv")}
    assert rows["lora10"]["baseline.run_id"] == "full10"  # one group, one baseline per subset
    assert float(rows["lora10"]["baseline.delta_mask_AP"]) == pytest.approx(1.0)
    assert rows["lora100"]["baseline.run_id"] == "full100"
    assert rows["lora30"]["baseline.delta_mask_AP"] == "" and rows["lora100_big"]["baseline.delta_mask_AP"] == ""
    (note,) = [line for line in text.splitlines() if "have no successful `full` run" in line]
    assert note.startswith("note: 2 run(s)") and "lora30" in note and "lora100_big" in note
    (row30,) = [line for line in text.splitlines() if "│ 30 " in line]
    assert row30.count("—") >= 3  # ΔAP, time ×, mem ×


def test_the_pareto_front_is_among_runs_of_one_training_set_size(tmp_path):
    from peftseg.report.collect import front_ids, group_records, load_records

    for n, full_ap, lora_ap, heads_ap in ((300, 40.0, 38.0, 30.0), (10, 12.0, 14.0, 13.0)):
        fake(tmp_path, f"full{n}", method="full", ap=full_ap, ratio=1.0, data={"train_subset": n}, images=n)
        fake(tmp_path, f"lora{n}", ap=lora_ap, ratio=0.02, data={"train_subset": n}, images=n)
        fake(tmp_path, f"heads{n}", method="heads", ap=heads_ap, ratio=0.3, data={"train_subset": n}, images=n)
    (group,) = group_records(load_records(tmp_path))  # a data-efficiency sweep is one group
    front = {r.run.id for r in group.records if id(r) in front_ids(group)}
    # lora300 (2 %, 38 AP) would dominate every 10-image run; within its size lora10 leads
    assert front == {"full300", "lora300", "lora10"}
    out = io.StringIO()
    build_report(tmp_path, None, Console(file=out, width=200))
    starred = {line.split("│")[2].strip() + line.split("│")[1].strip() for line in out.getvalue().splitlines()
               if "★" in line}
    assert starred == {"300full", "300lora", "10lora"}
    assert_png(tmp_path / "pareto.png")


def test_the_fronts_of_two_training_set_sizes_differ_in_line_style_and_the_legend_names_each(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from peftseg.report.collect import group_records, load_records
    from peftseg.report.plots import write_plot

    for n, full_ap, lora_ap in ((300, 40.0, 38.0), (30, 15.0, 14.0)):  # a front of two runs at each size
        fake(tmp_path, f"full{n}", method="full", ap=full_ap, ratio=1.0, data={"train_subset": n}, images=n)
        fake(tmp_path, f"lora{n}", ap=lora_ap, ratio=0.02, data={"train_subset": n}, images=n)
    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure to look at
    write_plot(tmp_path / "pareto.png", group_records(load_records(tmp_path)))
    (ax, *_) = drawn[0].axes
    legend = {text.get_text(): handle for text, handle in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    sizes = {n: legend[f"Pareto front, {n} training images"].get_linestyle() for n in (300, 30)}
    assert sizes[300] != sizes[30]
    fronts = {line.get_linestyle(): sorted(line.get_ydata()) for line in ax.lines if line.get_color() == "black"}
    assert fronts == {sizes[300]: [38.0, 40.0], sizes[30]: [14.0, 15.0]}  # each line is its size's front
    monkeypatch.undo()
    plt.close(drawn[0])


def test_a_resumed_run_is_labelled_by_its_method_and_knobs_in_the_curves_and_the_pareto_key(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from peftseg.report.collect import group_records, load_records
    from peftseg.report.curves import write_group_curves
    from peftseg.report.plots import write_plot

    # a sweep of full and lora at two ranks; the rank-8 run was stopped and continued in a run of its own,
    # with more data-loader workers: neither the resume path nor the workers are what tells the runs apart
    fake(tmp_path, "0-full", method="full", ap=40.0, ratio=1.0)
    fake(tmp_path, "1-lora", rank=8, ap=37.0, ratio=0.02, status="interrupted")
    fake(tmp_path, "2-lora", rank=16, ap=38.0, ratio=0.04)
    fake(tmp_path, "resumed", rank=8, ap=37.5, ratio=0.02)
    for name, first, resume, workers in (("0-full", 0, "", 2), ("1-lora", 0, "", 2), ("2-lora", 0, "", 2),
                                         ("resumed", 4, str(tmp_path / "1-lora" / "model_0000003.pth"), 4)):
        record = json.loads((tmp_path / name / "results.json").read_text())
        record["config"].update({"train.resume": resume, "train.num_workers": workers})
        write_json(tmp_path / name / "results.json", record)
        (tmp_path / name / "metrics.json").write_text("".join(
            json.dumps({"iteration": i, "total_loss": 3.0 - i / 10, "lr": 1e-3}) + "\n" for i in range(first, 8)))
    (group,) = group_records(load_records(tmp_path))
    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figures to look at
    assert write_group_curves(tmp_path, group)
    legend = [t.get_text() for t in drawn[0].legends[0].get_texts()]
    assert legend == ["full", "lora rank=8 (interrupted)", "lora rank=8 (resumed)", "lora rank=16"]
    write_plot(tmp_path / "pareto.png", [group])
    key = "\n".join(t.get_text() for t in drawn[1].axes[0].texts)
    assert "1  full\n2  lora rank=8 (resumed)\n3  lora rank=16" in key  # the ok runs, numbered
    assert not any("resume=" in text or "num_workers" in text for text in [*legend, key])
    monkeypatch.undo()
    for fig in drawn:
        plt.close(fig)


def test_a_folder_of_linked_runs_is_reported_each_run_once_and_never_written_into(tmp_path):
    runs, mine = tmp_path / "runs", tmp_path / "mine"
    fake(runs, "full", method="full", ap=40.0, ratio=1.0)
    fake(runs, "lora", ap=37.0, ratio=0.02)
    mine.mkdir()
    for name, target in (("full", runs / "full"), ("lora", runs / "lora"), ("lora_again", runs / "lora"),
                         ("loop", mine), ("gone", runs / "deleted")):
        os.symlink(target, mine / name)
    out = io.StringIO()
    build_report(mine, "full", Console(file=out, width=1000))  # long tmp paths stay on one line
    text = out.getvalue()
    rows = read_csv(mine / "report.csv")
    assert sorted(row["run.id"] for row in rows) == ["full", "lora"]  # one row per run, whatever links to it
    assert float(next(r for r in rows if r["run.id"] == "lora")["baseline.delta_mask_AP"]) == pytest.approx(-3.0)
    (warning,) = [line for line in text.splitlines() if "skipping" in line]
    assert f"skipping {mine / 'gone'}: a symbolic link to {runs / 'deleted'}, which does not exist" in warning
    assert sorted(p.name for p in (runs / "lora").iterdir()) == ["results.json"]  # the runs got no report files
    # given a (link to a) run itself, the report would land among the run's files: refused, nothing written
    with pytest.raises(UserError, match="would be written inside the input folder .*runs/lora.*peftseg report "):
        build_report(mine / "lora", None, Console(file=io.StringIO()))
    assert sorted(p.name for p in (runs / "lora").iterdir()) == ["results.json"]
