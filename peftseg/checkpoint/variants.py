"""Many task variants on one frozen base: `peftseg predict|eval checkpoint=[runA,runB,…]`.

The base model is built once (as `build_for_run` builds it: seeded, the checkpoints'
`model.weights`), then every variant's method is applied to it in turn and its trained
tensors loaded; `VariantSet.activate(name)` makes the model compute exactly what that
variant's checkpoint loaded alone computes.

What a variant owns, and how it is switched:
- peft-backed methods (the LoRA family): injected under the variant's own adapter name
  (peftseg.methods._peft.adapter_name), so a layer two LoRA variants target holds both
  adapters, and peft's `set_adapter` picks one; layers the active variant does not adapt
  have their adapters disabled (peft then calls the wrapped layer alone);
- modules a method attaches itself (bottleneck adapters, the side path): the child modules
  and forward hooks its `apply` added are recorded per variant and attached only while it
  is active — the project's own switch, since these are not peft layers;
- the variant's trained tensors of base modules (task layers, biases of bitfit, …): each
  variant keeps its own tensor, and activation points the base parameter's `.data` at it
  (no copy; the base's own tensor is kept for variants that do not train it).

- a model that classifies by class name (seem's text-space classifier): each variant's own
  class names' text embeddings, computed once at load and swapped in with the variant.

Every checkpoint must be a run checkpoint of the same model (config and class count) and
must have been trained on the very base built here: its base fingerprint is recomputed
through the variant's own parameter names, and a mismatch is refused, naming the file.
Each checkpoint is read and checked as `peftseg.checkpoint.load` checks one (`describe`:
metadata, library versions, classes=, overrides, the dataset's classes), and `loaded(v)`
hands the commands the same `Loaded` a single checkpoint gives them, so that
`predict`/`eval checkpoint=[…]` run their one-checkpoint code once per variant.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from peft.tuners.tuners_utils import BaseTunerLayer

from peftseg.checkpoint.files import MERGED_KEY, checkpoint_file, read_checkpoint_file
from peftseg.checkpoint.provenance import adapt_to_installed_peft
from peftseg.checkpoint.load import Described, Loaded, describe
from peftseg.errors import UserError
from peftseg.params import GROUPS, ParamCounts, group_of

log = logging.getLogger(__name__)

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
_ABSENT = object()


@dataclass
class Variant:
    name: str  # folder name of its outputs
    adapter: str  # peft adapter name inside the shared model
    source: Path
    cfg: DictConfig
    class_names: list[str]
    splits: object = None  # its dataset's splits (peftseg.data.DatasetSplits) when evaluating
    # (names, text embeddings) of a model that classifies by class name (seem); None otherwise
    class_state: tuple | None = None
    # (module, child name) -> the child while this variant is active
    children: dict[tuple[int, str], nn.Module] = field(default_factory=dict)
    # module -> {hook dict name: {hook id: value}} added by this variant's method
    hooks: dict[int, dict[str, dict]] = field(default_factory=dict)
    # (base module, tensor name) -> this variant's tensor; kept by module identity, since a later
    # variant's peft layer may wrap the module and change its path
    swapped: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    trainable: set[int] = field(default_factory=set)  # ids of the parameters it trains
    peft_layers: set[int] = field(default_factory=set)  # ids of the tuner layers holding its adapter
    added_bytes: int = 0  # its own modules' tensors (peft adapter, attached modules)
    # its model's parameters as loaded alone: (name there, parameter, added by its method)
    params: list[tuple[str, nn.Parameter, bool]] = field(default_factory=list)

    @property
    def swapped_bytes(self) -> int:
        return sum(_nbytes(t) for t in self.swapped.values())

    @property
    def delta_bytes(self) -> int:
        """What this variant adds to the resident shared model."""
        return self.added_bytes + self.swapped_bytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _set_tensor(module: nn.Module, leaf: str, value: torch.Tensor) -> None:
    if leaf in module._parameters:
        module._parameters[leaf].data = value
    else:
        module._buffers[leaf] = value


def variant_names(sources: list[Path], reserved: tuple[str, ...] = ()) -> list[str]:
    """One output folder name per checkpoint file, distinct whatever the run dirs are called: the
    run dir's name, with as many of its parent folders as it takes to tell the runs apart
    (`A_outputs_2026-01-01_12-00-00` and `B_outputs_2026-01-01_12-00-00` for runs of one date and
    time under A/ and B/), and the file's stem for two checkpoints of one run dir
    (`run_model_final`, `run_model_0000999`). Names that still meet once joined, or that are in
    `reserved` (the files written beside the folders), are numbered: `-2`, `-3`, …"""
    files = [Path(os.path.abspath(s)) for s in sources]  # as given (links not followed), ".." folded
    dirs = [f.parent for f in files]
    keys = []
    for f, d in zip(files, dirs):
        parts = d.parts[1:]  # without the root
        if not parts:
            parts = (f.stem,)
        elif dirs.count(d) > 1:
            parts = (*parts[:-1], f"{parts[-1]}_{f.stem}")
        keys.append(parts)
    depth = 1
    while len({k[-depth:] for k in keys}) < len(keys) and depth < max(len(k) for k in keys):
        depth += 1
    taken, names = set(reserved), []
    for key in keys:
        base = "_".join(key[-depth:])
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        names.append(name)
    return names


class VariantSet:
    """One base model and several variants of it; `activate` switches."""

    def __init__(self, model: nn.Module, variants: list[Variant], modules: dict[int, nn.Module],
                 base_children: dict[tuple[int, str], object], base_tensors: dict[str, torch.Tensor], base_bytes: int):
        self.model = model
        self.variants = variants
        self._modules = modules  # id -> module, for the ones the switches touch
        self._base_children = base_children
        self._base_tensors = base_tensors  # the base's own tensor of every swapped name
        self.base_bytes = base_bytes  # resident bytes of the shared base
        self.full_base_bytes = base_bytes  # the base model as built, every tensor
        self.active: Variant | None = None

    def __iter__(self):
        return iter(self.variants)

    def get(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def to(self, device) -> "VariantSet":
        """Move the model and every variant's kept tensors (only the active ones sit in the model)."""
        self.activate(None)
        self.model.to(device)
        for key, child in list(self._base_children.items()):
            if isinstance(child, nn.Module):
                child.to(device)
        for (mid, leaf) in self._base_tensors:  # the moved model's own tensors, not second copies
            module = self._modules[mid]
            p = module._parameters.get(leaf)
            self._base_tensors[(mid, leaf)] = p.data if p is not None else module._buffers[leaf]
        moved: dict[int, torch.Tensor] = {}  # variants of the same classes share one embedding tensor
        for v in self.variants:
            for child in v.children.values():
                child.to(device)
            v.swapped = {k: t.to(device) for k, t in v.swapped.items()}
            if v.class_state is not None:
                names, emb = v.class_state
                if id(emb) not in moved:
                    moved[id(emb)] = emb.to(device)
                v.class_state = (names, moved[id(emb)])
        return self

    def _detach_all(self) -> None:
        for (mid, key), child in self._base_children.items():
            module = self._modules[mid]
            if child is _ABSENT:
                module._modules.pop(key, None)
            else:
                module._modules[key] = child
        for v in self.variants:
            for mid, dicts in v.hooks.items():
                module = self._modules[mid]
                for dict_name, entries in dicts.items():
                    for hook_id in entries:
                        getattr(module, dict_name).pop(hook_id, None)
        for (mid, leaf), tensor in self._base_tensors.items():
            _set_tensor(self._modules[mid], leaf, tensor)

    def activate(self, variant: Variant | str | None) -> nn.Module:
        """The shared model computing as `variant` loaded alone would (None: the bare base)."""
        if isinstance(variant, str):
            variant = self.get(variant)
        self._detach_all()
        if variant is not None:
            for (mid, key), child in variant.children.items():
                self._modules[mid]._modules[key] = child
            for mid, dicts in variant.hooks.items():
                module = self._modules[mid]
                for dict_name, entries in dicts.items():
                    getattr(module, dict_name).update(entries)
            for (mid, leaf), tensor in variant.swapped.items():
                _set_tensor(self._modules[mid], leaf, tensor)
            if variant.class_state is not None:  # its own classes' text embeddings (seem)
                self.model.load_class_state(variant.class_state)
            if variant.peft_layers:
                from peft.functional import set_adapter

                set_adapter(self.model, variant.adapter, inference_mode=True)  # peft's multi-adapter switch
        for layer in self.model.modules():
            if isinstance(layer, BaseTunerLayer):
                # a layer the active variant does not adapt runs its wrapped layer alone
                layer.enable_adapters(variant is not None and id(layer) in variant.peft_layers)
        for p in self.model.parameters():
            p.requires_grad_(variant is not None and id(p) in variant.trainable)
        self.active = variant
        return self.model

    def release_unused_base_tensors(self) -> int:
        """Drop the base's own copy of every tensor that all variants replace (typically the
        task layers, which every run trains): nothing would ever compute with it. Returns the
        bytes released; after this, `activate(None)` leaves those tensors at the last variant's."""
        released = 0
        for key in [k for k in self._base_tensors if all(k in v.swapped for v in self.variants)]:
            tensor = self._base_tensors.pop(key)
            _set_tensor(self._modules[key[0]], key[1], self.variants[0].swapped[key])
            released += _nbytes(tensor)
        self.base_bytes -= released
        return released

    def loaded(self, variant: Variant | str) -> Loaded:
        """The shared model computing as `variant`, handed over as the one loader hands over one
        checkpoint: the commands then run their one-checkpoint code on it."""
        if isinstance(variant, str):
            variant = self.get(variant)
        return Loaded(model=self.activate(variant), cfg=variant.cfg, class_names=list(variant.class_names),
                      source=variant.source, kind="peft", splits=variant.splits)

    def param_counts(self, variant: Variant | str) -> ParamCounts:
        """peftseg.params.count_parameters of the variant's model loaded alone: its parameters
        under the names they have there (the other variants' adapters left out), grouped alike."""
        if isinstance(variant, str):
            variant = self.get(variant)
        family = getattr(self.model, "peftseg_family", None)
        added = {name: "method" for name, _, is_added in variant.params if is_added}
        by_group = {g: {"total": 0, "trainable": 0} for g in GROUPS}
        for name, p, _ in variant.params:
            counts = by_group[group_of(name, family, added)]
            counts["total"] += p.numel()
            if id(p) in variant.trainable:
                counts["trainable"] += p.numel()
        total = sum(c["total"] for c in by_group.values())
        trainable = sum(c["trainable"] for c in by_group.values())
        return ParamCounts(total=total, trainable=trainable, ratio=trainable / total if total else 0.0,
                           by_group=by_group)

    def memory(self) -> dict:
        """Bytes of tensors: the base once + each variant's delta, vs N separate models.

        Measured by summing the bytes of the tensors each part holds: the base's (less the
        ones every variant replaces, released), each variant's own modules and replacement
        tensors. A separate model of a variant holds the full base + its own modules."""
        deltas = {v.name: v.delta_bytes for v in self.variants}
        separate = {v.name: self.full_base_bytes + v.added_bytes for v in self.variants}
        return {"base": self.base_bytes, "variants": deltas, "shared_total": self.base_bytes + sum(deltas.values()),
                "separate_total": sum(separate.values()), "separate": separate}


def _structure(model: nn.Module) -> dict[int, tuple[nn.Module, dict, dict]]:
    return {id(m): (m, dict(m._modules), {d: dict(getattr(m, d)) for d in _HOOK_DICTS}) for m in model.modules()}


def _inside_tuner(model: nn.Module) -> set[int]:
    """ids of tuner layers and every module inside one (peft's own structure)."""
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            ids |= {id(x) for x in m.modules()}
    return ids


def _adapter_names(layer: BaseTunerLayer) -> set[str]:
    return set(layer._all_available_adapter_names())


def _tensor_bytes(tensors) -> tuple[int, int]:
    seen, total, count = set(), 0, 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += _nbytes(t)
        count += t.numel()
    return total, count


def _fingerprint(model: nn.Module, to_own_name, trainable: set[str], skip: set[str]) -> str:
    """files.base_fingerprint as the variant's model alone computes it: its frozen parameters,
    under its own names (other variants' tuner layers stripped from the path)."""
    import hashlib

    h = hashlib.sha256()
    params = [(to_own_name(n), p) for n, p in model.named_parameters() if n not in trainable and n not in skip]
    for name, p in sorted(params, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _read(checkpoints: list[str], overrides: list[str], classes: list[str] | None,
          need_dataset: bool) -> list[Described]:
    """Each entry read once and checked as one checkpoint is (peftseg.checkpoint.load.describe)."""
    out = []
    given: dict[Path, str] = {}
    for c in checkpoints:
        file = checkpoint_file(c)
        real = file.resolve()
        if real in given:  # a run dir and its model_final file are one checkpoint too
            raise UserError(f"checkpoint=[…] lists {real} twice (as {given[real]} and {c}); each variant is one run's "
                            "checkpoint, so give each once.")
        given[real] = c
        source, data = read_checkpoint_file(file)
        if "peftseg" not in data:
            kind = "a merged checkpoint (the whole model, no base to share)" if MERGED_KEY in data else \
                "not a peftseg run checkpoint"
            raise UserError(
                f"{source} is {kind}; checkpoint=[…] with several entries takes run directories (or their "
                "model_* files) of `peftseg train` runs on one base model. Give it alone: checkpoint=" f"{c}."
            )
        out.append(describe(source, data, overrides, classes=classes, need_dataset=need_dataset))
    return out


def _check_same_model(items: list[Described]) -> None:
    first = items[0]
    want = OmegaConf.to_container(first.cfg.model, resolve=True)
    for d in items[1:]:
        got = OmegaConf.to_container(d.cfg.model, resolve=True)
        if got != want:
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            shown = ", ".join(f"model.{k}: {got.get(k)!r} vs {want.get(k)!r}" for k in diff[:4])
            raise UserError(
                f"checkpoint {d.source} was trained on another model than {first.source} ({shown}); variants share "
                "one base, so give only checkpoints of runs on the same model preset and weights."
            )
        if len(d.class_names) != len(first.class_names):
            raise UserError(
                f"checkpoint {d.source} predicts {len(d.class_names)} classes but {first.source} predicts "
                f"{len(first.class_names)}; variants on one base must have task layers of the same shape. "
                "Predict with these checkpoints in separate commands."
            )
    for d in items:
        base_dtype = getattr(d.cfg.method, "base_dtype", "fp32")
        if base_dtype != "fp32":
            raise UserError(
                f"checkpoint {d.source} was trained with method.base_dtype={base_dtype}: its frozen weights are "
                "rounded to bfloat16, so it cannot share the float32 base of the other variants; predict with it "
                "alone (checkpoint=<its run dir>)."
            )


def load_variants(checkpoints: list[str], overrides: list[str], *, need_dataset: bool = False,
                  classes: list[str] | None = None, reserved_names: tuple[str, ...] = ()) -> VariantSet:
    """Build the base once and put every checkpoint's variant on it (see the module docstring).
    `need_dataset` and `classes` as for peftseg.checkpoint.load.load_model, for each checkpoint;
    `reserved_names`: names no variant's output folder may take (files written beside them)."""
    from detectron2.utils.env import seed_all_rng

    from peftseg.checkpoint.formats import peft_owned
    from peftseg.methods import apply_method
    from peftseg.methods._peft import adapter_name
    from peftseg.models import build_model

    if len(checkpoints) < 2:
        raise UserError("checkpoint=[…] lists one checkpoint; give it as checkpoint=<run dir>, or list several.")
    items = _read(checkpoints, overrides, classes, need_dataset)
    _check_same_model(items)
    names = variant_names([d.source for d in items], reserved_names)
    first_cfg = items[0].cfg

    # the base exactly as build_for_run makes it for each of them (its classes: the first's; a
    # model that classifies by class name gets each variant's own below)
    seed_all_rng(first_cfg.train.seed)
    model = build_model(first_cfg.model, num_classes=len(items[0].class_names),
                        class_names=list(items[0].class_names)).eval()
    base_state = model.state_dict(keep_vars=True)
    base_ids = {id(t): n for n, t in base_state.items()}
    base_bytes, _ = _tensor_bytes(base_state.values())
    by_name = hasattr(model, "set_class_names")
    class_states: dict[tuple[str, ...], tuple] = {}
    if by_name:
        class_states[tuple(items[0].class_names)] = model.class_state()

    modules: dict[int, nn.Module] = {}
    base_children: dict[tuple[int, str], object] = {}
    base_tensors: dict[tuple[int, str], torch.Tensor] = {}
    variants: list[Variant] = []
    mismatched: list[tuple[Path, DictConfig]] = []
    vset = VariantSet(model, variants, modules, base_children, base_tensors, base_bytes)
    for i, (d, name) in enumerate(zip(items, names)):
        source, meta, cfg = d.source, d.meta, d.cfg
        vset.activate(None)  # the bare base: this variant's method finds no other's modules
        v = Variant(name=name, adapter=f"variant{i}", source=source, cfg=cfg, class_names=list(d.class_names),
                    splits=d.splits)
        if by_name:
            # its own classes' text embeddings, computed as build_model computes them for it alone:
            # on the base's (frozen in every method) text encoder, once per list of names
            key = tuple(d.class_names)
            if key not in class_states:
                model.set_class_names(list(key))
                class_states[key] = model.class_state()
            v.class_state = class_states[key]
        before = _structure(model)
        peft_before = _inside_tuner(model)
        with adapter_name(f"variant{i}"), warnings.catch_warnings():
            # peft warns that a second adapter joins the model's peft_config: that is the point here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            applied = apply_method(model, cfg.method)
        if applied is not model:
            raise RuntimeError(f"method {cfg.method.name} replaced the model object; variants need in-place methods")
        inside_tuner = _inside_tuner(model)
        for mid, (module, children, hooks) in before.items():
            if mid in peft_before or mid in inside_tuner:
                continue  # peft's own layers: they stay, switched by set_adapter
            for key in set(children) | set(module._modules):
                old, new = children.get(key, _ABSENT), module._modules.get(key, _ABSENT)
                if old is new or isinstance(new, BaseTunerLayer):
                    continue  # unchanged, or peft wrapped it (permanent: peft switches it)
                modules[mid] = module
                base_children.setdefault((mid, key), old)
                if new is not _ABSENT:
                    v.children[(mid, key)] = new
            for dict_name in _HOOK_DICTS:
                added = {k: f for k, f in getattr(module, dict_name).items() if k not in hooks[dict_name]}
                if added:
                    modules[mid] = module
                    v.hooks.setdefault(mid, {})[dict_name] = added
        tuner_layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        for n, layer in tuner_layers.items():
            if isinstance(layer.base_layer, BaseTunerLayer):
                raise UserError(
                    f"checkpoint {source} ({cfg.method.name}) adapts {n}, which another variant's peft method of "
                    "another kind already wraps; peft keeps one kind of adapter per layer, so give variants of "
                    "different peft methods in separate commands."
                )
        mine = {n for n, layer in tuner_layers.items() if v.adapter in _adapter_names(layer)}
        v.peft_layers = {id(tuner_layers[n]) for n in mine}
        # names as the variant's model alone has them: other variants' tuner layers are not in it
        foreign = sorted((n for n in tuner_layers if n not in mine), key=len, reverse=True)

        def to_own(name: str, foreign=foreign) -> str:
            for layer_name in foreign:
                prefix = f"{layer_name}.base_layer."
                if name.startswith(prefix):
                    return f"{layer_name}." + name[len(prefix):]
            return name

        def to_shared(name: str, foreign=foreign) -> str:
            for layer_name in foreign:
                prefix = f"{layer_name}."
                if name.startswith(prefix):
                    return f"{layer_name}.base_layer." + name[len(prefix):]
            return name

        owned = peft_owned(model)
        state = model.state_dict(keep_vars=True)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        v.trainable = {id(p) for p in model.parameters() if p.requires_grad}
        mine_peft = own_peft(owned, v)
        if _fingerprint(model, to_own, trainable, owned - mine_peft) != meta["base_fingerprint"]:
            mismatched.append((source, cfg))
        # the variant's trained tensors: peft's under its adapter name, the rest as they are
        tensors = adapt_to_installed_peft(d.data["model"], meta, source)
        unknown = []
        for key, value in tensors.items():
            # peft's keys carry the adapter name ("lora_A.default.weight"): here it is the variant's
            target = to_shared(".".join(v.adapter if s == "default" else s for s in key.split(".")))
            if target not in state:
                unknown.append(key)
                continue
            current = state[target]
            if id(current) in base_ids:  # a base tensor this variant trained: its own copy, swapped in
                module_name, _, leaf = target.rpartition(".")
                owner = model.get_submodule(module_name) if module_name else model
                modules[id(owner)] = owner
                base_tensors.setdefault((id(owner), leaf), current.detach())
                v.swapped[(id(owner), leaf)] = value.to(current.dtype).clone()
            else:
                with torch.no_grad():
                    current.copy_(value)
        missing = set(meta["trainable"]) - set(tensors)
        if unknown or missing:
            raise UserError(
                f"checkpoint {source} does not fit its model: unknown {sorted(unknown)[:3]}, missing "
                f"{sorted(missing)[:3]}; it was written by a different peftseg version or edited."
            )
        own_tensors = [t for k, t in state.items() if id(t) not in base_ids and (k not in owned or k in mine_peft)]
        v.added_bytes, _ = _tensor_bytes([t.detach() for t in own_tensors])
        # its parameters as its model alone names them (peft's adapter name there: "default")
        v.params = [(".".join("default" if s == v.adapter else s for s in to_own(k).split(".")), p,
                     id(p) not in base_ids)
                    for k, p in model.named_parameters() if k not in owned or k in mine_peft]
        variants.append(v)
    if mismatched:
        odd = "; ".join(f"{s} (model.weights={c.model.weights!r}, train.seed={c.train.seed})" for s, c in mismatched)
        raise UserError(
            f"checkpoint(s) {odd} were trained on other frozen base weights than the base built here for "
            f"{items[0].source} (model.weights={first_cfg.model.weights!r}, train.seed={first_cfg.train.seed}); variants "
            "share one base, so give only checkpoints of runs on the same base weights (a random base: the same "
            "train.seed) and predict with the others separately."
        )
    vset.release_unused_base_tensors()
    vset.activate(None)
    return vset


def own_peft(owned: set[str], v: Variant) -> set[str]:
    return {n for n in owned if f".{v.adapter}." in f".{n}."}
