"""Evaluation with detectron2's COCOEvaluator (segm + bbox AP)."""

from __future__ import annotations

from pathlib import Path

from detectron2.evaluation import COCOEvaluator, inference_on_dataset

from peftseg.data.loaders import test_loader


def evaluate(model, dataset_name: str, image_size: int, output_dir: Path, num_workers: int = 0) -> dict:
    # use_fast_impl=False: the fast COCOeval lives in detectron2's C++ extension, which
    # this install does not carry; pycocotools gives the same numbers.
    evaluator = COCOEvaluator(
        dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=str(output_dir),
        use_fast_impl=False,
    )
    loader = test_loader(dataset_name, image_size, model.input_format, num_workers)
    return dict(inference_on_dataset(model, loader, evaluator))
