"""Method `boft`: butterfly orthogonal fine-tuning, through HF peft — OFT's rotation of each
targeted Linear's input, made of `butterfly_factor` block-diagonal orthogonal factors joined by
butterfly permutations, so few small blocks still mix all input features; plus a learned scale
per output feature.

With N blocks of size b (N·b = in; give `block_size` or `num_blocks`) and m factors, a targeted
Linear trains m·N·b² rotation entries + out scales (peft stores full b×b blocks and uses their
skew-symmetric part). R = I and scale 1 at init.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftseg import checks
from peftseg.errors import UserError
from peftseg.methods.lowrank import TARGET_SETS, check_probability, default_targets
from peftseg.methods.oft import check_blocks, check_divides
from peftseg.methods.options import PeftOptions
from peftseg.registry import register_method
from peftseg.search_space import Choice


@dataclass
class BoftConfig(PeftOptions):  # + base_dtype, blocks, train_task_layers
    name: str = "boft"
    targets: list[str] = field(default_factory=default_targets)
    block_size: int = 4  # size of each orthogonal block (peft's boft_block_size); 0 to give num_blocks
    num_blocks: int = 0  # blocks per factor (peft's boft_block_num); 0 to give block_size
    # number of butterfly factors (peft's boft_n_butterfly_factor); 1: one block-diagonal factor.
    # More than 1 needs peft's fbd CUDA extension (built on first use, CUDA only)
    butterfly_factor: int = 1
    dropout: float = 0.0  # drops whole blocks (multiplicative dropout) while training

    def __post_init__(self) -> None:
        super().__post_init__()
        if not list(self.targets):
            raise UserError("method.targets is empty; list at least one target group, "
                            "e.g. method.targets=[attn_qkv,attn_proj].")
        check_blocks(self.block_size, self.num_blocks, "block_size", "num_blocks")
        checks.integer("method.butterfly_factor", self.butterfly_factor, minimum=1,
                       why="it is the number of butterfly factors, 1 for plain block-diagonal OFT")
        check_probability("method.dropout", self.dropout)


# butterfly_factor stays as configured: above 1 it needs the CUDA extension (see apply)
SEARCH_SPACE = (Choice("block_size", (2, 4, 8)), TARGET_SETS)


@register_method("boft", config=BoftConfig, colour="#7b4173", block_aware=True, mergeable=True, adds_parameters=True,
                 order=48, search_space=SEARCH_SPACE,
                 summary="BOFT: butterfly-factored orthogonal rotation of each target's input (HF peft)")
def apply(model, cfg: BoftConfig, adapter_name: str = "default"):
    import peft

    from peftseg.methods._peft import family_targets, inject

    if cfg.butterfly_factor > 1:
        from peft.tuners.boft.layer import get_fbd_cuda

        # without peft's fbd CUDA extension, peft's BOFT layer quietly trains one factor whatever
        # was asked (it warns only), so method.butterfly_factor would be a knob nothing reads
        if not get_fbd_cuda():
            raise UserError(
                f"method.butterfly_factor={cfg.butterfly_factor} needs peft's BOFT CUDA extension "
                "(fbd_cuda, compiled with ninja on a CUDA machine), which is not available here, and "
                "without it peft trains a single factor; use method.butterfly_factor=1 on this machine."
            )
    targets = family_targets(model, cfg.targets, blocks=cfg.blocks, adapter_name=adapter_name)
    # the butterfly of m factors pairs blocks 2^(m-1) apart: the block count must be a multiple of that
    check_divides(model, targets, cfg.block_size, cfg.num_blocks, "block_size", "num_blocks", "boft",
                  multiple=2 ** (cfg.butterfly_factor - 1))
    peft_cfg = peft.BOFTConfig(
        boft_block_size=cfg.block_size,
        boft_block_num=cfg.num_blocks,
        boft_n_butterfly_factor=cfg.butterfly_factor,
        boft_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
    )
    return inject(model, peft_cfg, cfg.train_task_layers, "boft", adapter_name)
