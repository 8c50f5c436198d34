"""Which implementation runs multi-scale deformable attention: `model.deform_attn_impl`.

- `pytorch`: the family's grid_sample path (runs anywhere; the reference).
- `triton`: the Triton kernels of models/_msda_triton.py (forward + backward); CUDA, or the
  CPU under TRITON_INTERPRET=1 (tests). Anywhere else, or when the kernels fail to compile,
  the PyTorch path runs instead, with one warning.
- `auto`: Triton on CUDA only once a GPU measurement (scripts/gpu_check.py: max difference
  <= 1e-4 and forward + backward faster than grid_sample at the maskdino encoder's shapes)
  has shown it correct and faster. No GPU run has happened yet, so `auto` is PyTorch
  everywhere until TRITON_MEASURED_FASTER is set from such a measurement.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

# the choices of model.deform_attn_impl; the families' config checks import this module, so it
# imports torch only where it runs a kernel
IMPLS = ("auto", "triton", "pytorch")

# set to True only from a scripts/gpu_check.py table that shows the kernel correct and faster
TRITON_MEASURED_FASTER = False

_warned: set[str] = set()
_failed: set[str] = set()  # devices ("cuda", "cpu") where the kernels failed to compile/run


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(impl: str, device: torch.device) -> str:
    """The implementation `impl` runs as on `device`: "triton" or "pytorch"."""
    if impl == "pytorch":
        return "pytorch"
    if impl == "auto":
        return "triton" if device.type == "cuda" and TRITON_MEASURED_FASTER else "pytorch"
    if device.type != "cuda" and not _interpreting():
        _warn_once("device", f"model.deform_attn_impl=triton needs a CUDA device (the tensors are on "
                             f"{device.type}); deformable attention runs the PyTorch path instead.")
        return "pytorch"
    if device.type in _failed:
        return "pytorch"
    return "triton"


def ms_deform_attn(impl: str, pytorch_fn: Callable, value: torch.Tensor, shapes, locations: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """Deformable sampling as `pytorch_fn(value, shapes, locations, weights)` computes it (value
    (B, S, heads, d), locations (B, Q, heads, levels, points, 2) in [0, 1], weights
    (B, Q, heads, levels, points) -> (B, Q, heads * d)), by the implementation `impl` picks."""
    import torch

    if resolve(impl, value.device) == "triton":
        try:
            kernels = importlib.import_module("peftseg.models._msda_triton")
            return kernels.ms_deform_attn(value, shapes, locations, weights)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # compile errors (triton's own types, unsupported GPU, no triton)
            _failed.add(value.device.type)
            _warn_once("compile", f"the Triton deformable-attention kernels failed ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); running the PyTorch path "
                                  "instead (model.deform_attn_impl=pytorch silences this).")
    return pytorch_fn(value, shapes, locations, weights)


def set_impl(model: torch.nn.Module, impl: str, module_type: type) -> int:
    """Set `impl` on every `module_type` (a deformable-attention module with an `impl`
    attribute) in `model`; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, module_type):
            m.impl = impl
            n += 1
    return n
