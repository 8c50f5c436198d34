"""Method `oft`: orthogonal fine-tuning, through HF peft — each targeted Linear's input is
rotated by a learned block-diagonal orthogonal matrix R (W' = W·R), so the angles between
the pretrained weight's neurons are kept.

R has in/b blocks of size b (`block_size`; or `num_blocks` blocks of size in/num_blocks),
each the Cayley transform of a skew-symmetric matrix with b(b−1)/2 free entries: a targeted
Linear trains (in/b)·b(b−1)/2 parameters, or b(b−1)/2 with `block_share` (one block for all).
`coft` (constrained OFT) keeps R within `eps` of the identity. R = I at init.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftseg import checks
from peftseg.errors import UserError
from peftseg.methods.lowrank import TARGET_SETS, default_targets, check_probability
from peftseg.methods.options import PeftOptions
from peftseg.registry import register_method
from peftseg.search_space import Choice


@dataclass
class OftConfig(PeftOptions):  # + base_dtype, blocks, train_task_layers
    name: str = "oft"
    targets: list[str] = field(default_factory=default_targets)
    # size of each orthogonal block (peft's oft_block_size); 0 to give num_blocks instead
    block_size: int = 16
    num_blocks: int = 0  # number of blocks per layer (peft's r); 0 to give block_size instead
    block_share: bool = False  # one rotation block shared by all blocks of a layer
    coft: bool = False  # constrained OFT: R stays within eps of the identity
    eps: float = 6e-5  # COFT's radius (read only with coft=true)
    module_dropout: float = 0.0  # drops whole blocks of R (multiplicative dropout) while training

    def __post_init__(self) -> None:
        super().__post_init__()
        if not list(self.targets):
            raise UserError("method.targets is empty; list at least one target group, "
                            "e.g. method.targets=[attn_qkv,attn_proj].")
        check_blocks(self.block_size, self.num_blocks, "block_size", "num_blocks")
        checks.number("method.eps", self.eps, low=0, low_open=True, why="it is COFT's radius around the identity")
        check_probability("method.module_dropout", self.module_dropout)


def check_blocks(size: int, num: int, size_key: str, num_key: str) -> None:
    """Exactly one of block size / block count: their product is in_features, so peft takes one."""
    checks.integer(f"method.{size_key}", size, minimum=0, why="it is a block size, 0 to give the block count")
    checks.integer(f"method.{num_key}", num, minimum=0, why="it is a number of blocks, 0 to give the block size")
    if (size == 0) == (num == 0):
        raise UserError(
            f"method.{size_key}={size} and method.{num_key}={num}: give exactly one of them (the other 0), "
            f"since {size_key} × {num_key} = in_features of each layer, e.g. method.{size_key}=16 method.{num_key}=0."
        )


def check_divides(model, regex: str, size: int, num: int, size_key: str, num_key: str, method: str,
                  multiple: int = 1) -> None:
    """Refuse, naming the layer, a block size or count that does not divide a targeted layer's
    in_features: peft would silently pick another block size (OFT) or fail mid-injection (BOFT).
    `multiple`: BOFT's butterfly needs the block count to be a multiple of 2^(factor−1)."""
    from peftseg.methods._peft import targeted_modules

    for name, module in targeted_modules(model, regex):
        n_in = getattr(module, "in_features", None)
        if n_in is None:
            continue  # a layer type peft refuses on its own (inject names it)
        size_ = size or (n_in // num if n_in % num == 0 else 0)
        if size_ == 0 or n_in % size_ != 0 or (n_in // size_) % multiple != 0:
            given = f"method.{size_key}={size}" if size else f"method.{num_key}={num}"
            need = f" into a multiple of {multiple} blocks" if multiple > 1 else ""
            raise UserError(
                f"{method}: {given} does not split the {n_in} input features of {name}{need}; pick a "
                f"method.{size_key} (or method.{num_key}) that divides the in_features of every targeted layer, "
                "or other method.targets."
            )


# block sizes: finer blocks are cheaper and more constrained
SEARCH_SPACE = (Choice("block_size", (8, 16, 32)), TARGET_SETS)


@register_method("oft", config=OftConfig, colour="#8c6d31", block_aware=True, mergeable=True, adds_parameters=True,
                 order=47, search_space=SEARCH_SPACE,
                 summary="OFT: learned block-diagonal orthogonal rotation of each target's input (HF peft)")
def apply(model, cfg: OftConfig, adapter_name: str = "default"):
    import peft

    from peftseg.methods._peft import family_targets, inject

    targets = family_targets(model, cfg.targets, blocks=cfg.blocks, adapter_name=adapter_name)
    check_divides(model, targets, cfg.block_size, cfg.num_blocks, "block_size", "num_blocks", "oft")
    peft_cfg = peft.OFTConfig(
        r=cfg.num_blocks,
        oft_block_size=cfg.block_size,
        module_dropout=cfg.module_dropout,
        coft=cfg.coft,
        eps=cfg.eps,
        block_share=cfg.block_share,
        target_modules=targets,
        bias="none",
    )
    return inject(model, peft_cfg, cfg.train_task_layers, "oft", adapter_name)
