"""Two method options that shrink what a PEFT run keeps in memory, shared by every method:

- `method.base_dtype=bf16`: the frozen weights are stored in bfloat16 (half the resident
  bytes); the method's own parameters and whatever trains (task heads) stay float32, and
  the model runs under autocast (see peftseg.engine.precision), which casts each matmul's
  operands to bf16 anyway. Refused for `full`, which has no frozen weights to shrink.
- `method.blocks`: which backbone blocks (FamilyMap.backbone_blocks, in forward order)
  receive the method's modules: `all`, `last:N`, `first:N` or a list of indices. With the
  first k blocks left bare, nothing before block k needs a gradient, so autograd stores
  none of their activations.

Module top stays light (dataclass + checks): the methods package is imported to collect
registrations before torch loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from peftseg.errors import UserError
from peftseg.models.family import facts_of
from peftseg.registry import METHODS

BASE_DTYPES = ("fp32", "bf16")


@dataclass
class MemoryOptions:
    """Mixed into every method's config dataclass."""

    base_dtype: str = "fp32"  # fp32 | bf16: storage of the frozen weights
    blocks: Any = "all"  # all | last:N | first:N | [i, j, …]: blocks that get the method's modules

    def __post_init__(self) -> None:
        check_base_dtype(self.base_dtype, getattr(self, "name", ""))
        parse_blocks(self.blocks)


@dataclass
class PeftOptions(MemoryOptions):
    """Mixed into the config of every method that trains its own modules (or a subset of the
    model) with the rest frozen."""

    # the family's task layers train too (FamilyMap.task_layers: neck + task heads on the R-CNN
    # families, whose FPN starts untrained; the task heads on the query-based ones)
    train_task_layers: bool = True


def check_base_dtype(value: str, method: str) -> None:
    if value not in BASE_DTYPES:
        raise UserError(
            f"method.base_dtype={value!r} is not supported; choose one of {list(BASE_DTYPES)} "
            "(bf16 stores the frozen weights in bfloat16, e.g. method.base_dtype=bf16)."
        )
    if value != "fp32" and method in METHODS and METHODS.get(method).trains_everything:
        raise UserError(
            f"method.base_dtype=bf16 stores the frozen weights in bfloat16, but method={method} "
            "trains every weight, so there is nothing frozen to store; use method.base_dtype=fp32 "
            f"with {method} (or train.amp=true for bf16 compute), or pick a PEFT method."
        )


def parse_blocks(spec: Any, field: str = "method.blocks") -> tuple[str, int] | tuple[str, list[int]]:
    """("all", 0) | ("last", n) | ("first", n) | ("index", [i, …]); UserError otherwise."""
    fix = (f"give {field}=all, {field}=last:N, {field}=first:N (N ≥ 1) or a list of block "
           f"indices such as {field}=[8,9,10,11]")
    if isinstance(spec, str):
        if spec == "all":
            return ("all", 0)
        m = re.fullmatch(r"(last|first):(\d+)", spec.strip())
        if m and int(m.group(2)) >= 1:
            return (m.group(1), int(m.group(2)))
        raise UserError(f"{field}={spec!r} is not a block selection; {fix}.")
    try:
        items = list(spec)
    except TypeError:
        raise UserError(f"{field}={spec!r} is not a block selection; {fix}.") from None
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise UserError(f"{field}={items!r} is not a block selection; {fix}.")
    if len(set(items)) != len(items):
        raise UserError(f"{field}={items!r} lists a block twice; list each index once.")
    return ("index", sorted(items))


def backbone_block_names(model) -> list[str]:
    """The family's backbone blocks, in forward (module) order."""
    from peftseg.models import family_of

    family = family_of(model)
    if not family.backbone_blocks:
        return []
    return [n for n, _ in model.named_modules() if re.fullmatch(family.backbone_blocks, n)]


def selected_blocks(model, spec: Any, field: str = "method.blocks") -> list[str]:
    """Names of the backbone blocks `spec` selects; UserError if it reaches past the model."""
    from peftseg.models import family_of

    kind, arg = parse_blocks(spec, field)
    names = backbone_block_names(model)
    if kind == "all":
        return names
    if not names:
        raise UserError(
            f"{field}={spec!r} selects backbone blocks, but model family "
            f"{family_of(model).name!r} lists none (FamilyMap.backbone_blocks); use {field}=all."
        )
    n = len(names)
    if kind in ("last", "first") and arg > n:
        raise UserError(f"{field}={spec!r} asks for {arg} blocks but this model has {n}; use N ≤ {n}.")
    if kind == "last":
        return names[n - arg:]
    if kind == "first":
        return names[:arg]
    bad = [i for i in arg if i >= n]
    if bad:
        raise UserError(
            f"{field} lists block indices {bad}, but this model's backbone has {n} blocks "
            f"(indices 0 to {n - 1}); use indices below {n}."
        )
    return [names[i] for i in arg]


def unselected_blocks(model, spec: Any, field: str = "method.blocks") -> list[str]:
    chosen = set(selected_blocks(model, spec, field))
    return [n for n in backbone_block_names(model) if n not in chosen]


def outside(names: list[str], excluded: list[str]) -> list[str]:
    """`names` minus those inside an excluded block."""
    prefixes = tuple(f"{b}." for b in excluded)
    return [n for n in names if not n.startswith(prefixes) and n not in excluded]


def exclusion_regex(excluded: list[str]) -> str:
    """A lookahead to put before a fullmatch pattern so it skips modules inside `excluded`."""
    if not excluded:
        return ""
    return "(?!(?:" + "|".join(re.escape(b) for b in excluded) + r")\.)"


def check_blocks_read(method: str, spec: Any) -> None:
    """A method that places nothing per block cannot honour a block selection (the registry's
    `block_aware`; a combination such as adapter_lora takes it per part: method.lora.blocks)."""
    if parse_blocks(spec)[0] != "all" and not METHODS.get(method).block_aware:
        aware = [m.name for m in METHODS if m.block_aware]
        raise UserError(
            f"method.blocks={spec!r} selects which blocks get the method's modules, but "
            f"method={method} inserts none; leave method.blocks=all, or pick one of "
            f"{', '.join(aware)}."
        )


def store_frozen_in(model, base_dtype: str, method: str) -> int:
    """Store every frozen parameter in `base_dtype`; returns how many bytes that saved."""
    import torch

    check_base_dtype(base_dtype, method)
    if base_dtype == "fp32":
        return 0
    saved = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            saved += p.numel() * 2
            p.data = p.data.to(torch.bfloat16)
    # the trainer and evaluation read it to autocast
    facts_of(model).base_dtype = base_dtype
    return saved


def widen_frozen(model) -> None:
    """Undo store_frozen_in: bf16-stored weights back to float32 (exact), e.g. before merging,
    so an update is folded in at float32 and a plain (float32) model comes out."""
    import torch

    facts = facts_of(model)
    if facts is None or facts.base_dtype == "fp32":
        return
    for p in model.parameters():
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    facts.base_dtype = "fp32"
