"""Which precision a run computes in, and the trainer that gives it.

- fp32: detectron2's SimpleTrainer.
- `train.amp=true` on CUDA: detectron2's AMPTrainer(precision=bf16|fp16); its GradScaler
  is enabled for fp16 only (bf16 has fp32's exponent range, so nothing underflows).
- `train.amp=true` on the CPU: `CpuAMPTrainer`, bf16 only.
- `method.base_dtype=bf16` stores the frozen weights in bf16, so the model can only run
  under autocast: it implies bf16 autocast for training and for evaluation.
"""

from __future__ import annotations

import contextlib
import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

from peftseg import checks
from peftseg.compat import next_batch
from peftseg.config import AMP_DTYPES
from peftseg.errors import UserError
from peftseg.models import facts_of


def _torch_dtype(name: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def base_dtype(model) -> str:
    """How the model's frozen weights are stored: "fp32", or "bf16" (a method's base_dtype)."""
    facts = facts_of(model)
    return facts.base_dtype if facts is not None else "fp32"


def run_precision(tcfg, device, model) -> str:
    """"fp32", "amp_bf16" or "amp_fp16": what the training steps compute in."""
    checks.choice("train.amp_dtype", tcfg.amp_dtype, AMP_DTYPES)
    base_bf16 = base_dtype(model) == "bf16"
    if not tcfg.amp and not base_bf16:
        return "fp32"
    dtype = tcfg.amp_dtype if tcfg.amp else "bf16"
    if dtype == "fp16" and device.type != "cuda":
        raise UserError(
            f"train.amp_dtype=fp16 needs a CUDA device, but this run trains on {device.type}; "
            "use train.amp_dtype=bf16 (CPU autocast computes in bfloat16)."
        )
    return f"amp_{dtype}"


def autocast(model, device):
    """The autocast a model with a bf16 base needs outside training (evaluation,
    prediction); a no-op for every other model."""
    if base_dtype(model) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_trainer(model, data, optimizer, precision: str, device):
    if precision == "fp32":
        return SimpleTrainer(model, data, optimizer)
    dtype = _torch_dtype(precision.removeprefix("amp_"))
    if device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "amp_fp16")
        return AMPTrainer(model, data, optimizer, grad_scaler=scaler, precision=dtype)
    return CpuAMPTrainer(model, data, optimizer, precision=dtype)


class CpuAMPTrainer(AMPTrainer):
    """AMPTrainer for the CPU. detectron2's `run_step` asserts CUDA and enters
    torch.cuda.amp.autocast, so this one step is written here with torch.autocast on the
    CPU; everything else (hooks, metric writing, state_dict) is AMPTrainer's. bf16 needs no
    loss scaling, so the grad scaler stays disabled."""

    def __init__(self, model, data_loader, optimizer, precision):
        super().__init__(model, data_loader, optimizer, precision=precision,
                         grad_scaler=torch.amp.GradScaler("cpu", enabled=False))

    def run_step(self):
        assert self.model.training, "[CpuAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next_batch(self)
        data_time = time.perf_counter() - start
        with torch.autocast(device_type="cpu", dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()
