"""A run's final checkpoint in the ecosystem's formats.

- `model_final.safetensors`: every trained tensor; the peftseg metadata (resolved config,
  class names, base fingerprint) as JSON in the safetensors header (key "peftseg"), so the
  file alone rebuilds the run (`peftseg eval`/`merge`, train.resume).
- `peft/`: the peft-backed part in HF peft's own layout, written with peft's own helpers
  (`PeftConfig.save_pretrained` for adapter_config.json, `get_peft_model_state_dict` for the
  tensors, keyed `base_model.model.<module>` as `PeftModel.save_pretrained` keys them), so
  `peft.PeftModel.from_pretrained(base_model, "<run dir>/peft")` loads it; adapters other
  than peft's "default" go to a subfolder each, as peft does. Tensors that train outside
  the peft layers (task layers, biases, bottleneck adapters, a side path) go to
  `peft/trained_outside_peft.safetensors` under their model names:
  `base_model.load_state_dict(those, strict=False)` first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

PEFT_DIR = "peft"
OUTSIDE_PEFT_FILE = "trained_outside_peft.safetensors"
_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's names


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    # safetensors refuses views that share storage; a checkpoint wants plain copies anyway
    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata=metadata)


def checkpoint_metadata(meta: dict) -> dict[str, str]:
    return {"peftseg": json.dumps(meta), "format": "pt"}


def peft_owned(model: nn.Module) -> set[str]:
    """Names of the parameters and buffers that peft's tuner layers added."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    owned = set()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        layer_names = set(module.adapter_layer_names)
        for key in module.state_dict():
            if key.split(".")[0] in layer_names:
                owned.add(f"{name}.{key}" if name else key)
    return owned


def _adapter_tensors(model: nn.Module, adapter: str, config) -> dict[str, torch.Tensor]:
    """peft's adapter state dict of `adapter`, as a PeftModel saves it.

    AdaLoRA after an allocation (config.rank_pattern set): peft saves each layer cut to the ranks
    it kept, and resizes the layers to them on load. Its cut is a method of the tuner
    (resize_state_dict_by_rank_pattern), which addresses tensors by a PeftModel's names
    (base_model.model.<name>): the tuner kept beside the model is handed to peft under that name."""
    from peft.utils import get_peft_model_state_dict

    from peftseg.methods._peft import tuner_of

    tuner = tuner_of(model, adapter)
    if not getattr(config, "rank_pattern", None) or not hasattr(tuner, "resize_state_dict_by_rank_pattern"):
        return get_peft_model_state_dict(model, adapter_name=adapter)

    class _AsPeftModel(nn.Module):  # what get_peft_model_state_dict reads of a PeftModel
        def __init__(self):
            super().__init__()
            self.base_model = tuner
            self.peft_config = tuner.peft_config
            self.resize_state_dict_by_rank_pattern = tuner.resize_state_dict_by_rank_pattern

    # peft also rewrites config.rank_pattern's keys without the adapter's name, as it saves them
    tensors = get_peft_model_state_dict(_AsPeftModel(), adapter_name=adapter)
    return {k.removeprefix("base_model.model."): v for k, v in tensors.items()}


def _with_adapter(peft_key: str, adapter: str) -> str:
    """peft's saved key (`x.lora_A.weight`) as the model names the parameter (`x.lora_A.<adapter>.weight`)."""
    head, sep, tail = peft_key.rpartition(".")
    return f"{head}.{adapter}.{tail}" if sep else peft_key


def write_peft_export(model: nn.Module, trained: dict[str, torch.Tensor], run_dir: Path) -> Path | None:
    """`run_dir/peft` (replaced whole, atomically by rename); None when no peft method ran."""
    configs = getattr(model, "peft_config", None)  # set by peft.inject_adapter_in_model
    if not configs:
        return None
    from peft.utils import get_peft_model_state_dict

    run_dir = Path(run_dir)
    target = run_dir / PEFT_DIR
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{PEFT_DIR}.", suffix=".tmp"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder a normal mode
        from peftseg.methods._lora_init import converted_peft_config, converted_state

        for adapter, config in configs.items():
            where = tmp if adapter == "default" else tmp / adapter
            tensors = _adapter_tensors(model, adapter, config)  # before the config: AdaLoRA's is rewritten
            # a LoRA whose start rewrote the base: its plain-LoRA form on the untouched base
            converted_peft_config(config, adapter, model).save_pretrained(str(where))
            plain = converted_state(model, {})
            tensors = {k: plain.get(_with_adapter(k, adapter), v) for k, v in tensors.items()}
            (where / "adapter_model.safetensors").write_bytes(
                safetensors_bytes({_PREFIX + k: v for k, v in tensors.items()}))
        owned = peft_owned(model)
        outside = {k: v for k, v in trained.items() if k not in owned}
        (tmp / OUTSIDE_PEFT_FILE).write_bytes(safetensors_bytes(outside))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
