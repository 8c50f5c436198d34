"""`peftseg visualize <run dir> [n=8] [score_thresh=0.5] [output=<dir>]`.

For the first n validation images of a run: ground truth left, the run's predictions
right, one PNG per image, so a reader sees what the run's mask AP means. Predictions come
from the run's final evaluation (`eval/coco_instances_results.json`, written by
detectron2's COCOEvaluator), so nothing is recomputed; both panels are drawn by
detectron2's Visualizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from peftseg.cli.common import console as default_console, print_text, split_args, wants_help
from peftseg.errors import UserError

EVAL_RESULTS = Path("eval") / "coco_instances_results.json"
OUT_DIR = "visualize"
MIN_PANEL_PX = 512  # long side of each panel, at least


def parse_args(argv: list[str]) -> tuple[Path, int, float, Path | None]:
    options, _, (run_dir,) = split_args(argv, "visualize", ("n", "score_thresh", "output"), overrides=False,
                                        positional=1, example="outputs/<date>/<time> n=8")
    try:
        n = int(options.get("n", 8))
        thresh = float(options.get("score_thresh", 0.5))
    except ValueError:
        raise UserError("n must be a whole number and score_thresh a number, e.g. n=8 score_thresh=0.5.") from None
    if n < 1 or not 0.0 <= thresh <= 1.0:
        raise UserError(f"n={n} must be >= 1 and score_thresh={thresh} in [0, 1].")
    return Path(run_dir), n, thresh, Path(options["output"]) if "output" in options else None


def run_config(run_dir: Path) -> tuple[dict, list[str]]:
    """The run's resolved config and class names, from its checkpoint's metadata."""
    from peftseg.checkpoint.files import read_checkpoint

    meta = read_checkpoint(run_dir)[1]["peftseg"]  # safe loading; UserError if not one of ours
    return meta["config"], list(meta["class_names"])


def _predictions_by_image(path: Path) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = {}
    for det in json.loads(path.read_text()):
        by_image.setdefault(det["image_id"], []).append(det)
    return by_image


def _instances(dets: list[dict], height: int, width: int, id_map: dict[int, int], thresh: float):
    """detectron2 Instances from COCO-format results (xywh boxes, RLE masks, dataset ids)."""
    import numpy as np
    import pycocotools.mask as mask_util
    import torch
    from detectron2.structures import Boxes, BoxMode, Instances

    dets = sorted((d for d in dets if d["score"] >= thresh), key=lambda d: -d["score"])
    inst = Instances((height, width))
    boxes = [BoxMode.convert(d["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for d in dets]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor([d["score"] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([id_map[d["category_id"]] for d in dets], dtype=torch.int64)
    masks = [mask_util.decode(d["segmentation"]) for d in dets if "segmentation" in d]
    if len(masks) == len(dets):
        inst.pred_masks = torch.from_numpy(np.stack(masks).astype(bool) if masks else np.zeros((0, height, width), bool))
    return inst


def visualize(run_dir: Path, n: int = 8, score_thresh: float = 0.5, output: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from omegaconf import OmegaConf

    from peftseg.data import register_splits
    from peftseg.data.images import read_image_checked
    from peftseg.io.atomic import write_atomic_with
    from peftseg.io.output_guard import check_targets, distinct_names, output_dir

    results = run_dir / EVAL_RESULTS
    if not results.is_file():
        raise UserError(f"{results} does not exist: `peftseg visualize` draws a run's final evaluation, so give "
                        "the directory of a run that finished training and evaluation (it has eval/).")
    config, _ = run_config(run_dir)
    splits = register_splits(OmegaConf.create(config["dataset"]))
    metadata = MetadataCatalog.get(splits.val)
    id_map = metadata.thing_dataset_id_to_contiguous_id
    preds = _predictions_by_image(results)
    output = output or run_dir / OUT_DIR
    records = DatasetCatalog.get(splits.val)[:n]
    # invariant 2 (peftseg.io.output_guard): not over the val images, the run's own files or a link
    images = [Path(r["file_name"]) for r in records]
    names = distinct_names(images, ".png")
    image_folders = sorted({str(p.parent) for p in images})
    output_dir(output, inputs=[Path(f) for f in image_folders], what="output=")
    check_targets([output / name for name in names.values()], images, what="output=")
    written = []
    for record in records:
        try:  # the one reader (data/images.py): the checks training applied to these images
            image = read_image_checked(record["file_name"], "RGB")
        except ValueError as e:
            raise UserError(f"validation image {record['file_name']} {e}; fix or replace it.") from None
        h, w = image.shape[:2]
        # Small images are drawn enlarged (by the Visualizer, which sizes its labels to the
        # output) so class names stay readable; the figure then shows them pixel for pixel.
        scale = max(1.0, MIN_PANEL_PX / max(h, w))
        gt = Visualizer(image, metadata, scale=scale).draw_dataset_dict(record).get_image()
        inst = _instances(preds.get(record["image_id"], []), h, w, id_map, score_thresh)
        pred = Visualizer(image, metadata, scale=scale, instance_mode=ColorMode.IMAGE).draw_instance_predictions(
            inst).get_image()
        ph, pw = gt.shape[:2]
        fig, axes = plt.subplots(1, 2, figsize=(2 * pw / 100 + 0.4, ph / 100 + 0.7), dpi=100)
        for ax, picture, title in (
            (axes[0], gt, f"ground truth ({_count(len(record.get('annotations', [])), 'instance')})"),
            (axes[1], pred, f"predictions, score ≥ {score_thresh:g} ({len(inst)})"),
        ):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=11)
            ax.axis("off")
        fig.suptitle(f"{Path(record['file_name']).name} · {config['model']['name']} + {config['method']['name']}",
                     fontsize=11)
        fig.tight_layout()
        target = output / names[Path(record["file_name"])]
        write_atomic_with(target, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)
        written.append(target)
    return written


def main(argv: list[str], console: Console | None = None) -> int:
    if wants_help(argv):
        print_text(__doc__.strip())
        return 0
    console = console or default_console
    run_dir, n, thresh, output = parse_args(argv)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give a run directory such as outputs/<date>/<time>.")
    from peftseg.io.output_guard import write_errors

    with write_errors(output or run_dir / OUT_DIR):
        written = visualize(run_dir, n, thresh, output)
    console.print(f"wrote {len(written)} ground truth | prediction pictures to {written[0].parent if written else '-'}",
                  highlight=False)
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
