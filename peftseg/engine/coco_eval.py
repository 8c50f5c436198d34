"""The fast COCOeval behind detectron2's COCOEvaluator, without detectron2's C++ extension.

Detectron2's COCOEvaluator runs `COCOeval_opt` (its `_C` extension's C++ evaluate and
accumulate) when `use_fast_impl=True`; when `_C` is not built, as in this install, the
module binds that name to pycocotools' pure-Python COCOeval and the evaluator falls back to
it, slow on a 5,000-image val set. faster-coco-eval (a maintained wheel) implements the
same two steps in C++ with pycocotools' API and numbers, so it fills exactly that slot:
detectron2 keeps its own result conversion, logging and metric tables.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _faster_cocoeval_class():
    """faster-coco-eval's COCOeval, quiet: detectron2 logs its own summary of the numbers."""
    from faster_coco_eval import COCOeval_faster

    class FasterCOCOeval(COCOeval_faster):
        def __init__(self, cocoGt=None, cocoDt=None, iouType="segm", **kwargs):
            kwargs.setdefault("print_function", logger.debug)
            super().__init__(cocoGt, cocoDt, iouType, **kwargs)

    return FasterCOCOeval


def install_fast_cocoeval() -> bool:
    """Make detectron2's COCOEvaluator(use_fast_impl=True) run a compiled COCOeval; returns
    whether one is available. Detectron2's own (a built `_C`) is kept when present."""
    from detectron2.evaluation import coco_evaluation

    if coco_evaluation.COCOeval_opt is not coco_evaluation.COCOeval:
        return True  # detectron2's compiled one, or ours from an earlier call
    try:
        fast = _faster_cocoeval_class()
    except ImportError:
        logger.warning(
            "faster-coco-eval is not installed: COCO evaluation runs pycocotools' pure-Python "
            "COCOeval (same numbers, several times slower); `pip install faster-coco-eval` speeds it up."
        )
        return False
    coco_evaluation.COCOeval_opt = fast
    return True
