"""Load pretrained weights through detectron2's checkpointer and say what matched.

DetectionCheckpointer already handles local paths, URLs (http(s)://, detectron2://),
Detectron/Caffe2 .pkl files and `?matching_heuristics=True` name alignment; we only
add the checks a user needs: the file exists, and at least one tensor was used.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from urllib.parse import urlparse

import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer

from peftseg.errors import UserError

log = logging.getLogger(__name__)

_SHOWN = 5  # names listed per category in the log line


@dataclass(frozen=True)
class LoadReport:
    source: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]  # includes shape mismatches, which stay at their init
    unexpected: tuple[str, ...]
    shape_mismatch: tuple[str, ...]

    def summary(self) -> str:
        def few(names: tuple[str, ...]) -> str:
            more = f", … +{len(names) - _SHOWN}" if len(names) > _SHOWN else ""
            return f" ({', '.join(names[:_SHOWN])}{more})" if names else ""

        return (
            f"weights {self.source}: loaded {len(self.loaded)}, "
            f"missing {len(self.missing)}{few(self.missing)}, "
            f"unexpected {len(self.unexpected)}{few(self.unexpected)}, "
            f"shape mismatch {len(self.shape_mismatch)}{few(self.shape_mismatch)}"
        )


class _ReportingCheckpointer(DetectionCheckpointer):
    """Keeps the incompatible-keys result that `load` only logs."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _is_url(source: str) -> bool:
    return "://" in source


def load_weights(model: nn.Module, source: str) -> LoadReport:
    """Load `source` into `model` in place (non-strict); raise UserError if nothing matched."""
    if not _is_url(source):
        local = urlparse(source)._replace(query="").geturl()  # allow ?matching_heuristics=True
        if not os.path.isfile(local):
            raise UserError(
                f"model.weights={source!r} does not exist (looked for the file {os.path.abspath(local)}); "
                "point model.weights at a checkpoint file or URL, or set model.weights='' "
                "to start from random initialisation."
            )
    ckpt = _ReportingCheckpointer(model)
    try:
        ckpt.load(source, checkpointables=[])
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, AssertionError) as e:
        raise UserError(
            f"model.weights={source!r} could not be read as a checkpoint ({type(e).__name__}: {e}); "
            "give a detectron2/PyTorch checkpoint (.pth/.pkl) that is reachable from this machine."
        ) from e
    inc = ckpt.incompatible
    missing = set(inc.missing_keys)
    report = LoadReport(
        source=source,
        loaded=tuple(k for k in model.state_dict() if k not in missing),
        missing=tuple(inc.missing_keys),
        unexpected=tuple(inc.unexpected_keys),
        shape_mismatch=tuple(k for k, *_ in inc.incorrect_shapes),
    )
    if not report.loaded:
        raise UserError(
            f"model.weights={source!r} matched no parameter of the model "
            f"({len(report.unexpected)} checkpoint keys such as {list(report.unexpected[:3])} "
            f"have no counterpart, and shape mismatches: {len(report.shape_mismatch)}); use a "
            "checkpoint of the same model family, or append '?matching_heuristics=True' for a "
            "backbone-only checkpoint (e.g. MAE ImageNet weights) whose names lack the "
            "'backbone.net.' prefix."
        )
    log.info(report.summary())
    return report
