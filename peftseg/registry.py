"""Registries: every method, model family and dataset exists in exactly one registration,
next to its code. Config schemas, the CLI's lists and help, accounting, learning-rate
groups, merge refusal and report ordering all read these, so adding a method is one
module under `peftseg/methods/` (a yaml under `conf/method/` is optional: it only sets
values other than the dataclass's defaults); a dataset likewise.

Detectron2's `Registry` maps a name to one object; a spec here carries a config class and
properties next to the callable, so the spec is a small frozen dataclass of our own.

This module and every registering module stay free of heavy imports (torch, detectron2,
peft) at import time: the CLI composes and validates the config from these registries
before any of those load, so a bad value fails in well under two seconds. Heavy imports
live inside `apply`/`build`/`register` bodies.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

S = TypeVar("S")

# the config groups a run is made of, one option of each: a model preset, a method, a dataset
# and a train recipe
GROUPS = ("model", "method", "dataset", "train")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type  # its settings (`method.*`); conf/method/<name>.yaml, if any, sets values of it
    apply: Callable[[Any, Any], Any]  # apply(model, cfg) -> model
    summary: str  # one line, for `peftseg list` and help
    # peft-backed updates that `peftseg merge` can fold into the base weights
    mergeable: bool = False
    # whether the method inserts modules (accounted as group `peft`, trained at peft_lr)
    adds_parameters: bool = False
    # report order: baselines first, then methods by the usual size of their footprint
    order: int = 100
    # places its modules per backbone block, so it reads `method.blocks` (last:4, [8,9], …)
    block_aware: bool = False
    # every weight trains: nothing is frozen (so e.g. a bf16-stored frozen base is refused)
    trains_everything: bool = False
    # its colour in every picture (pareto.png, curves); "": a stable colour from its name
    colour: str = ""
    # FamilyMap fields the method needs set (e.g. "token_grid" for Mona's convolutions): on a
    # family without them it refuses with a message, which the contract test expects
    requires: tuple = ()
    # the knobs `peftseg search` samples for this method, with their ranges
    # (peftseg.search_space.Int/Float/Choice over keys under `method.`); empty: the method
    # is searched as it is configured
    search_space: tuple = ()


@dataclass(frozen=True)
class FamilySpec:
    name: str
    config: type  # base dataclass of the family's presets (conf/model/*.yaml)
    build: Callable[[Any, int], Any]  # build(cfg, num_classes) -> detectron2 model
    family_map: Any  # peftseg.models.family.FamilyMap
    summary: str
    # foreign checkpoint layouts `model.weights` can load into this family's backbone
    # (peftseg.models.family.WeightLayout), beside detectron2 checkpoints of the model itself
    weight_layouts: tuple = ()


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    config: type
    register: Callable[[Any], Any]  # register(cfg) -> peftseg.data.DatasetSplits
    summary: str
    # detectron2's MetadataCatalog `evaluator_type` convention: which evaluator scores it
    evaluator_type: str = "coco"


class Registry(Generic[S]):
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self._package = package
        self._specs: dict[str, S] = {}
        self._loaded = False

    def add(self, spec: S) -> S:
        name = spec.name  # type: ignore[attr-defined]
        if name in self._specs and self._specs[name] is not spec:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._specs[name] = spec
        return spec

    def _load(self) -> None:
        # import every module of the package once: registering is a side effect of import
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self._package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith("_"):  # private to the package: imported by its users
                continue
            # a public module (or a subpackage's top) is imported here, before torch loads: it
            # stays light, its heavy imports inside functions or in a subpackage's modules
            importlib.import_module(f"{self._package}.{info.name}")

    def get(self, name: str) -> S:
        self._load()
        if name not in self._specs:
            from peftseg.errors import UserError

            raise UserError(
                f"{self.kind} {name!r} is not known; the {self.kind}s are: {', '.join(self.names())}."
            )
        return self._specs[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._specs, key=lambda n: (getattr(self._specs[n], "order", 100), n))

    def __iter__(self) -> Iterator[S]:
        return iter(self.get(n) for n in self.names())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._specs


def check_config(cfg) -> None:
    """Run a config's dataclass checks (`__post_init__`): `OmegaConf.to_object` builds the
    dataclass. The CLI does this for the whole config at compose time; builders call it too,
    so code that uses them directly gets the same answers."""
    from omegaconf import OmegaConf

    # a value without a default (???) is left to the builder, whose message says what to pass
    if OmegaConf.is_config(cfg) and not OmegaConf.missing_keys(cfg):
        OmegaConf.to_object(cfg)


METHODS: Registry[MethodSpec] = Registry("method", "peftseg.methods")
FAMILIES: Registry[FamilySpec] = Registry("model family", "peftseg.models")
DATASETS: Registry[DatasetSpec] = Registry("dataset", "peftseg.data")


def register_method(name: str, *, config: type, summary: str, **properties):
    """Decorator on a method module's `apply(model, cfg)`; `properties` are MethodSpec's
    fields after `summary` (mergeable, adds_parameters, order, block_aware, …)."""
    def deco(apply: Callable) -> Callable:
        METHODS.add(MethodSpec(name, config, apply, summary, **properties))
        return apply
    return deco


def register_family(name: str, *, config: type, family_map: Any, summary: str, weight_layouts: tuple = ()):
    """Decorator on a family module's `build(cfg, num_classes)`."""
    def deco(build: Callable) -> Callable:
        FAMILIES.add(FamilySpec(name, config, build, family_map, summary, tuple(weight_layouts)))
        return build
    return deco


def register_dataset(name: str, *, config: type, summary: str, evaluator_type: str = "coco"):
    """Decorator on a dataset module's `register(cfg) -> DatasetSplits`."""
    def deco(register: Callable) -> Callable:
        DATASETS.add(DatasetSpec(name, config, register, summary, evaluator_type))
        return register
    return deco
