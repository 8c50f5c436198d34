"""Load pretrained weights through detectron2's checkpointer and say what matched.

DetectionCheckpointer matches the names: local paths, Detectron/Caffe2 .pkl files and
`?matching_heuristics=True` name alignment. Reading the file is ours (peftseg.io.safe_load:
no code runs from a weights file; .safetensors accepted), and so is fetching a URL
(http(s)://, detectron2://: peftseg.io.download, with timeouts). Two foreign
layouts are translated onto the model's own names before it matches them, chosen from the
checkpoint's keys and the model's family:

- a timm / MAE ViT state dict (`patch_embed.proj.*`, `blocks.N.*`, `pos_embed`, …) onto the
  vitdet family's detectron2 ViT (`backbone.net.*`);
- an official Swin state dict (`patch_embed.*`, `layers.N.blocks.M.*`, …; timm's Swin
  layout too) onto the swin family's detectron2 SwinTransformer (`backbone.bottom_up.*`).

Keys without a counterpart (cls_token, the classifier head, the final norm, MAE's decoder,
Swin's attention masks) are dropped and reported as unexpected. Position tables that only
differ in grid size are resized: ViT's absolute `pos_embed` (bicubic, as detectron2's
ViT resizes it at run time) and Swin's `relative_position_bias_table` (bicubic, as the
official Swin code does when fine-tuning at another window size).

Every load logs a key report. It fails with a UserError when nothing matched, and when a
backbone tensor differs in shape: methods freeze the backbone, so a backbone left at its
random init would be trained around rather than adapted. Neck and head tensors of another
shape (another class count, other head sizes) stay at their init and are reported; every
method trains them.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from peftseg.io.download import fetch
from peftseg.errors import UserError
from peftseg.models.family import FamilyMap
from peftseg.registry import FAMILIES
from peftseg.io.safe_load import load_pickle_arrays, load_safetensors, load_torch

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


def _family(model: nn.Module) -> FamilyMap | None:
    """The model's FamilyMap: attached by build_model, or (while build_model is still
    loading) the registered family whose backbone prefix the model's names carry."""
    from peftseg.models.family import facts_of

    attached = facts_of(model)
    if attached is not None:
        return attached.family
    names = list(model.state_dict())
    for spec in FAMILIES:
        family = spec.family_map
        prefixes = family.groups.get("backbone", ())
        if any(n.startswith(p) for n in names for p in prefixes):
            return family
    return None


def _unwrap(state: dict) -> dict:
    """The tensors of a state dict nested under "model"/"state_dict" (MAE, Swin, timm
    training checkpoints), without DataParallel's "module." and torch.compile's "_orig_mod." prefixes."""
    while not any(torch.is_tensor(v) or hasattr(v, "shape") for v in state.values()):
        inner = next((state[k] for k in ("model", "state_dict", "module") if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    # in place: the dict keeps the _metadata (module versions) that load_state_dict reads
    for prefix in ("module.", "_orig_mod.", "module."):  # either order of DDP(compile(m)) and back
        consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def _foreign_layouts(state: dict, family_name: str | None = None) -> list:
    """[(family spec, layout)] of every registered foreign layout `state` is in, the model's
    own family first: several families can take one layout (an official Swin state dict fits
    the swin family's backbone and maskdino's)."""
    return [(spec, layout) for spec in sorted(FAMILIES, key=lambda spec: spec.name != family_name)
            for layout in spec.weight_layouts if layout.detect(state)]


def _square(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side > 0 and side * side == n else None


def _resize_pos_embed(theirs: torch.Tensor, ours: torch.Tensor, model_has_cls: bool, notes: list[str]) -> torch.Tensor:
    """ViT absolute position table (1, [cls +] grid², C) onto the model's grid and cls slot."""
    n = theirs.shape[1]
    if _square(n - 1):
        cls, grid = theirs[:, :1], theirs[:, 1:]
    elif _square(n):
        cls, grid = None, theirs
    else:
        return theirs  # not a square grid: left to the shape check, which names it
    size = _square(grid.shape[1])
    target = _square(ours.shape[1] - (1 if model_has_cls else 0))
    if target is None:
        return theirs
    if size != target:
        notes.append(f"pos_embed from a {size}x{size} to a {target}x{target} grid")
        grid = F.interpolate(
            grid.reshape(1, size, size, -1).permute(0, 3, 1, 2).float(),
            size=(target, target), mode="bicubic", align_corners=False,
        ).permute(0, 2, 3, 1).reshape(1, target * target, -1).to(theirs.dtype)
    if not model_has_cls:
        return grid
    # detectron2's ViT skips the cls slot at run time; keep the checkpoint's when it has one
    return torch.cat([cls if cls is not None else ours[:, :1].to(grid.dtype), grid], dim=1)


def _resize_bias_table(theirs: torch.Tensor, ours: torch.Tensor, notes: list[str]) -> torch.Tensor:
    """Swin relative-position bias table ((2W-1)², heads) onto the model's window."""
    s1, s2 = _square(theirs.shape[0]), _square(ours.shape[0])
    if s1 is None or s2 is None or s1 == s2:
        return theirs
    notes.append(f"relative_position_bias_table from window {(s1 + 1) // 2} to window {(s2 + 1) // 2}")
    heads = theirs.shape[1]
    table = theirs.float().permute(1, 0).reshape(1, heads, s1, s1)
    table = F.interpolate(table, size=(s2, s2), mode="bicubic", align_corners=False)
    return table.reshape(heads, s2 * s2).permute(1, 0).to(theirs.dtype)


def _translate(model: nn.Module, state: dict, layout, family: FamilyMap) -> tuple[dict, list[str]]:
    """A foreign state dict under the model's names; returns it and the dropped keys."""
    state = layout.normalize(state)
    prefix = family.groups["backbone"][0]
    ours = model.state_dict()
    kept, dropped = {}, []
    for k, v in state.items():
        if prefix + k in ours:
            kept[prefix + k] = v
        else:
            dropped.append(k)
    return kept, dropped


def _resize_tables(model: nn.Module, state: dict) -> None:
    """Resize, in place, position tables whose only difference from the model's is the grid."""
    ours = model.state_dict()
    notes: list[str] = []
    for k in list(state):
        if k not in ours or tuple(state[k].shape) == tuple(ours[k].shape):
            continue
        theirs = torch.as_tensor(state[k])
        if k.endswith("relative_position_index"):
            # derived from the window size, not learned: the model's own is the right one
            state[k] = ours[k]
        elif k.endswith("relative_position_bias_table") and theirs.shape[1:] == ours[k].shape[1:]:
            state[k] = _resize_bias_table(theirs, ours[k], notes)
        elif k.endswith("pos_embed") and theirs.dim() == 3 and theirs.shape[2] == ours[k].shape[2]:
            owner = model.get_submodule(k.rpartition(".")[0]) if "." in k else model
            has_cls = bool(getattr(owner, "pretrain_use_cls_token", True))
            state[k] = _resize_pos_embed(theirs, ours[k], has_cls, notes)
    for note in sorted(set(notes)):
        log.info("weights: resized %d× %s (bicubic)", notes.count(note), note)


class _ReportingCheckpointer(DetectionCheckpointer):
    """Translates foreign layouts before detectron2 matches names, and keeps the
    incompatible-keys result that `load` only logs."""

    incompatible = None
    dropped: tuple[str, ...] = ()  # foreign keys without a counterpart
    source = ""

    def _load_file(self, filename):
        what = "model.weights"
        if filename.endswith((".pkl", ".pyth")):
            # detectron2's branches for these two call pickle.load / torch.load on the file;
            # this is their dict-shaping over our restricted readers instead.
            data = load_pickle_arrays(filename, what) if filename.endswith(".pkl") else load_torch(filename, what)
            if not isinstance(data, dict):
                raise UserError(f"{what} {filename} holds a {type(data).__name__}, not a dict of weights; give "
                                "a detectron2/Detectron/pycls weights file.")
            if filename.endswith(".pyth"):
                state = {k: v for k, v in data.get("model_state", {}).items() if not k.endswith("num_batches_tracked")}
                return {"model": state, "__author__": "pycls", "matching_heuristics": True}
            if "model" in data and "__author__" in data:  # detectron2 model-zoo layout
                return data
            data = data.get("blobs", data)  # Detectron1 detection models nest under "blobs"
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        return super()._load_file(filename)  # -> _torch_load, then detectron2's query handling

    def _torch_load(self, f):
        if str(f).endswith(".safetensors"):
            tensors, header = load_safetensors(f, "model.weights")
            return {"model": tensors, **({"peftseg": header["peftseg"]} if "peftseg" in header else {})}
        return load_torch(f, "model.weights")

    def _load_model(self, checkpoint):
        if "peftseg" in checkpoint:
            raise UserError(
                f"model.weights={self.source!r} is a peftseg PEFT checkpoint (only the trained part; its "
                "frozen base would stay at random init). Continue it with train.resume=<its run dir>, "
                "evaluate it with `peftseg eval checkpoint=<file>`, or fold it into full weights with "
                "`peftseg merge checkpoint=<file>` and give model.weights=<the merged file>."
            )
        state = _unwrap(checkpoint["model"])
        family = _family(self.model)
        foreign = _foreign_layouts(state, family.name if family is not None else None)
        if foreign:
            wanted, layout = foreign[0]
            if family is None or family.name != wanted.name:
                got = family.name if family is not None else type(self.model).__name__
                takers = " or ".join(repr(spec.name) for spec, _ in foreign)
                hints = "; ".join(f"{lay.hint}" for _, lay in foreign)
                raise UserError(
                    f"model.weights={self.source!r} holds {layout.description} "
                    f"(keys such as {sorted(state)[:3]}), which only the {takers} model "
                    f"{'families take' if len(foreign) > 1 else 'family takes'}, but the model is {got!r}; "
                    f"pick a preset that matches the checkpoint ({hints}), or give a checkpoint of this model."
                )
            state, dropped = _translate(self.model, state, layout, family)
            self.dropped = tuple(dropped)
            # the names are exact now; detectron2's suffix heuristics could only mis-assign them
            checkpoint.pop("matching_heuristics", None)
        _resize_tables(self.model, state)
        checkpoint["model"] = state
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _is_url(source: str) -> bool:
    return "://" in source


def _check_backbone_shapes(source: str, incorrect: list, family: FamilyMap | None) -> None:
    if family is None:
        return
    bad = [(k, theirs, ours) for k, theirs, ours in incorrect if family.group_of(k) == "backbone"]
    if not bad:
        return
    key, theirs, ours = bad[0]
    more = f" (and {len(bad) - 1} more backbone tensors)" if len(bad) > 1 else ""
    raise UserError(
        f"model.weights={source!r} does not fit this {family.name} model's backbone: {key} has "
        f"shape {tuple(theirs)} in the checkpoint but {tuple(ours)} in the model{more}, so the "
        "checkpoint was made for another backbone size; pick the model preset that matches the "
        f"checkpoint ({_preset_hint(family.name)}), or set the model's sizes to the checkpoint's."
    )


def _preset_hint(family: str) -> str:
    hints = [layout.hint for layout in FAMILIES.get(family).weight_layouts]
    return "; ".join(hints) or "see conf/model/"


def _layouts_for_message() -> str:
    return ", ".join(f"{layout.description} for {spec.name}" for spec in FAMILIES for layout in spec.weight_layouts)


def load_weights(model: nn.Module, source: str) -> LoadReport:
    """Load `source` into `model` in place (non-strict); raise UserError if nothing matched
    or a backbone tensor has another shape (the model is then partly loaded: discard it)."""
    target = source
    if _is_url(source):
        query = urlparse(source).query
        target = str(fetch(source)) + (f"?{query}" if query else "")
    else:
        local = urlparse(source)._replace(query="").geturl()  # allow ?matching_heuristics=True
        if not os.path.isfile(local):
            raise UserError(
                f"model.weights={source!r} does not exist (looked for the file {os.path.abspath(local)}); "
                "point model.weights at a checkpoint file or URL, or set model.weights='' "
                "to start from random initialisation."
            )
    ckpt = _ReportingCheckpointer(model)
    ckpt.source = source
    try:
        ckpt.load(target, checkpointables=[])
    except (OSError, RuntimeError, ValueError, EOFError, AssertionError) as e:
        raise UserError(
            f"model.weights={source!r} could not be read as a checkpoint ({type(e).__name__}: {e}); "
            "give a detectron2/PyTorch checkpoint (.pth/.pkl/.safetensors) that is reachable from this machine."
        ) from e
    inc = ckpt.incompatible
    missing = set(inc.missing_keys)
    report = LoadReport(
        source=source,
        loaded=tuple(k for k in model.state_dict() if k not in missing),
        missing=tuple(inc.missing_keys),
        unexpected=tuple(inc.unexpected_keys) + tuple(ckpt.dropped),
        shape_mismatch=tuple(k for k, *_ in inc.incorrect_shapes),
    )
    log.info(report.summary())
    # before the nothing-matched check: a backbone of another size matches nothing either,
    # and its first misfit says more
    _check_backbone_shapes(source, inc.incorrect_shapes, _family(model))
    if not report.loaded:
        raise UserError(
            f"model.weights={source!r} matched no parameter of the model "
            f"({len(report.unexpected)} checkpoint keys such as {list(report.unexpected[:3])} "
            f"have no counterpart, and shape mismatches: {len(report.shape_mismatch)}); use a "
            "checkpoint of the same model family (a detectron2 checkpoint of this model, "
            f"{_layouts_for_message()}), or "
            "append '?matching_heuristics=True' to let detectron2 align the names of another "
            "backbone-only checkpoint by suffix."
        )
    return report
