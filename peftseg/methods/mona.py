"""Method `mona`: Mona, the multi-cognitive visual adapter (Yin et al., "5%>100%: Breaking
Performance Shackles of Full Fine-Tuning on Visual Recognition Tasks", CVPR 2025).

One Mona maps the token stream x (width d, on an H×W grid) to x + up(drop(gelu(F(down(x̂))))):
- x̂ = LayerNorm(x)·s1 + x·s2, the scaled LayerNorm (s1 starts at 1e-6, s2 at 1, per channel);
- down: d→m, then F over the m-channel H×W grid: the mean of depthwise 3×3, 5×5 and 7×7
  convolutions plus its input, then a 1×1 convolution (m→m) plus its input;
- GELU, dropout, up: m→d.
So one Mona has 2·d·m + m² + 5·d + 88·m parameters (LayerNorm 2d, s1 and s2 2d, down d·m + m,
three depthwise convolutions 83m + 3m, the 1×1 m² + m, up m·d + d).

Sites, as in the paper: one Mona on the stream right after the attention residual and one
after the MLP residual of every backbone block (FamilyMap.backbone_blocks) of a family whose
blocks carry a 2-D token grid (FamilyMap.token_grid: ViT, Swin, the Swin of Mask DINO and of
Mask2Former). The grid comes from the block itself, never from an image size.

Init: `up` (weight and bias) starts at zero, so every Mona is the identity and the model
equals the base model at step 0. The paper's code keeps PyTorch's default init there, which
changes the model's outputs before any training; this is the one place it differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peftseg.errors import UserError
from peftseg.methods.options import PeftOptions
from peftseg.registry import register_method
from peftseg.search_space import Int

SITES = ("attn", "mlp")


@dataclass
class MonaConfig(PeftOptions):  # + base_dtype, blocks, train_task_layers
    name: str = "mona"
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp"])  # after attn | after mlp
    # width m of every Mona. 0 (auto): min(64, d // 2) for a block of width d, which is the
    # paper's 64 on Swin-B (d = 128..1024) and ViT-B, and a width below d on CPU presets
    bottleneck: int = 0
    dropout: float = 0.1  # on the GELU's output, as in the paper

    def __post_init__(self) -> None:
        super().__post_init__()  # base_dtype, blocks
        sites = list(self.sites)
        unknown = [s for s in sites if s not in SITES]
        if unknown or not sites:
            raise UserError(
                f"method.sites={sites} is not a list of Mona sites; choose one or both of "
                f"{list(SITES)} (after the attention residual, after the MLP residual), e.g. "
                "method.sites=[attn,mlp]."
            )
        if len(set(sites)) != len(sites):
            raise UserError(f"method.sites={sites} lists a site twice; list each site once.")
        b = self.bottleneck
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise UserError(
                f"method.bottleneck={b!r} is not a width; give a positive integer (the paper uses "
                "method.bottleneck=64), or 0 for the automatic min(64, block width // 2)."
            )
        p = self.dropout
        if isinstance(p, bool) or not math.isfinite(p) or not 0 <= p < 1:
            raise UserError(
                f"method.dropout={p!r} must be a probability in [0, 1); it drops the Mona's hidden "
                "features while training, e.g. method.dropout=0.1 (the paper's) or 0 for none."
            )


def mona_size(d: int, m: int) -> int:
    """Parameters of one Mona of width d and bottleneck m (the closed form above)."""
    return 2 * d * m + m * m + 5 * d + 88 * m


@register_method("mona", config=MonaConfig, colour="#637939", block_aware=True, adds_parameters=True, order=62,
                 requires=("token_grid",),
                 search_space=(Int("bottleneck", 16, 128, log=True),),
                 summary="Mona: scaled LayerNorm, down, 3/5/7 depthwise convs over the token grid, "
                         "up; after attn and MLP of every backbone block")
def apply(model, cfg: MonaConfig):
    from peftseg.methods._mona_layers import add_mona
    from peftseg.methods.freeze import train_only_added

    return train_only_added(model, add_mona(model, cfg), "mona", cfg.train_task_layers)
