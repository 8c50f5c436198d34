"""Evaluation with the evaluator the dataset declares (detectron2's `evaluator_type`
convention in MetadataCatalog): COCOEvaluator (segm + bbox AP) for COCO-format data."""

from __future__ import annotations

from pathlib import Path

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, inference_on_dataset

from peftseg.data.loading.loaders import test_loader
from peftseg.engine.precision import autocast
from peftseg.errors import UserError


def _coco(dataset_name: str, output_dir: Path, fast: bool = True) -> DatasetEvaluator:
    # the fast COCOeval lives in detectron2's C++ extension, which this install does not
    # carry; faster-coco-eval takes its place (same numbers), else pycocotools runs
    from peftseg.engine.coco_eval import install_fast_cocoeval

    return COCOEvaluator(
        dataset_name, tasks=("segm", "bbox"), distributed=True, output_dir=str(output_dir),
        use_fast_impl=fast and install_fast_cocoeval(),
        # a dataset registered without a json (its own lacks iscrowd/area) is converted per
        # evaluation: never reuse a conversion an earlier run left in a reused eval/ folder
        allow_cached_coco=False,
    )


def _cityscapes(dataset_name: str, output_dir: Path) -> DatasetEvaluator:
    from peftseg.engine.cityscapes_eval import cityscapes_evaluator  # cityscapesScripts: lazily

    # detectron2's Cityscapes loader names images by file name; faster-coco-eval's compiled
    # dataset takes numeric image ids only, so these COCO-style numbers come from pycocotools
    return cityscapes_evaluator(dataset_name, output_dir, _coco(dataset_name, output_dir, fast=False))


EVALUATORS = {"coco": _coco, "cityscapes_instance": _cityscapes}


def build_evaluator(dataset_name: str, output_dir: Path) -> DatasetEvaluator:
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if kind not in EVALUATORS:
        raise UserError(
            f"dataset {dataset_name!r} declares evaluator_type={kind!r}, for which peftseg has no "
            f"evaluator; the evaluators it has are: {', '.join(EVALUATORS)}."
        )
    return EVALUATORS[kind](dataset_name, output_dir)


def evaluate(model, dataset_name: str, image_size: int, output_dir: Path, num_workers: int = 0) -> dict:
    evaluator = build_evaluator(dataset_name, output_dir)
    loader = test_loader(dataset_name, image_size, model.input_format, num_workers)
    device = next(model.parameters()).device
    with autocast(model, device):  # a model whose frozen base is stored bf16 runs only so
        return dict(inference_on_dataset(model, loader, evaluator))
