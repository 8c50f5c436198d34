"""`train.compile=true`: the model's transformer blocks compiled with torch.compile (inductor,
on the CPU and on CUDA) for the run's training steps and evaluations.

What is compiled: every module the family lists in `FamilyMap.checkpoint_blocks` (each
transformer block / encoder or decoder layer, wherever it sits), not the whole model.
detectron2's meta-architectures build `Instances`, sample proposals, match targets and paste
masks in Python, with shapes that depend on the data: dynamo would break the graph at each of
those and recompile whenever a batch has another number of boxes. The blocks are pure tensor
functions of a fixed structure, where most of a step's time goes, and identical blocks share one
compiled graph (dynamo inlines nn.Modules, so their parameters are graph inputs, not constants).

Random numbers: inductor draws dropout and drop-path masks from its own generator, so where a
method or model drops (mona's dropout, model.drop_path_rate) a compiled run's masks, and so its
losses, differ from an eager run's of the same seed; everything else agrees within float rounding.

`nn.Module.compile()` compiles each block in place: the module tree, and so the state_dict keys
of every checkpoint, stay those of an uncompiled run (a `torch.compile(module)` wrapper would
prefix them with `_orig_mod.`). Hooks a method registers on a block still run inside it.

Refused by name: multi-process runs (at compose time, TrainConfig: compiled blocks inside DDP's
bucketed all-reduce are not verified here), a family that lists no blocks, and, on the CPU, a
machine without a C++ compiler (inductor writes C++ kernels and builds them): one paragraph
before the model is built, not a traceback at the first step.
"""

from __future__ import annotations

import os
import shutil

import torch.nn as nn

from peftseg.errors import UserError

BACKEND = "inductor"


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with ($CXX, else g++/c++/clang++), or None."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def refuse(cfg, device_type: str) -> None:
    """train.compile=true where it cannot work: one paragraph naming the fix (train.compile=false)."""
    if not cfg.train.compile:
        return
    fix = "Run with train.compile=false (eager PyTorch, the same training)"
    if device_type == "cpu" and cpp_compiler() is None:
        raise UserError(
            "train.compile=true on the CPU needs a C++ compiler: torch.compile's inductor backend writes C++ kernels "
            "and builds them, and none of $CXX, g++, c++ or clang++ is on PATH. Install one (e.g. "
            f"`apt-get install g++`) or set CXX to its path. {fix}.")


def compile_blocks(model: nn.Module, backend: str = BACKEND) -> int:
    """Compile (in place) every block the family lists; returns how many. Refuses a family with none.
    `backend`: inductor for runs; scripts/gpu_check.py --quick exercises the same capture with
    dynamo's eager backend, which compiles nothing."""
    from peftseg.build.activation_checkpointing import checkpoint_block_names
    from peftseg.models import family_of

    names = checkpoint_block_names(model)
    if not names:
        raise UserError(
            f"train.compile=true compiles the model's transformer blocks, and model family "
            f"{family_of(model).name!r} lists none (its FamilyMap.checkpoint_blocks is empty). Run with "
            "train.compile=false.")
    from peftseg.compat import allow_recompiles

    # each block may differ from its neighbours in constants (its drop-path rate, its attention
    # window), and each runs in training, in evaluation and without grad: room for all of them
    allow_recompiles(4 * len(names) + 8)
    for name in names:
        model.get_submodule(name).compile(backend=backend)
    return len(names)
