"""Method `adapter_lora`: bottleneck adapters and LoRA in one run, trainable = their union.

Each part is applied with its own config; a parameter trains if any part trains it.
Adapters go in before LoRA: adapter widths are read from a site's Linear layers, which
must not yet contain LoRA's inner A/B Linears.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftseg.methods import adapter, lora
from peftseg.methods.adapter import AdapterConfig
from peftseg.methods.lora import LoraConfig
from peftseg.registry import register_method
from peftseg.search_space import prefixed
from peftseg.methods.options import MemoryOptions


@dataclass
class AdapterLoraConfig(MemoryOptions):  # + base_dtype, blocks
    name: str = "adapter_lora"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        # the combination stores the frozen base: the same refusal as method.base_dtype on lora
        if self.base_dtype != "fp32" and self.lora.init in ("pissa", "olora", "corda"):
            from peftseg.errors import UserError

            raise UserError(
                f"method.lora.init={self.lora.init} with method.base_dtype={self.base_dtype} is not supported: the "
                f"residual base that {self.lora.init} trains on would be rounded to {self.base_dtype}, so the model "
                "saved relative to the untouched base would not be the one trained; use method.base_dtype=fp32."
            )


@register_method("adapter_lora", config=AdapterLoraConfig, colour="#bcbd22", adds_parameters=True, order=70,
                 search_space=prefixed("adapter", adapter.SEARCH_SPACE) + prefixed("lora", lora.SEARCH_SPACE),
                 summary="adapters and LoRA together (method.adapter.*, method.lora.*)")
def apply(model, cfg: AdapterLoraConfig, adapter_name: str = "default"):
    from peftseg.methods import apply_method
    from peftseg.methods.freeze import freeze_all, unfreeze_params

    from peftseg.errors import UserError

    for key, part in (("adapter", cfg.adapter), ("lora", cfg.lora)):
        # the base is stored once, after every part is in, so no part's modules inherit bf16
        if part.base_dtype != "fp32":
            raise UserError(
                f"method.{key}.base_dtype={part.base_dtype} is set on one part of the combination; "
                f"set method.base_dtype={part.base_dtype} on the combination instead."
            )
    trainable: set[int] = set()
    for part in (cfg.adapter, cfg.lora):
        model = apply_method(model, part, adapter_name)
        trainable |= {id(p) for p in model.parameters() if p.requires_grad}
    freeze_all(model)
    unfreeze_params(model, trainable)
    return model
