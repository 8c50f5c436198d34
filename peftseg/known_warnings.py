"""Third-party warnings that every command would print and no user can act on, silenced
where the CLI starts.

Each is matched by its category, the start of its message and the module it is attributed
to (the library that issues it), so the same words from anywhere else, your own code
included, still show, and so does every other warning. Installed by the entry point only
(`peftseg.cli.main`, and a training task a launcher starts elsewhere): importing peftseg as
a library changes no global filter.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    category: type[Warning]
    message: str  # regex, matched at the start of the message
    module: str  # regex, matched at the start of the module the warning is attributed to
    source: str  # who triggers it and why it is harmless here


KNOWN: tuple[Known, ...] = (
    Known(UserWarning, r"Failed to load the CUDA extension: .*check if ninja is available", r"peft\.tuners\.boft\.",
          "peft's BOFT tries to build its CUDA kernel for every layer it wraps; without it (CPU) method=boft "
          "runs its PyTorch path, and refuses method.butterfly_factor > 1, the one setting the kernel serves"),
    Known(UserWarning, r"Setting boft_n_butterfly_factor to 1", r"peft\.tuners\.boft\.",
          "the same fallback of peft's BOFT; method=boft refuses a butterfly_factor it would override"),
    Known(UserWarning, r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing "
          r"argument", r"torch\.functional\Z",
          "detectron2's anchor generator and ViT position code call torch.meshgrid without indexing="),
    Known(FutureWarning, r"`torch\.jit\.\w+` is deprecated", r"torch\.jit\.",
          "detectron2 scripts its box coders at import; export=torchscript traces, saves and loads TorchScript"),
    Known(FutureWarning, r"Importing from timm\.models\.\w+ is deprecated", r"timm\.models\.",
          "detectron2's ViT, Swin and MViT blocks import timm.models.layers"),
    Known(FutureWarning, r"`torch\.cuda\.amp\.\w+\(args\.\.\.\)` is deprecated", r"detectron2\.",
          "detectron2's AMPTrainer uses torch.cuda.amp (train.amp=true on CUDA)"),
    Known(DeprecationWarning, r"The 'warn' method is deprecated", r"detectron2\.",
          "detectron2's COCO evaluator calls logger.warn"),
    Known(DeprecationWarning, r"__array__ implementation doesn't accept a copy keyword", r"(detectron2|pycocotools)\.",
          "numpy 2 on the mask encoding of detectron2 and pycocotools"),
    Known(UserWarning, r"pkg_resources is deprecated as an API", r"detectron2\.",
          "detectron2.model_zoo imports pkg_resources (setuptools >= 80 warns)"),
)

# Log records (not warnings) that libraries print through their own handlers: logger -> message start
KNOWN_LOG_RECORDS = {
    # detectron2's ROI pooler asks torch.fx whether it is tracing; torch answers with this, once
    "torch.fx._symbolic_trace": "is_fx_tracing will return true for both fx.symbolic_trace and torch.export",
}


class _DropKnownRecords(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def install() -> None:
    """Silence KNOWN and KNOWN_LOG_RECORDS in this process (idempotent)."""
    for known in KNOWN:
        # filterwarnings replaces an identical filter, so a second call adds nothing
        warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)
    for name, start in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownRecords) and f.start == start for f in logger.filters):
            logger.addFilter(_DropKnownRecords(start))
