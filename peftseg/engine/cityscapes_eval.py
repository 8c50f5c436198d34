"""Evaluation of `dataset=cityscapes`: COCO-style mask/box AP (COCOEvaluator, as every
dataset gets; recorded as metrics.segm / metrics.bbox) next to Cityscapes' own instance AP
(detectron2's CityscapesInstanceEvaluator over cityscapesScripts; metrics.cityscapes with
AP, the mean over IoU 0.5:0.95 and the 8 classes, and AP50)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
from detectron2.evaluation import CityscapesInstanceEvaluator, DatasetEvaluator, DatasetEvaluators


class _RenamedTasks(DatasetEvaluator):
    """Another evaluator's results under other task names, so that two evaluators that both
    report "segm" can run side by side (DatasetEvaluators refuses duplicate keys)."""

    def __init__(self, evaluator: DatasetEvaluator, names: dict[str, str]):
        self.evaluator, self.names = evaluator, names

    def reset(self):
        self.evaluator.reset()

    def process(self, inputs, outputs):
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        results = self.evaluator.evaluate()
        if results is None:  # ranks other than 0
            return None
        # plain floats (cityscapesScripts gives numpy ones); NaN stays NaN, the record nulls it
        return {self.names.get(task, task): {k: float(v) for k, v in values.items()}
                for task, values in results.items()}


class _NumpyWithIn1d:
    """numpy, plus the `in1d` that numpy 2.4 removed: np.isin of the flattened input, which is
    what in1d returned."""

    peftseg_compat = True

    def __getattr__(self, name):
        return getattr(numpy, name)

    @staticmethod
    def in1d(ar1, ar2, assume_unique=False, invert=False):
        return numpy.isin(numpy.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert)


def _plain(value):
    # what json cannot write: numpy scalars (numpy 2 returns them where numpy 1 gave ints),
    # and cityscapesScripts' own objects (serialised by their attributes, as it does itself)
    return value.item() if isinstance(value, numpy.generic) else value.__dict__


def _write_json(data, file_name: str) -> None:
    """cityscapesScripts' writeDict2JSON, numpy-2-safe, and with relative names (its
    "matches.json" debug dump) under the evaluator's prediction folder, not the cwd."""
    import os

    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval

    if not os.path.isabs(file_name):
        file_name = os.path.join(cs_eval.args.predictionPath, file_name)
    with open(file_name, "w") as f:
        json.dump(data, f, default=_plain, sort_keys=True, indent=4)


def _compat() -> None:
    """cityscapesScripts 2.3.0 (the newest release) predates numpy 2: it calls np.in1d (gone
    in numpy 2.4) and json-dumps numpy scalars. Only its evaluation module's names are
    replaced; numpy and the package's other modules stay as they are."""
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval

    if not hasattr(numpy, "in1d") and not getattr(cs_eval.np, "peftseg_compat", False):
        cs_eval.np = _NumpyWithIn1d()
    cs_eval.writeDict2JSON = _write_json


def cityscapes_evaluator(dataset_name: str, output_dir: Path, coco: DatasetEvaluator) -> DatasetEvaluator:
    _compat()
    return DatasetEvaluators([
        coco, _RenamedTasks(CityscapesInstanceEvaluator(dataset_name), {"segm": "cityscapes"})])
