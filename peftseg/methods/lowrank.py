"""Config fields shared by the low-rank methods (lora, loha, lokr, vera) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftseg import checks
from peftseg.methods.options import PeftOptions
from peftseg.search_space import Choice

# target sets `peftseg search` tries, from attention-only to attention + MLP: groups every
# transformer-backbone family maps (fix method.targets=… for a family without them)
TARGET_SETS = Choice("targets", (("attn_qkv",), ("attn_qkv", "attn_proj"), ("attn_qkv", "attn_proj", "mlp")))


def default_targets() -> list[str]:
    return ["attn_qkv", "attn_proj"]


@dataclass
class LowRankConfig(PeftOptions):  # + base_dtype, blocks, train_task_layers
    name: str = "lora"
    rank: int = 8
    # target groups, mapped to modules by the model family (FamilyMap.lora_targets); which
    # groups exist depends on the family, so membership is checked when the method is applied
    targets: list[str] = field(default_factory=default_targets)

    def __post_init__(self) -> None:
        super().__post_init__()  # base_dtype, blocks
        checks.integer("method.rank", self.rank, minimum=1,
                       why="it is the rank of each low-rank update, e.g. method.rank=8")
        if not list(self.targets):
            from peftseg.errors import UserError

            raise UserError("method.targets is empty; list at least one target group, "
                            "e.g. method.targets=[attn_qkv,attn_proj].")


def check_alpha(alpha) -> None:
    checks.number("method.alpha", alpha, low=0, low_open=True,
                  why="the update is scaled by alpha/rank; alpha equal to the rank (scale 1) is common")


def check_probability(field: str, p) -> None:
    checks.number(field, p, low=0, high=1, high_open=True, why="it is a dropout probability, 0 to disable")
