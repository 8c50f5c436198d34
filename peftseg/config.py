"""Structured-config schema and its validation at compose time.

Each YAML under conf/<group>/ extends its schema (`/schema/<group>/<name>@_here_`), so
a mistyped key or a wrong type in an override fails in Hydra, before any model is built.
Schemas live under `schema/` so they don't show up as choices of the real groups; they
are the config classes of the registered methods, model families and datasets.

A registered method or dataset is an option of its group whether or not a yaml sets its
values: without one, its config dataclass (defaults, `name` set) is the option itself.
Model presets and train recipes are the yamls under conf/model/ and conf/train/.

`validate(cfg)` builds every group's dataclass (`OmegaConf.to_object`), which runs the
range and choice checks in their `__post_init__`, and refuses keys no dataclass defines
(Hydra's `+group.key=…` adds them past the schema). It runs before any heavy import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException

from peftseg import checks
from peftseg.errors import UserError
from peftseg.registry import DATASETS, FAMILIES, GROUPS, METHODS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OPTIMIZERS = ("adamw", "sgd", "loraplus", "lorafa")
LR_SCHEDULES = ("cosine", "step")
AMP_DTYPES = ("bf16", "fp16")  # bf16 first: the default, and the one CPUs run
# what train.checkpoint_parts may name (peftseg/build/activation_checkpointing.py reads them)
CHECKPOINT_PARTS = ("blocks", "mlp", "neck", "heads")


@dataclass
class TrackingConfig:
    """`tracking.*` (set by +tracking=mlflow)."""
    uri: str = ""  # empty: sqlite:///mlflow.db here (MLflow's default); or http://host:5000, ./mlruns (file store)
    experiment: str = "peftseg"


def check_checkpoint_parts(parts) -> tuple[str, ...]:
    """train.checkpoint_parts as a tuple, or one UserError paragraph naming the fix."""
    parts = tuple(parts)
    unknown = [p for p in parts if p not in CHECKPOINT_PARTS]
    if unknown or not parts or len(set(parts)) != len(parts):
        why = (f"names {unknown}, which {'is not a part' if len(unknown) == 1 else 'are not parts'}"
               if unknown else "is empty" if not parts else "names a part twice")
        raise UserError(
            f"train.checkpoint_parts={list(parts)} {why}. List one or more of {list(CHECKPOINT_PARTS)}, "
            "each once: blocks (the transformer blocks, what train.activation_checkpointing=true "
            "recomputes by default), mlp (only each backbone block's MLP), neck (the feature pyramid "
            "or pixel decoder), heads (the RPN/ROI or prediction heads); e.g. "
            "train.checkpoint_parts=[blocks,neck,heads].")
    return parts


@dataclass
class TrainConfig:
    name: str = "default"
    max_iter: int = 1000
    ims_per_batch: int = 4
    # adamw | sgd | loraplus (AdamW, LoRA's B at loraplus_lr_ratio x the LR of A) |
    # lorafa (LoRA-FA: A frozen at its start, B trained with a projected AdamW); the last two: LoRA methods only
    optimizer: str = "adamw"
    loraplus_lr_ratio: float = 16.0  # train.optimizer=loraplus: LR of LoRA's B / LR of its A
    base_lr: float = 1e-3  # backbone (and anything without a group LR below)
    peft_lr: Optional[float] = None  # LR of method modules (LoRA, adapters…); None: base_lr
    non_backbone_lr: Optional[float] = None  # LR of neck, decoder and task heads; None: base_lr
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.05
    lr_schedule: str = "cosine"  # cosine | step
    lr_steps: list[float] = field(default_factory=lambda: [0.8, 0.9])  # fractions of max_iter
    warmup_iters: int = 50
    warmup_factor: float = 0.001
    # global (full-model) gradient-norm clip of the trainable parameters; None: the model
    # preset's recipe value (model.clip_grad_norm: 0 for Mask R-CNN, 0.01 for Mask2Former); 0: off
    clip_grad_norm: Optional[float] = None
    eval_period: int = 0  # 0: evaluate once, at the end
    checkpoint_period: int = 0  # 0: only the final checkpoint
    resume: str = ""  # a run dir or model_*.pth: continue its iteration, optimizer and scheduler
    log_period: int = 20
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # mixed precision (detectron2's AMPTrainer on CUDA; CPU autocast on CPU)
    amp_dtype: str = "bf16"  # bf16 | fp16 (fp16: CUDA only)
    # recompute each transformer block in backward instead of storing its activations
    activation_checkpointing: bool = False
    # what activation checkpointing recomputes: blocks (the transformer blocks), mlp (only each
    # backbone block's MLP), neck (feature pyramid / pixel decoder), heads (RPN/ROI or
    # prediction heads); read only with train.activation_checkpointing=true
    checkpoint_parts: list[str] = field(default_factory=lambda: ["blocks"])
    # torch.compile (inductor) of the model's transformer blocks, in place (peftseg.engine.compile):
    # the first step compiles (tens of seconds on the CPU); checkpoints keep the uncompiled keys
    compile: bool = False
    num_workers: int = 2
    # CPU threads torch computes with in this run (torch.set_num_threads); null: torch's default
    # (OMP_NUM_THREADS, else one per core). 1 when other jobs share the cores; the record keeps
    # the number used
    threads: Optional[int] = None
    seed: int = 0
    progress: bool = True
    timing_warmup_iters: int = 5  # steps excluded from the mean step time
    # Multi-process training (detectron2's launch); ims_per_batch is the total over all processes.
    num_gpus: int = 1  # processes per machine: one per GPU, or CPU processes (gloo) without CUDA
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"  # tcp://host:port of machine 0; auto: a free local port
    find_unused_parameters: bool = False  # DDP's; only for trainable params a forward can skip

    def __post_init__(self) -> None:
        for key, low in (("max_iter", 1), ("ims_per_batch", 1), ("log_period", 1), ("num_gpus", 1),
                         ("num_machines", 1), ("warmup_iters", 0), ("eval_period", 0),
                         ("checkpoint_period", 0), ("num_workers", 0),
                         ("timing_warmup_iters", 0), ("machine_rank", 0)):
            checks.integer(f"train.{key}", getattr(self, key), minimum=low)
        if self.threads is not None:
            checks.integer("train.threads", self.threads, minimum=1,
                           why="null keeps torch's default, one thread per core; e.g. train.threads=1 on shared cores")
        # numpy's and detectron2's seeding take 32-bit seeds: 2**32 would fail mid-setup
        checks.integer("train.seed", self.seed, minimum=0, maximum=2**32 - 1, why="numpy seeds are 32-bit")
        checks.choice("train.optimizer", self.optimizer, OPTIMIZERS)
        checks.choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        checks.choice("train.amp_dtype", self.amp_dtype, AMP_DTYPES)
        checks.number("train.base_lr", self.base_lr, low=0, low_open=True, why="e.g. train.base_lr=1e-3")
        for key in ("peft_lr", "non_backbone_lr"):
            if getattr(self, key) is not None:
                checks.number(f"train.{key}", getattr(self, key), low=0, low_open=True,
                              why="or null to use train.base_lr")
        checks.number("train.loraplus_lr_ratio", self.loraplus_lr_ratio, low=0, low_open=True,
                      why="B's learning rate is this times A's; LoRA+ suggests 16, and 1 is plain AdamW")
        checks.number("train.momentum", self.momentum, low=0, high=1, high_open=True)
        checks.number("train.weight_decay", self.weight_decay, low=0, why="0 disables weight decay")
        checks.number("train.warmup_factor", self.warmup_factor, low=0, high=1,
                      why="the LR starts at warmup_factor × base_lr and ramps up to base_lr")
        if self.clip_grad_norm is not None:
            checks.number("train.clip_grad_norm", self.clip_grad_norm, low=0,
                          why="0 disables clipping, null takes the model preset's value")
        for f in self.lr_steps:
            checks.number("train.lr_steps", f, low=0, high=1, low_open=True, high_open=True,
                          why="each step is a fraction of train.max_iter, e.g. [0.8, 0.9]")
        if list(self.lr_steps) != sorted(set(self.lr_steps)):  # [0.5, 0.5] is one step given twice
            raise UserError(f"train.lr_steps={list(self.lr_steps)} must be strictly increasing fractions (each "
                            "step once), e.g. [0.8, 0.9].")
        check_checkpoint_parts(self.checkpoint_parts)
        if not self.activation_checkpointing and list(self.checkpoint_parts) != ["blocks"]:
            # refused: the parts would be read by nothing, and the run's record would claim them
            raise UserError(
                f"train.checkpoint_parts={list(self.checkpoint_parts)} is set but train.activation_checkpointing "
                "is false, so nothing would be checkpointed. Add train.activation_checkpointing=true, or "
                "drop the train.checkpoint_parts override.")
        if self.warmup_iters >= self.max_iter:
            # refused, not warned: the record would carry a base_lr the run never trained at
            peak = self.warmup_factor + (1 - self.warmup_factor) * (self.max_iter - 1) / self.warmup_iters
            raise UserError(
                f"train.warmup_iters={self.warmup_iters} is not shorter than train.max_iter={self.max_iter}: the "
                f"learning rate would still be warming up when training ends (it would peak at {peak:.3g} x "
                "train.base_lr), so the run would not train at the train.base_lr its record states. Lower "
                f"train.warmup_iters (e.g. train.warmup_iters={self.max_iter // 10}) or raise train.max_iter.")
        if not (self.device in ("auto", "cpu", "cuda") or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise UserError(
                f"train.device={self.device!r} is not one of the choices: auto, cpu, cuda, cuda:N "
                "(e.g. train.device=auto)."
            )
        if self.compile and self.num_gpus * self.num_machines > 1:
            raise UserError(
                f"train.compile=true is not supported with multi-process training (train.num_gpus={self.num_gpus}, "
                f"train.num_machines={self.num_machines}): compiled blocks inside DistributedDataParallel are not "
                "verified by peftseg. Run with train.compile=false (eager PyTorch, the same training), or train on "
                "one process.")
        if not 0 <= self.machine_rank < self.num_machines:
            raise UserError(
                f"train.machine_rank={self.machine_rank} must be in [0, train.num_machines="
                f"{self.num_machines}); give each machine its own rank, 0 for the one that writes "
                "the record."
            )


@dataclass
class Config:
    model: Any = MISSING
    method: Any = MISSING
    dataset: Any = MISSING
    train: TrainConfig = MISSING
    # what `peftseg search` optimises (and the train task returns): one name of
    # peftseg.experiments.objectives.OBJECTIVES or a list of them (multi-objective)
    objective: Any = "segm_ap"
    tracking: Optional[TrackingConfig] = None  # set by +tracking=mlflow


def schemas() -> dict[str, dict[str, type]]:
    """group -> {schema name -> dataclass}, from the registries."""
    return {
        "model": {spec.name: spec.config for spec in FAMILIES},
        "method": {spec.name: spec.config for spec in METHODS},
        "dataset": {spec.name: spec.config for spec in DATASETS},
        "train": {"train": TrainConfig},
    }


# the groups whose options are registrations (a yaml there only sets values)
REGISTERED = {"model": FAMILIES, "method": METHODS, "dataset": DATASETS}


def typed_group(group: str, values: dict) -> DictConfig:
    """A saved config's `group` (a checkpoint's resolved values) typed by its schema: the
    registered dataclass of its family, method or dataset, or TrainConfig. OmegaConf's
    errors for a value the schema lacks or cannot hold; UserError for an unknown name."""
    if group == "model":
        schema = FAMILIES.get(values["family"]).config
    elif group == "train":
        schema = TrainConfig
    else:
        schema = REGISTERED[group].get(values["name"]).config
    return OmegaConf.merge(OmegaConf.structured(schema), values)


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, by_name in schemas().items():
        for name, node in by_name.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    for group, registry in REGISTERED.items():
        presets = set(_presets(group))
        for spec in registry:
            if spec.name not in presets:  # no yaml: the dataclass's defaults are the option
                node = OmegaConf.structured(spec.config)
                node.name = spec.name
                cs.store(group=group, name=spec.name, node=node)


def compose_config(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """conf/config.yaml with `overrides`, composed by Hydra exactly as `peftseg train` would
    (schemas registered first); for code and tests that need a config without a CLI run."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def _unknown_keys(node: DictConfig, path: str) -> list[str]:
    """Keys of `node` (recursively) that its dataclass does not define."""
    cls = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(cls):
        return []
    fields = {f.name for f in dataclasses.fields(cls)}
    out = []
    for key in node.keys():
        if key not in fields:
            out.append(f"{path}.{key}")
            continue
        # a missing value has no keys to check; an interpolation's keys are checked where it points
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        child = node[key]
        if isinstance(child, DictConfig):  # a None (optional) group of settings is no DictConfig here
            out += _unknown_keys(child, f"{path}.{key}")
    return out


def _close(key: str, fields: list[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key.rsplit(".", 1)[-1], fields, n=1)
    return f" (did you mean {key.rsplit('.', 1)[0]}.{match[0]}?)" if match else ""


def validate(cfg: DictConfig) -> None:
    """Every group's values checked, unknown keys refused: UserError naming the field."""
    for group in GROUPS:
        node = cfg[group]
        unknown = _unknown_keys(node, group)
        if unknown:
            owner = unknown[0].rsplit(".", 1)[0]  # the group, or a group of settings inside it
            fields = [f.name for f in dataclasses.fields(OmegaConf.get_type(OmegaConf.select(cfg, owner)))]
            whose = "its settings" if owner == group else f"the settings of {owner}"
            raise UserError(
                f"{unknown[0]} is not a setting of {group} {node.get('name')!r}{_close(unknown[0], fields)}; "
                f"{whose} are: {', '.join(fields)}. Remove the key (a leading '+' adds keys "
                "that nothing would read)."
            )
        if OmegaConf.missing_keys(node):
            continue  # a required value (???) unset: its builder names what to pass
        try:
            OmegaConf.to_object(node)  # runs the dataclass's __post_init__ checks
        except OmegaConfBaseException as e:
            cause = e.__cause__ if isinstance(e.__cause__, UserError) else None
            if cause is not None:
                raise cause from None
            raise UserError(f"{group}: {e}") from None


def default_choices() -> dict[str, str]:
    """group -> the option a run takes when none is given: conf/config.yaml's defaults list."""
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", [])
    return {key: str(value) for entry in defaults if isinstance(entry, DictConfig)
            for key, value in entry.items() if key in GROUPS}


def group_options(group: str) -> list[str]:
    """What `group=<name>` may name: the yamls under conf/<group>/ and, for methods and
    datasets, every registered one."""
    names = set(_presets(group))
    if group in REGISTERED:
        names |= set(REGISTERED[group].names())
    return sorted(names)


def check_group_choices(overrides: list[str]) -> None:
    """Name the available options for an unknown model/method/dataset/train before Hydra
    starts (Hydra's own message is a traceback-like block). Sweep syntax is understood:
    each element of `a,b` and `choice(a,b)` is checked; `glob(...)` must match something."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, ValueType
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException as e:
            raise UserError(f"cannot read the override {arg!r}: {e}") from None
        group = override.key_or_group
        if group not in GROUPS or override.is_delete():
            continue
        options = group_options(group)
        value = override.value()
        if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            assert isinstance(value, Glob)
            if not value.filter(options):
                raise UserError(
                    f"{arg!r} matches no {group} option; available {group} options: {', '.join(options)}."
                )
            continue
        choices = list(override.sweep_iterator()) if override.is_sweep_override() else [value]
        for choice in choices:
            if choice not in options:
                raise UserError(
                    f"Unknown {group} {choice!r}. Available {group} options: {', '.join(options)}. "
                    f"Pick one with `{group}=<name>` (`peftseg list` describes each)."
                )


MAX_CHECKED_MEMBERS = 16  # sweep members composed up front (each takes a fraction of a second)


def _compose_error(exc: Exception, overrides: list[str], where: str) -> UserError:
    """Hydra's refusal of `overrides` as one paragraph naming the override and the fix."""
    text = str(exc)
    cause = exc.__cause__ if isinstance(exc.__cause__, UserError) else None
    if cause is not None:
        return cause
    detail = str(exc.__cause__ or "")
    if "Could not override" in text and isinstance(exc.__cause__, ConfigAttributeError):
        key = text.split("'")[1]
        given = next((o for o in overrides if o.split("=", 1)[0] == key), None)
        if given is not None:  # the same key added: validate() names the group's settings and a close match
            try:
                validate(compose_config([o for o in overrides if o != given] + ["+" + given]))
            except UserError as e:
                return UserError(f"{where}{e}")
            except Exception:
                pass
        return UserError(f"{where}{key} is not a setting of this config; see `peftseg train --help` for the settings.")
    first = next((line.strip() for line in (detail or text).splitlines() if line.strip()), text)
    full_key = next((line.split(":", 1)[1].strip() for line in detail.splitlines()
                     if line.strip().startswith("full_key:")), None)
    given = next((o for o in overrides if full_key and o.split("=", 1)[0].lstrip("+~") == full_key), None)
    if given is not None:
        return UserError(f"{where}{given} cannot be applied: {first}. Give {full_key} a value of its type (see "
                         "`peftseg train --help` for each setting and its default).")
    return UserError(f"{where}the overrides cannot be applied: {text.splitlines()[0]} ({first}).")


def check_overrides(argv: list[str]) -> None:
    """Compose the run's config (or each sweep member's, up to MAX_CHECKED_MEMBERS) before Hydra's
    app starts, so a key the schema lacks (`method.rnk=4`) or a value of the wrong type
    (`train.max_iter=abc`) is one paragraph naming it, not Hydra's raw error; in a sweep the
    member named is one that was asked for (Hydra's own check composes the default method)."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = any(a in ("-m", "--multirun") for a in argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # Hydra's own flags (--cfg, --info, …): Hydra handles those
    overrides = [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    if not sweep:
        members = [overrides]
    else:
        parser = OverridesParser.create()
        choices = []
        for arg in overrides:
            (override,) = parser.parse_overrides([arg])  # readable: check_group_choices parsed it
            if override.is_sweep_override() and not override.is_delete():
                try:
                    values = list(override.sweep_string_iterator())
                except Exception:  # range/interval sweeps of a search sweeper: leave to it
                    values = None
                if values:
                    key = override.get_key_element()
                    choices.append([f"{key}={v}" for v in values])
                    continue
                return
            choices.append([arg])
        members = [list(m) for m in itertools.islice(itertools.product(*choices), MAX_CHECKED_MEMBERS)]
    for member in members:
        where = f"in the sweep member `{' '.join(member)}`: " if sweep else ""
        try:  # composition only: a bad value is validate()'s, in the run (a sweep records it and goes on)
            compose_config(member)
        except Exception as e:  # Hydra's ConfigCompositionException, OmegaConf's ValidationError
            raise _compose_error(e, member, where) from None
