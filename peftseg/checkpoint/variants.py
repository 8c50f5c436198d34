"""Many task variants on one frozen base: `peftseg predict|eval checkpoint=[runA,runB,…]`.

The base model is built once (as `build_for_run` builds it: seeded, the checkpoints'
`model.weights`), then every variant's method is applied to it in turn and its trained
tensors loaded; `VariantSet.activate(name)` makes the model compute exactly what that
variant's checkpoint loaded alone computes.

What a variant owns, and how it is switched (public torch and peft API only):
- peft-backed methods (the LoRA family, the LoRA part of adapter_lora): injected as a peft
  adapter named after the variant (`apply_method(..., adapter_name="variant<i>")`), so a layer
  two LoRA variants target holds both adapters and peft's `set_adapter` picks one; a layer that
  holds no adapter of the active variant has its adapters disabled (peft then calls the
  wrapped layer alone);
- modules a method of the project hangs on the model (bottleneck adapters, Monas, the side
  path: peftseg.methods._attached.Attached): attached, with their hooks, only while their
  variant is active;
- the variant's trained tensors of base modules (task layers, biases of bitfit, …): each
  variant keeps its own tensor, and activation points the base parameter's data (or the
  buffer) at it, with no copy; the base's own tensor is kept for variants that do not train it;
- a model that classifies by class name (seem's text-space classifier): each variant's own
  class names' text embeddings, computed once at load and swapped in with the variant.

A tensor of the shared model has one name there; `_Names` gives its name in a variant's model
loaded alone (the other variants' peft layers unwrapped, the variant's adapter called
"default", as its checkpoint names it) and in the bare base.

Every checkpoint must be a run checkpoint of the same model (config and class count) and
must have been trained on the very base built here: its base fingerprint is recomputed
over the variant's own frozen parameters under their own names, and a mismatch is refused,
naming the file. Each checkpoint is read and checked as `peftseg.checkpoint.load` checks one
(`describe`: metadata, library versions, classes=, overrides, the dataset's classes), and
`loaded(v)` hands the commands the same `Loaded` a single checkpoint gives them, so that
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

from peftseg.checkpoint.files import MERGED_KEY, checkpoint_file, fingerprint, read_checkpoint_file
from peftseg.checkpoint.provenance import adapt_to_installed_peft
from peftseg.checkpoint.load import Described, Loaded, describe
from peftseg.errors import UserError
from peftseg.methods._attached import Attached, attached_modules
from peftseg.methods._peft import adapters_in
from peftseg.models import family_of
from peftseg.params import ParamCounts, count_named

log = logging.getLogger(__name__)


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
    # "<host name>.<slot>" -> (host, the module its method attached there), on while it is active
    attached: dict[str, tuple[nn.Module, Attached]] = field(default_factory=dict)
    swapped: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name -> its own tensor
    trainable: set[str] = field(default_factory=set)  # its trained parameters, named as in its model alone
    added_bytes: int = 0  # its own modules' tensors (peft adapter, attached modules)
    counts: ParamCounts | None = None  # peftseg.params.count_parameters of its model alone

    @property
    def children(self) -> dict[str, nn.Module]:
        """The modules its method attached, by "<host name>.<slot>"."""
        return {key: module for key, (_, module) in self.attached.items()}

    @property
    def swapped_bytes(self) -> int:
        return sum(_nbytes(t) for t in self.swapped.values())

    @property
    def delta_bytes(self) -> int:
        """What this variant adds to the resident shared model."""
        return self.added_bytes + self.swapped_bytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _held(module: nn.Module, leaf: str) -> torch.Tensor:
    """The tensor `module.<leaf>` holds: a parameter's data, or the buffer itself."""
    t = getattr(module, leaf)
    return t.detach() if isinstance(t, nn.Parameter) else t


def _put(module: nn.Module, leaf: str, tensor: torch.Tensor) -> None:
    """Point `module.<leaf>` at `tensor`: the parameter object stays (its data changes)."""
    current = getattr(module, leaf)
    if isinstance(current, nn.Parameter):
        current.data = tensor
    else:
        setattr(module, leaf, tensor)


class _Names:
    """The names of the shared model's tensors as one variant's model alone, or the bare base,
    has them; built from the model's peft layers as they are now."""

    def __init__(self, model: nn.Module):
        self.tuners = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        self.held = {n: adapters_in(m) for n, m in self.tuners.items()}

    def of(self, name: str, adapter: str | None) -> str | None:
        """`name` in the model of the variant with peft adapter `adapter` loaded alone: peft layers
        holding none of its adapter unwrapped (`x.base_layer.w` -> `x.w`), its adapter named
        "default"; None for another variant's adapter tensor. adapter=None: the base's name."""
        parts, out, path, rename = name.split("."), [], "", False
        for i, seg in enumerate(parts):
            layer = self.tuners.get(path)
            if layer is not None and seg == "base_layer" and adapter not in self.held[path]:
                path += ".base_layer"
                continue
            if layer is not None and seg in (*layer.adapter_layer_names, *layer.other_param_names):
                if i + 1 < len(parts) and parts[i + 1] != adapter:
                    return None
                rename = True
            elif rename:
                seg, rename = "default", False
            out.append(seg)
            path = f"{path}.{parts[i]}" if path else parts[i]
        return ".".join(out)


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

    def __init__(self, model: nn.Module, class_names: list[str]):
        """`model`: the bare base, built for `class_names`."""
        self.model = model
        self.variants: list[Variant] = []
        self.active: Variant | None = None
        self._base_state = model.state_dict(keep_vars=True)  # the bare base's tensors, by name
        self._slots: dict[str, tuple[nn.Module, str]] = {}  # base name -> (module, attribute) of a swapped tensor
        self._base: dict[str, torch.Tensor] = {}  # base name -> the base's own tensor, for the swapped ones
        by_name = hasattr(model, "set_class_names")  # its class names' text embeddings, as built
        self._class_states = {tuple(class_names): model.class_state()} if by_name else {}
        self.base_bytes, _ = _tensor_bytes(self._base_state.values())  # resident bytes of the shared base
        self.full_base_bytes = self.base_bytes  # the base model as built, every tensor

    def __iter__(self):
        return iter(self.variants)

    def get(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def class_state(self, class_names: list[str]) -> tuple | None:
        """A model that classifies by class name (seem): the text embeddings of `class_names`, as
        build_model computes them for them alone, on the base's (always frozen) text encoder; once
        per list of names. None for other models."""
        if not hasattr(self.model, "set_class_names"):
            return None
        key = tuple(class_names)
        if key not in self._class_states:
            self.model.set_class_names(list(key))
            self._class_states[key] = self.model.class_state()
        return self._class_states[key]

    def to(self, device) -> "VariantSet":
        """Move the model and every variant's kept tensors (only the active ones sit in the model)."""
        self.activate(None)
        self.model.to(device)
        self._base = {key: _held(*self._slots[key]) for key in self._base}  # the moved model's own
        moved: dict[tuple[str, ...], tuple] = {}  # variants of the same classes share one embedding tensor
        for v in self.variants:
            for module in v.children.values():
                module.to(device)
            v.swapped = {k: t.to(device) for k, t in v.swapped.items()}
            if v.class_state is not None:
                names, emb = v.class_state
                v.class_state = moved.setdefault(tuple(names), (names, emb.to(device)))
        return self

    def activate(self, variant: Variant | str | None) -> nn.Module:
        """The shared model computing as `variant` loaded alone would (None: the bare base)."""
        from peft.functional import set_adapter

        if isinstance(variant, str):
            variant = self.get(variant)
        if self.active is not None:
            for host, module in self.active.attached.values():
                module.detach(host)
        for key, tensor in self._base.items():
            _put(*self._slots[key], tensor)
        self.active = variant
        adapter = variant.adapter if variant is not None else None
        if variant is not None:
            for host, module in variant.attached.values():
                module.attach(host)
            for key, tensor in variant.swapped.items():
                _put(*self._slots[key], tensor)
            if variant.class_state is not None:  # its own classes' text embeddings (seem)
                self.model.load_class_state(variant.class_state)
        names = _Names(self.model)
        if any(adapter in held for held in names.held.values()):
            set_adapter(self.model, adapter, inference_mode=True)  # peft's multi-adapter switch
        for n, layer in names.tuners.items():
            # a layer holding no adapter of the active variant runs its wrapped layer alone
            layer.enable_adapters(adapter in names.held[n])
        for n, p in self.model.named_parameters():
            p.requires_grad_(variant is not None and names.of(n, adapter) in variant.trainable)
        return self.model

    def add(self, v: Variant, d: Described) -> bool:
        """Put variant `v` (checkpoint `d`) on the model: its method applied, with its peft adapter
        named `v.adapter`; its trained tensors loaded; its tensors and parameters measured as its
        model alone has them. False when its checkpoint was trained on another base."""
        from peftseg.methods import apply_method

        model = self.activate(None)  # the bare base: its method meets no other variant's modules
        with warnings.catch_warnings():
            # peft warns that a second adapter joins the model's peft_config: that is the point here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            if apply_method(model, v.cfg.method, adapter_name=v.adapter) is not model:
                raise RuntimeError(f"method {v.cfg.method.name} replaced the model object; variants need in-place methods")
        model.eval()  # the modules it added too, as a loaded checkpoint's model is
        v.attached, self.active = attached_modules(model), v  # on the bare base, all of them are its own
        names = _Names(model)
        _check_peft_layers(names, v, d.source)
        state = model.state_dict(keep_vars=True)
        alone = {n: own for n in state if (own := names.of(n, v.adapter)) is not None}  # shared name -> its own
        params = [(alone[n], n, p) for n, p in model.named_parameters() if n in alone]

        def is_base(n: str) -> bool:
            return self._base_state.get(names.of(n, None)) is state[n]

        v.trainable = {own for own, _, p in params if p.requires_grad}
        fits = fingerprint((own, p) for own, _, p in params if not p.requires_grad) == d.meta["base_fingerprint"]
        # its trained tensors: loaded into its own modules; a base tensor it trained kept as its own
        tensors = adapt_to_installed_peft(d.data["model"], d.meta, d.source)
        shared = {own: n for n, own in alone.items()}
        unknown = [k for k in tensors if k not in shared or tensors[k].shape != state[shared[k]].shape]
        missing = set(d.meta["trainable"]) - set(tensors)
        if unknown or missing:
            raise UserError(
                f"checkpoint {d.source} does not fit its model: unknown {sorted(unknown)[:3]}, missing "
                f"{sorted(missing)[:3]}; it was written by a different peftseg version or edited."
            )
        own_modules = {}
        for key, value in tensors.items():
            n = shared[key]
            if not is_base(n):
                own_modules[n] = value
                continue
            module_name, _, leaf = n.rpartition(".")
            base = names.of(n, None)
            self._slots.setdefault(base, (model.get_submodule(module_name), leaf))
            self._base.setdefault(base, _held(*self._slots[base]))
            v.swapped[base] = value.to(state[n].dtype).clone()
        model.load_state_dict(own_modules, strict=False)
        v.added_bytes, _ = _tensor_bytes(t.detach() for n, t in state.items() if n in alone and not is_base(n))
        v.counts = count_named(((own, p.numel(), p.requires_grad) for own, _, p in params),
                               family_of(model),
                               {own: "method" for own, n, _ in params if not is_base(n)})
        self.variants.append(v)
        return fits

    def release_unused_base_tensors(self) -> int:
        """Drop the base's own copy of every tensor that all variants replace (typically the
        task layers, which every run trains): nothing would ever compute with it. Returns the
        bytes released; after this, `activate(None)` leaves those tensors at the last variant's."""
        released = 0
        for key in [k for k in self._base if all(k in v.swapped for v in self.variants)]:
            tensor = self._base.pop(key)
            _put(*self._slots[key], self.variants[0].swapped[key])
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
        return (self.get(variant) if isinstance(variant, str) else variant).counts

    def memory(self) -> dict:
        """Bytes of tensors: the base once + each variant's delta, vs N separate models.

        Measured by summing the bytes of the tensors each part holds: the base's (less the
        ones every variant replaces, released), each variant's own modules and replacement
        tensors. A separate model of a variant holds the full base + its own modules."""
        deltas = {v.name: v.delta_bytes for v in self.variants}
        separate = {v.name: self.full_base_bytes + v.added_bytes for v in self.variants}
        return {"base": self.base_bytes, "variants": deltas, "shared_total": self.base_bytes + sum(deltas.values()),
                "separate_total": sum(separate.values()), "separate": separate}


def _check_peft_layers(names: _Names, v: Variant, source: Path) -> None:
    for n, layer in names.tuners.items():
        if isinstance(layer.base_layer, BaseTunerLayer):
            raise UserError(
                f"checkpoint {source} ({v.cfg.method.name}) adapts {n}, which another variant's peft method of "
                "another kind already wraps; peft keeps one kind of adapter per layer, so give variants of "
                "different peft methods in separate commands."
            )
        if "default" in names.held[n]:
            raise UserError(
                f"checkpoint {source} ({v.cfg.method.name}): its method injects its peft adapter under peft's default "
                "name, not the variant's own, so it cannot share one model with other variants; predict with it "
                "alone (checkpoint=<its run dir>)."
            )


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

    from peftseg.models import build_model

    if len(checkpoints) < 2:
        raise UserError("checkpoint=[…] lists one checkpoint; give it as checkpoint=<run dir>, or list several.")
    items = _read(checkpoints, overrides, classes, need_dataset)
    _check_same_model(items)
    first = items[0]
    # the base exactly as build_for_run makes it for each of them (its classes: the first's; a
    # model that classifies by class name gets each variant's own)
    seed_all_rng(first.cfg.train.seed)
    vset = VariantSet(build_model(first.cfg.model, num_classes=len(first.class_names),
                                  class_names=list(first.class_names)).eval(), first.class_names)
    mismatched = []
    for i, (d, name) in enumerate(zip(items, variant_names([d.source for d in items], reserved_names))):
        v = Variant(name=name, adapter=f"variant{i}", source=d.source, cfg=d.cfg, class_names=list(d.class_names),
                    splits=d.splits, class_state=vset.class_state(d.class_names))
        if not vset.add(v, d):
            mismatched.append(d)
    if mismatched:
        odd = "; ".join(f"{d.source} (model.weights={d.cfg.model.weights!r}, train.seed={d.cfg.train.seed})"
                        for d in mismatched)
        raise UserError(
            f"checkpoint(s) {odd} were trained on other frozen base weights than the base built here for "
            f"{first.source} (model.weights={first.cfg.model.weights!r}, train.seed={first.cfg.train.seed}); variants "
            "share one base, so give only checkpoints of runs on the same base weights (a random base: the same "
            "train.seed) and predict with the others separately."
        )
    vset.release_unused_base_tensors()
    vset.activate(None)
    return vset
