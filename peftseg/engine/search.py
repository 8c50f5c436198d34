"""The `hydra/sweeper=peft_search` search space: which knobs to search depends on the method.

Hydra's Optuna sweeper samples a flat set of overrides, but `method.rank` exists only for
LoRA-like methods and `method.adapters_per_block` only for adapters; an override of a key
the chosen method lacks would fail the trial. So the preset samples `method` itself and
this define-by-run extender (the sweeper's `custom_search_space`) adds that method's knobs.
"""

from __future__ import annotations

# Ranges sized for the model presets here: ranks of a few to 32, 1-3 adapters per block
# (the design space), target sets from attention-only to attention + MLP.
TARGET_SETS = ("[attn_qkv]", "[attn_qkv,attn_proj]", "[attn_qkv,attn_proj,mlp]")
RANKS = (2, 4, 8, 16, 32)


def method_knobs(cfg, trial) -> None:
    """Sample the chosen method's knobs into `trial` (they become `method.*` overrides)."""
    method = trial.params.get("method")
    if method in ("lora", "loha", "lokr"):
        trial.suggest_categorical("method.rank", RANKS)
        trial.suggest_categorical("method.targets", TARGET_SETS)
    elif method == "adapter":
        trial.suggest_int("method.adapters_per_block", 1, 3)
        trial.suggest_categorical("method.bottleneck", (8, 16, 32, 64))
    # ia3 keeps its preset targets: its `feedforward` list must stay a subset of them, and
    # Optuna needs one fixed choice set per parameter name across all trials.
