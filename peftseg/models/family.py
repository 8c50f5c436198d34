"""What methods and accounting may know about a model family: names, never code.

Each family publishes one FamilyMap. Methods freeze, unfreeze and wrap modules only
through it, so a new family needs no change in any method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

# backbone: the pretrained feature extractor; neck: FPN / pixel decoder; decoder: a query-based
# model's transformer decoder; task_heads: the class, box and mask predictors (and an R-CNN's
# RPN and ROI heads); text: a language encoder that no method trains (seem's class-name
# encoder). "heads" alone is ambiguous: the code says which set it means.
ACCOUNTING_GROUPS = ("backbone", "neck", "decoder", "task_heads", "text")

# the channel orders a family's model may take its images in (model.input_format)
INPUT_FORMATS = ("RGB", "BGR")


@dataclass(frozen=True)
class TokenGrid:
    """How the blocks of `FamilyMap.backbone_blocks` carry a 2-D token grid, for methods that
    convolve over it (Mona). `norm` is the block's child whose input is the token stream right
    after the attention residual (the pre-MLP norm); the block's output is that stream plus the
    MLP's output. `layout` says where the grid (H, W) comes from:
    - "bhwc": the tokens are (B, H, W, C) (detectron2's ViT);
    - "block_hw": the tokens are (B, H·W, C) and the block holds `.H`, `.W`, set by its stage
      before each call (detectron2's Swin);
    - "input_dimensions": the tokens are (B, H·W, C) and the block's second argument
      `input_dimensions` is (H, W) (transformers' Swin)."""

    norm: str
    layout: str


@dataclass(frozen=True)
class FamilyMap:
    name: str  # the family, for messages
    # accounting group -> parameter-name prefixes; the longest matching prefix wins, so
    # "backbone.net." (backbone) can sit inside "backbone." (neck)
    groups: dict[str, tuple[str, ...]]
    # adapter site -> regex that fullmatches the modules adapters follow, one per
    # transformer block: "attn" (attention sub-layer) and "mlp" (MLP sub-layer, whose
    # input also feeds AdaptFormer-style parallel adapters)
    adapter_sites: dict[str, str]
    # LoRA target group -> regex that fullmatches full module names
    lora_targets: dict[str, str]
    # accounting groups that PEFT methods train next to their own modules (their
    # `method.train_task_layers`): the task heads, and on the R-CNN families also the neck,
    # which no backbone checkpoint holds. A query-based decoder is most of the model and is
    # what LoRA/adapters adapt, so there only the task heads train.
    task_layers: tuple[str, ...] = ("task_heads",)
    # regexes that fullmatch the modules recomputed in backward under
    # train.activation_checkpointing (one per transformer block / layer, wherever it sits)
    checkpoint_blocks: tuple[str, ...] = ()
    # regexes of the neck's and the heads' modules recomputed when train.checkpoint_parts
    # names `neck` / `heads`: modules that take tensors (or lists of them) and compute no loss,
    # e.g. SimpleFeaturePyramid's per-scale stages, the RPN head, the ROI box head
    checkpoint_neck: tuple[str, ...] = ()
    checkpoint_heads: tuple[str, ...] = ()
    # regex that fullmatches the backbone's transformer blocks, in forward order: what
    # `method.blocks` indexes (e.g. last:4) and what feeds the `side` method
    backbone_blocks: str = ""
    # the `side` method: the module whose output dict of features gets the side path's
    # deltas (before the neck), and feature name -> regex of the blocks feeding that
    # feature; empty: the family offers no side path
    side_body: str = ""
    side_features: dict[str, str] = field(default_factory=dict)
    # the backbone blocks' 2-D token grid (see TokenGrid); None: the blocks have none
    # (or the family has no transformer backbone), and grid methods such as Mona refuse
    token_grid: TokenGrid | None = None
    # parameter-name prefixes that no method trains, `full` included (apply_method freezes them
    # after the method): e.g. seem's language encoder, whose class embeddings are computed once
    # per dataset, and parameters the model's forward never reads
    frozen: tuple[str, ...] = ()

    def group_of(self, param_name: str) -> str | None:
        """Accounting group of a parameter name, or None when no prefix matches."""
        best, best_len = None, -1
        for group, prefixes in self.groups.items():
            for prefix in prefixes:
                if param_name.startswith(prefix) and len(prefix) > best_len:
                    best, best_len = group, len(prefix)
        return best


def _same(state: dict) -> dict:
    return state


@dataclass(frozen=True)
class WeightLayout:
    """A foreign checkpoint layout a family's backbone can load (e.g. a timm ViT state dict):
    how to recognise it, how to bring its names to the backbone's own (the backbone group's
    prefix is then prepended), and which preset fits it, for messages."""

    description: str  # "a timm/MAE ViT state dict"
    detect: Callable[[dict], bool]  # on the unwrapped state dict's keys
    hint: str  # "e.g. model=vitdet_b for ViT-B/16 weights such as MAE's …"
    normalize: Callable[[dict], dict] = _same


@dataclass
class ModelFacts:
    """What peftseg knows about a model it built, carried by the model as one plain attribute
    (`model.peftseg_facts`: state_dict and .to() ignore it, copy.deepcopy copies it), so that
    methods, accounting, the trainer and the loaders read it from the model they are given."""

    family: FamilyMap
    weights: object = None  # peftseg.models._weights.WeightsReport of model.weights; None: no file loaded
    base_dtype: str = "fp32"  # how frozen weights are stored (a method's base_dtype): fp32 | bf16
    checkpointed_blocks: int = 0  # modules recomputed in backward (train.activation_checkpointing)
    # parameter name -> the method that inserted it (peftseg.params.mark_added): accounting,
    # learning-rate groups and checkpoints read this instead of guessing from names
    added: dict = field(default_factory=dict)
    # a run's train batches for a LoRA start computed from data (method.init=eva|corda): a
    # callable returning an iterable of batches, set by the run while the method is applied
    calibration: object = None
    init_seconds: Optional[float] = None  # time the method's initialisation took (non-default method.init)
    # adapter -> {"init", "originals", "factors"} of a LoRA whose init rewrote the base
    # (pissa/olora/corda): the untouched weights and the initial factors, for the conversion at save
    mutated_init: dict = field(default_factory=dict)


FACTS_ATTR = "peftseg_facts"


def facts_of(model) -> ModelFacts | None:
    """The ModelFacts build_model attached, looking through DDP-style `.module` wrappers; None
    for a model peftseg did not build."""
    found = getattr(model, FACTS_ATTR, None)
    if found is None:
        found = getattr(getattr(model, "module", None), FACTS_ATTR, None)
    return found
