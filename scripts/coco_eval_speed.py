#!/usr/bin/env python
"""COCO evaluation time, pycocotools' COCOeval against the fast one peftseg installs behind
detectron2's COCOEvaluator (faster-coco-eval), in the same run, with their AP side by side.

    .venv/bin/python scripts/coco_eval_speed.py                 # 500 images, ~20 GT, 100 dets each
    .venv/bin/python scripts/coco_eval_speed.py --images 50 --json docs/benchmarks/coco_eval.json

The val set is synthetic (seeded): polygon instances of 5 classes on 640x480 images, and
detections as a detector leaves them: jittered copies of most ground-truth instances (some
with the wrong class), then low-scored false positives up to the per-image count, boxes and
RLE masks, as detectron2's COCOEvaluator hands them to COCOeval. Both implementations run
through detectron2's own `_evaluate_predictions_on_coco` and `_derive_coco_results` (what
COCOEvaluator calls), so the timing covers loadRes + evaluate + accumulate + summarize.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("circle", "square", "triangle", "star", "ring")
WIDTH, HEIGHT = 640, 480


def _polygon(rng, cx, cy, rx, ry, sides):
    angles = np.sort(rng.uniform(0, 2 * math.pi, sides))
    radii = rng.uniform(0.7, 1.0, sides)
    xs = np.clip(cx + rx * radii * np.cos(angles), 0, WIDTH - 1)
    ys = np.clip(cy + ry * radii * np.sin(angles), 0, HEIGHT - 1)
    return [float(v) for xy in zip(xs, ys) for v in xy]


def _bbox(poly):
    xs, ys = poly[0::2], poly[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def synthetic_coco(num_images=500, instances=20, detections=100, seed=0, crowd_every=0):
    """(ground-truth dataset dict, detections list) in COCO's json layouts. `crowd_every`>0
    marks every n-th ground-truth instance iscrowd=1 (evaluated as 'ignore' regions)."""
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT, "file_name": f"{image_id:06d}.png"})
        n_gt = int(rng.integers(max(1, instances // 2), instances * 3 // 2 + 1))
        gts = []
        for _ in range(n_gt):
            # sizes spread over COCO's small / medium / large area ranges
            r = float(np.exp(rng.uniform(np.log(6), np.log(150))))
            cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
            poly = _polygon(rng, cx, cy, r, r * rng.uniform(0.6, 1.4), int(rng.integers(5, 12)))
            cat = int(rng.integers(1, len(CLASSES) + 1))
            rle = mask_util.frPyObjects([poly], HEIGHT, WIDTH)
            area = float(mask_util.area(mask_util.merge(rle)))
            if area < 1:
                continue
            ann_id = len(anns) + 1
            crowd = int(crowd_every > 0 and ann_id % crowd_every == 0)
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": [poly],
                         "area": area, "bbox": _bbox(poly), "iscrowd": crowd})
            gts.append((poly, cx, cy, r, cat))
        image_dets = []
        for gt_poly, cx, cy, r, cat in gts:
            if rng.random() < 0.15:
                continue  # missed
            if rng.random() < 0.1:
                cat = int(rng.integers(1, len(CLASSES) + 1))
            # the instance, shifted and scaled by up to ~20 %: IoUs spread over 0.5-0.95
            quality = rng.uniform(0.0, 0.2)
            s = 1 + rng.normal(0, quality)
            dx, dy = rng.normal(0, quality * r, 2)
            xs = np.clip((np.array(gt_poly[0::2]) - cx) * s + cx + dx, 0, WIDTH - 1)
            ys = np.clip((np.array(gt_poly[1::2]) - cy) * s + cy + dy, 0, HEIGHT - 1)
            poly = [float(v) for xy in zip(xs, ys) for v in xy]
            image_dets.append((poly, cat, float(np.clip(1 - 3 * quality + rng.normal(0, 0.1), 0.05, 1))))
        while len(image_dets) < detections:
            r = float(np.exp(rng.uniform(np.log(4), np.log(120))))
            poly = _polygon(rng, rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), r, r, int(rng.integers(5, 12)))
            image_dets.append((poly, int(rng.integers(1, len(CLASSES) + 1)), float(rng.uniform(0.0, 0.5))))
        for poly, cat, score in image_dets[:detections]:
            rle = mask_util.merge(mask_util.frPyObjects([poly], HEIGHT, WIDTH))
            rle["counts"] = rle["counts"].decode("ascii")  # as COCOEvaluator's instances_to_coco_json
            dets.append({"image_id": image_id, "category_id": cat, "bbox": _bbox(poly), "score": score,
                         "segmentation": rle})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    return gt, dets


def coco_api(gt: dict):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = gt
        api.createIndex()
    return api


def evaluate(gt_api, dets, task: str, cocoeval_cls) -> tuple[dict, float]:
    """detectron2's COCOEvaluator metrics for `task` with `cocoeval_cls`, and seconds taken."""
    from detectron2.evaluation.coco_evaluation import COCOEvaluator, _evaluate_predictions_on_coco

    derive = COCOEvaluator._derive_coco_results
    holder = type("E", (), {"_logger": logging.getLogger("coco_eval_speed")})()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = _evaluate_predictions_on_coco(gt_api, dets, task, cocoeval_fn=cocoeval_cls)
    seconds = time.perf_counter() - t0
    return derive(holder, ev, task, class_names=list(CLASSES)), seconds


def max_metric_diff(a: dict, b: dict) -> float:
    """largest |a-b| over the metrics (AP in percent, as detectron2 reports it); NaN (a class
    with no ground truth) must be NaN in both."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    worst = 0.0
    for k in a:
        if math.isnan(a[k]) or math.isnan(b[k]):
            if not (math.isnan(a[k]) and math.isnan(b[k])):
                return math.inf
            continue
        worst = max(worst, abs(a[k] - b[k]))
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--instances", type=int, default=20, help="mean ground-truth instances per image")
    p.add_argument("--detections", type=int, default=100, help="detections per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    sys.path.insert(0, str(ROOT))
    from pycocotools.cocoeval import COCOeval

    from peftseg.engine.coco_eval import install_fast_cocoeval
    from detectron2.evaluation import coco_evaluation

    if not install_fast_cocoeval():
        print("no fast COCOeval available (pip install faster-coco-eval)")
        return 1
    fast = coco_evaluation.COCOeval_opt
    t0 = time.perf_counter()
    gt, dets = synthetic_coco(args.images, args.instances, args.detections, args.seed)
    print(f"synthetic val set: {args.images} images, {len(gt['annotations'])} instances, "
          f"{len(dets)} detections ({time.perf_counter() - t0:.1f} s to make)")
    gt_api = coco_api(gt)
    rows = {}
    for task in ("bbox", "segm"):
        ref, t_ref = evaluate(gt_api, dets, task, COCOeval)
        got, t_fast = evaluate(gt_api, dets, task, fast)
        rows[task] = {"pycocotools_s": t_ref, "fast_s": t_fast, "speedup": t_ref / t_fast,
                      "max_abs_diff_AP": max_metric_diff(ref, got), "AP": ref["AP"], "AP_fast": got["AP"]}
    total_ref = sum(r["pycocotools_s"] for r in rows.values())
    total_fast = sum(r["fast_s"] for r in rows.values())
    rows["total"] = {"pycocotools_s": total_ref, "fast_s": total_fast, "speedup": total_ref / total_fast}
    print(f"{'task':6} {'pycocotools s':>14} {'fast s':>8} {'speed-up':>9} {'AP (ref / fast)':>18} {'max |dAP|':>10}")
    for task, r in rows.items():
        ap = f"{r['AP']:.3f} / {r['AP_fast']:.3f}" if "AP" in r else ""
        diff = f"{r['max_abs_diff_AP']:.2g}" if "max_abs_diff_AP" in r else ""
        print(f"{task:6} {r['pycocotools_s']:14.2f} {r['fast_s']:8.2f} {r['speedup']:8.1f}x {ap:>18} {diff:>10}")
    print(f"fast implementation: {fast.__module__}.{fast.__qualname__}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"images": args.images, "instances": len(gt["annotations"]),
                                         "detections": len(dets), "rows": rows}, indent=2))
    worst = max(r.get("max_abs_diff_AP", 0.0) for r in rows.values())
    return 0 if worst <= 1e-4 * 100 else 2  # AP is in percent: 1e-4 of AP = 1e-2 points


if __name__ == "__main__":
    sys.exit(main())
