"""Method `glora`: generalised LoRA, through HF peft — each targeted Linear (W0, b0) runs with

    W = W0 + W0 ⊙ A + B,    b = b0 + b0 ⊙ D + E + W0·C

where A and B are weight-shaped (`ab`: rank-r products, per-output vectors or one scalar), C
couples the weight to the bias (`c`: an in×r·r×1 product or an in-vector), and D, E scale and
shift the bias (`de`: vectors or scalars). C, D, E exist only on layers with a bias. All zero
at init. With ab=lora, c=lora, de=constant a Linear with a bias trains
2·r·(in+out) + r·(in+1) + 2 parameters (2·r·(in+out) without a bias).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftseg import checks
from peftseg.methods.lowrank import TARGET_SETS, LowRankConfig
from peftseg.registry import register_method
from peftseg.search_space import Choice, Int

AB_FORMS = ("lora", "vector", "constant", "none")
C_FORMS = ("lora", "vector", "none")
DE_FORMS = ("vector", "constant", "none")


@dataclass
class GloraConfig(LowRankConfig):
    name: str = "glora"
    rank: int = 4  # rank of every `lora`-shaped part
    ab: str = "lora"  # A and B (weight scale and shift): lora | vector | constant | none
    c: str = "lora"  # C (weight-to-bias coupling): lora | vector | none
    de: str = "constant"  # D and E (bias scale and shift): vector | constant | none

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.choice("method.ab", self.ab, AB_FORMS)
        checks.choice("method.c", self.c, C_FORMS)
        checks.choice("method.de", self.de, DE_FORMS)


SEARCH_SPACE = (Int("rank", 2, 16, log=True), Choice("ab", ("lora", "vector")), TARGET_SETS)


@register_method("glora", config=GloraConfig, colour="#5254a3", block_aware=True, mergeable=True, adds_parameters=True,
                 order=52, search_space=SEARCH_SPACE,
                 summary="GLoRA: learned scale/shift of weight and bias, low-rank or vector forms (HF peft)")
def apply(model, cfg: GloraConfig, adapter_name: str = "default"):
    import peft

    from peftseg.methods._peft import family_targets, inject

    peft_cfg = peft.GloraConfig(
        r=cfg.rank,
        config_A_B=cfg.ab,
        config_C=cfg.c,
        config_D_E=cfg.de,
        target_modules=family_targets(model, cfg.targets, blocks=cfg.blocks, adapter_name=adapter_name),
        bias="none",
    )
    return inject(model, peft_cfg, cfg.train_task_layers, "glora", adapter_name)
