"""What a checkpoint was made with, and reading it with today's libraries.

A run records its library versions (peftseg.environment.versions) in its results.json and, since
the lock, in its checkpoints' metadata too. Loading a checkpoint:
- says in one warning line when torch, peft, transformers or Detectron2 differ from the record;
- converts a LoRA on nn.MultiheadAttention trained under peft < 0.22 to today's peft. peft 0.15
  to 0.21 merged the out_proj update twice in the forward (W + dW written into out_proj, then
  out_proj.merge() added dW again: the model trained and predicted with W + 2 dW); 0.22 adds it
  once. Doubling out_proj's lora_B (dW = scaling * B @ A) gives the same W + 2 dW under 0.22.
  A periodic checkpoint is not resumed across that change (its optimizer moments were taken
  for the old parametrisation), and a checkpoint that records no peft version is refused:
  which model it holds would be a guess.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from packaging.version import Version

from peftseg.environment import version_drift
from peftseg.errors import UserError
from peftseg.results import read_record

log = logging.getLogger(__name__)

SINGLE_OUT_PROJ_UPDATE = Version("0.22")  # the first peft whose MultiheadAttention LoRA adds dW once
# peft's MultiheadAttention LoRA keeps in_proj's factors on the attention module (X.lora_B.<adapter>)
# and wraps out_proj in a LoRA Linear inside its base layer (X.base_layer.out_proj.lora_B.<adapter>)
_OUT_PROJ_B = re.compile(r"(?P<mha>.+)\.base_layer\.out_proj\.lora_B\.(?P<adapter>[^.]+)\.weight")


def recorded_versions(meta: dict, source: Path) -> dict | None:
    """The library versions a checkpoint was made with: its metadata's, else those of the run
    record (results.json) beside it; None when neither says."""
    if isinstance(meta.get("versions"), dict):
        return meta["versions"]
    try:
        versions = read_record(Path(source).parent).versions
    except (OSError, ValueError):  # no record there, or not a run record
        return None
    return versions if isinstance(versions, dict) and versions else None


def warn_if_libraries_moved(meta: dict, source: Path) -> None:
    moved = version_drift(recorded_versions(meta, source))
    if moved:
        log.warning("checkpoint %s was made with other library versions (%s), so its outputs can differ from "
                    "the run's; `bash scripts/setup.sh` installs the locked ones", source, moved)


def mha_out_proj_factors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys of the out_proj lora_B of every peft LoRA on nn.MultiheadAttention in `tensors`."""
    out = []
    for key in tensors:
        m = _OUT_PROJ_B.fullmatch(key)
        if m and f"{m['mha']}.lora_B.{m['adapter']}.weight" in tensors:  # in_proj's factor beside it
            out.append(key)
    return sorted(out)


def adapt_to_installed_peft(tensors: dict[str, torch.Tensor], meta: dict, source: Path, *,
                            resuming: bool = False) -> dict[str, torch.Tensor]:
    """`tensors` of a checkpoint as today's peft must read them to compute the model that was
    trained (see the module docstring); the same dict when nothing needs converting."""
    keys = mha_out_proj_factors(tensors)
    if not keys:
        return tensors
    import peft

    versions = recorded_versions(meta, source)
    recorded = versions.get("peft") if versions else None
    try:
        trained = Version(recorded) if isinstance(recorded, str) else None
    except ValueError:
        trained = None
    if trained is None:
        raise UserError(
            f"checkpoint {source} holds LoRA on nn.MultiheadAttention ({len(keys)} attention layers) but records no "
            "peft version (no 'versions' in its metadata and no results.json with one beside it). peft before 0.22 "
            "applied the out_proj update twice, peft 0.22 once, so which model it holds cannot be told; put the run's "
            "results.json back beside the checkpoint and load it again."
        )
    installed = Version(peft.__version__)
    if (trained >= SINGLE_OUT_PROJ_UPDATE) == (installed >= SINGLE_OUT_PROJ_UPDATE):
        return tensors  # both apply the out_proj update the same number of times
    if resuming:
        raise UserError(
            f"checkpoint {source} was trained under peft {recorded}, and the installed peft {peft.__version__} applies "
            "the out_proj update of LoRA on nn.MultiheadAttention a different number of times (twice before 0.22, "
            "once since); the saved optimizer state belongs to the old form, so the run cannot be resumed exactly. "
            "Evaluate, merge or predict with its last checkpoint (they convert it), resume it in an environment with "
            f"peft=={recorded}, or start a new run."
        )
    factor = 2.0 if trained < SINGLE_OUT_PROJ_UPDATE else 0.5  # a power of two: the product is exact
    log.warning("checkpoint %s: trained under peft %s, which applies the out_proj update of LoRA on "
                "nn.MultiheadAttention %s; its %d out_proj lora_B tensors are scaled by %g so that the installed "
                "peft %s computes the same model", source, recorded, "twice" if factor == 2 else "once", len(keys),
                factor, peft.__version__)
    return {k: v * factor if k in keys else v for k, v in tensors.items()}
