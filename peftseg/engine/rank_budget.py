"""AdaLoRA's rank allocation inside the training loop, as a detectron2 hook.

peft's AdaLoRA reallocates its rank budget through `update_and_allocate(step)`, which must run
every step after the optimizer step and before the gradients are cleared (it scores each
singular value by |p·grad|). detectron2's SimpleTrainer clears gradients at the start of the
next step, so `after_step` sees this step's gradients and updated weights.

At the end it summarises the budget for the run record: the initial and final rank of every
adapted layer and their totals.
"""

from __future__ import annotations

import logging

import torch
from detectron2.engine import HookBase

from peftseg.errors import UserError

log = logging.getLogger(__name__)


def rank_budget_hook(model, max_iter: int, adapter_name: str = "default"):
    """The hook for a model that carries an AdaLoRA tuner, else None."""
    from peftseg.methods._peft import tuner_of

    tuner = tuner_of(model, adapter_name)
    if tuner is None or not hasattr(tuner, "rankallocator"):
        return None
    total = tuner.peft_config[adapter_name].total_step
    if total != max_iter:  # the yaml ties them; a hand-set method.total_step would stretch the schedule
        raise UserError(
            f"method.total_step={total} but train.max_iter={max_iter}: AdaLoRA's budget schedule must span "
            "the run's steps; leave method.total_step unset (conf/method/adalora.yaml takes train.max_iter)."
        )
    return RankBudget(tuner, adapter_name)


class RankBudget(HookBase):
    def __init__(self, tuner, adapter_name: str):
        self._tuner, self._adapter = tuner, adapter_name
        self.summary: dict | None = None

    def before_train(self):
        if self.trainer.start_iter > 0:
            # the allocator's smoothed importance scores and the pattern it reached live only in
            # memory, so a resumed run would restart (or crash in) the schedule mid-way
            raise UserError(
                "an AdaLoRA run cannot be resumed: its rank allocator's state (importance averages, the "
                "budget reached) is not part of the checkpoint. Start the run again without train.resume."
            )

    def after_step(self):
        # fp16 training (train.amp_dtype=fp16) skips a step whose gradients overflowed; scored with
        # them, every importance average would turn inf/NaN and the masks with it, so the allocator
        # skips that step too
        grads = [p.grad for p in self._adapter_params() if p.grad is not None]
        if grads and not all(torch.isfinite(g).all() for g in grads):
            log.warning("AdaLoRA: non-finite gradients at iteration %d (a skipped fp16 step); the rank "
                        "allocation skips it too", self.trainer.iter)
            return
        self._tuner.update_and_allocate(self.trainer.iter)

    def _adapter_params(self):
        return [p for n, p in self._tuner.model.named_parameters() if "lora_" in n and self._adapter in n]

    def after_train(self):
        self.summary = budget_summary(self._tuner, self._adapter)
        log.info("AdaLoRA budget: total rank %d -> %d (target %d) over %d layers", self.summary["initial_total"],
                 self.summary["final_total"], self.summary["target_total"], len(self.summary["final"]))


def budget_summary(tuner, adapter_name: str = "default") -> dict:
    """Per adapted layer its rank now: the count of singular values the latest allocation kept
    (peft's rank_pattern, a mask per layer's lora_E), or its initial rank before any allocation."""
    config = tuner.peft_config[adapter_name]
    pattern = config.rank_pattern or {}
    suffix = f".lora_E.{adapter_name}"
    initial, final = {}, {}
    for name, p in tuner.model.named_parameters():
        if name.endswith(suffix):
            layer = name[: -len(suffix)]
            initial[layer] = p.shape[0]
            # the peft export rewrites the keys without the adapter's name, as peft saves them
            mask = pattern.get(name, pattern.get(f"{layer}.lora_E"))
            final[layer] = initial[layer] if mask is None else int(sum(bool(k) for k in mask))
    return {"initial_total": sum(initial.values()), "target_total": config.target_r * len(initial),
            "final_total": sum(final.values()), "final": final}
