"""Reading tensor files without running code from them.

Every checkpoint, weight file and resume file goes through here:

- `.safetensors`: safetensors (tensors only, by construction);
- `.pkl` (Detectron/Caffe2 and detectron2 model-zoo weights, pycls): a restricted
  unpickler that admits plain containers and numpy arrays only;
- anything else (`.pth`, `.pyth`, `.pt`): `torch.load(weights_only=True)`, torch's own
  restricted unpickler (tensors, containers, primitive types).

A file that needs anything more (a class, a function: what a crafted pickle uses to run
code) is refused with a UserError naming the file and the global it asked for. There is
no switch to turn this off: convert such a file once, in a process you trust, to
safetensors (`safetensors.torch.save_file(state_dict, "weights.safetensors")`).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

from peftseg.errors import UserError

# What numpy arrays and the containers of model-zoo .pkl files are rebuilt from.
# pickle.Unpickler is subclassed (the documented way to restrict globals) rather than
# parsed by hand: the stdlib already does the opcode work, we only decide which names
# a file may import.
_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol-2 pickles store array bytes as latin-1 text
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # numpy>=1.25 may name a dtype's class (numpy.dtypes.Float32DType)
        if (module, name) in _PICKLE_ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise _RefusedGlobal(f"{module}.{name}")


def _refused(path: Path, what: str, name: str) -> UserError:
    return UserError(
        f"{what} {path} was not loaded: it is a pickle that asks for {name}, which is not a tensor, "
        "array or plain container; loading it could run code from the file, so peftseg refuses it. "
        "If you trust the file's origin, convert it once to safetensors in a separate Python session "
        "(load it there, then `safetensors.torch.save_file(state_dict, 'weights.safetensors')`) and "
        "point at the .safetensors file."
    )


def _unreadable(path: Path, what: str, e: BaseException) -> UserError:
    return UserError(
        f"could not read {what} {path} ({type(e).__name__}: {e}); it is damaged, truncated or not a "
        "tensor file — give a .pth/.pkl/.safetensors file written by PyTorch, detectron2 or peftseg."
    )


def load_pickle_arrays(path: str | os.PathLike, what: str = "weights file") -> Any:
    """A .pkl weights file of numpy arrays in (nested) dicts; latin-1 for Python 2 pickles."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise _refused(path, what, e.name) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise _unreadable(path, what, e) from e


_TORCH_GLOBAL = re.compile(r"(?:GLOBAL|global)\s+([\w.]+)")


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True, its refusals turned into a UserError naming the global."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = _TORCH_GLOBAL.search(str(e))
        if m or "Weights only load failed" in str(e):
            raise _refused(path, what, m.group(1) if m else "a global that is not allowed") from None
        raise _unreadable(path, what, e) from e
    except Exception as e:  # torch raises a zoo of types for a truncated or foreign file
        raise _unreadable(path, what, e) from e


def load_safetensors(path: str | os.PathLike, what: str = "weights file") -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise _unreadable(path, what, e) from e


def load_any(path: str | os.PathLike, what: str = "weights file") -> Any:
    """Whichever of the three the file's suffix says it is."""
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path, what)[0]
    if suffix == ".pkl":
        return load_pickle_arrays(path, what)
    return load_torch(path, what)
