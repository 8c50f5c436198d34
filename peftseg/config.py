"""Structured-config schema: every config group option is typed by a dataclass.

Each YAML under conf/<group>/ extends its schema (`/schema/<group>/<name>@_here_`), so
a mistyped key or a wrong type in an override fails in Hydra, before any model is built.
Schemas live under `schema/` so they don't show up as choices of the real groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from peftseg.data.register import CocoDatasetConfig, CocoFormatDatasetConfig
from peftseg.data.shapes import ShapesDatasetConfig
from peftseg.methods.adapter import AdapterConfig
from peftseg.methods.combine import AdapterLoraConfig
from peftseg.methods.full import FullConfig
from peftseg.methods.heads import HeadsConfig
from peftseg.methods.bitfit import BitfitConfig
from peftseg.methods.ia3 import Ia3Config
from peftseg.methods.loha import LohaConfig
from peftseg.methods.lokr import LokrConfig
from peftseg.methods.lora import LoraConfig
from peftseg.models.mask2former import Mask2FormerConfig
from peftseg.models.swin import SwinConfig
from peftseg.models.vitdet import VitDetConfig


@dataclass
class TrainConfig:
    name: str = "default"
    max_iter: int = 1000
    ims_per_batch: int = 4
    optimizer: str = "adamw"  # adamw | sgd
    base_lr: float = 1e-3  # backbone (and anything without a group LR below)
    peft_lr: Optional[float] = None  # LR of method modules (LoRA, adapters…); None: base_lr
    heads_lr: Optional[float] = None  # LR of neck + heads; None: base_lr
    momentum: float = 0.9
    weight_decay: float = 0.05
    lr_schedule: str = "cosine"  # cosine | step
    lr_steps: list[float] = field(default_factory=lambda: [0.8, 0.9])  # fractions of max_iter
    warmup_iters: int = 50
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0 disables
    eval_period: int = 0  # 0: evaluate once, at the end
    checkpoint_period: int = 0  # 0: only the final checkpoint
    resume: str = ""  # a run dir or model_*.pth: continue its iteration, optimizer and scheduler
    log_period: int = 20
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False
    num_workers: int = 2
    seed: int = 0
    progress: bool = True
    timing_warmup_iters: int = 5  # steps excluded from the mean step time
    # Multi-process training (detectron2's launch); ims_per_batch is the total over all processes.
    num_gpus: int = 1  # processes per machine: one per GPU, or CPU processes (gloo) without CUDA
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"  # tcp://host:port of machine 0; auto: a free local port
    find_unused_parameters: bool = False  # DDP's; only for trainable params a forward can skip


@dataclass
class Config:
    model: Any = MISSING
    method: Any = MISSING
    dataset: Any = MISSING
    train: TrainConfig = MISSING


SCHEMAS = {
    "model": {"vitdet": VitDetConfig, "mask2former": Mask2FormerConfig, "swin": SwinConfig},
    "method": {"full": FullConfig, "heads": HeadsConfig, "lora": LoraConfig,
               "loha": LohaConfig, "lokr": LokrConfig, "ia3": Ia3Config, "bitfit": BitfitConfig,
               "adapter": AdapterConfig, "adapter_lora": AdapterLoraConfig},
    "dataset": {
        "shapes": ShapesDatasetConfig,
        "coco": CocoDatasetConfig,
        "coco_format": CocoFormatDatasetConfig,
    },
    "train": {"train": TrainConfig},
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
