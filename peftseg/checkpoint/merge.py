"""`peftseg merge`: fold a trained method into the base weights — a plain detectron2 model,
no extra modules — and write it with the metadata that rebuilds it.

peft's layers merge their own update (LoRA/DoRA/LoHa/LoKr/IA3/VeRA/AdaLoRA/OFT/BOFT/GLoRA) into the wrapped
layer; we then put the wrapped layer back in its parent's place, as peft's unload does.
Which methods can be merged is a property of their registration (`mergeable`); the
methods applied to a model are known from its ownership record (params.mark_added).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from peft.tuners.tuners_utils import BaseTunerLayer

from peftseg.checkpoint.files import MERGED_KEY
from peftseg.environment import versions
from peftseg.checkpoint.formats import safetensors_bytes
from peftseg.io.atomic import write_atomic_with
from peftseg.io.safe_load import load_torch
from peftseg.io.output_guard import output_file, own_earlier_output, write_errors

from peftseg.errors import UserError
from peftseg.methods._peft import forget_tuners, rebind_plain_references
from peftseg.methods.options import widen_frozen
from peftseg.params import added_params, forget_added
from peftseg.registry import METHODS

log = logging.getLogger(__name__)


def merge_and_unload(model: nn.Module) -> nn.Module:
    owners = sorted(set(added_params(model).values()))
    refused = [o for o in owners if not METHODS.get(o).mergeable]
    if refused:
        mergeable = [m.name for m in METHODS if m.mergeable]
        raise UserError(
            f"this model carries {', '.join(refused)} modules, which have no merged form (e.g. "
            "bottleneck adapters are non-linear), so they cannot be folded into the base weights. "
            f"Merge works for {', '.join(mergeable)}; evaluate this run with `peftseg eval` instead."
        )
    fold_tuner_layers(model)
    if hasattr(model, "peft_config"):  # set by peft.inject_adapter_in_model
        del model.peft_config
    forget_tuners(model)  # AdaLoRA's tuner and allocator: nothing is left for them to allocate
    forget_added(model)  # nothing is left of the method's modules
    return model


def fold_tuner_layers(model: nn.Module) -> nn.Module:
    """Every peft layer merged into the layer it wraps, which takes its place (also used by
    export, where modules that have no merged form stay in the graph)."""
    # method.base_dtype=bf16 stored the frozen weights in bfloat16; a merged model is a plain
    # float32 detectron2 model, and a small update added in bf16 would round away
    widen_frozen(model)
    tuner_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    # outermost only: peft's MultiheadAttention layer holds a LoRA Linear (its out_proj) inside
    outer = [(n, m) for n, m in tuner_layers if not any(n.startswith(o + ".") for o, _ in tuner_layers)]
    for name, layer in outer:
        if hasattr(layer, "unload_and_optionally_merge_module"):
            # peft's own merge+unload for layers that need more than a swap (MultiheadAttention)
            base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)  # safe_merge: refuse NaN/inf instead of writing them
            base = layer.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
        # plain lists that call the wrapper (detectron2's FPN convs) get the merged layer too
        rebind_plain_references(model, {id(layer): base})
    return model


def merged_metadata(cfg: DictConfig, class_names: list[str], source: Path) -> dict:
    """What `peftseg merge` stores beside the state dict, so eval/predict need no overrides."""
    # versions: those of the merge (peft's merge is what baked the update into the weights)
    return {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": list(class_names),
            "merged_from": str(Path(source).resolve()), "versions": versions()}


def _merged_from(path: Path) -> dict | None:
    """The metadata an existing file at `path` holds as a `peftseg merge` output, or None: a
    safetensors file's header alone is read; a .pth is read as data (io.safe_load)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(MERGED_KEY, "null"))
        else:
            data = load_torch(path, "output")
            meta = data.get(MERGED_KEY) if isinstance(data, dict) else None
    # whatever the file is (damaged, another format, not a dict): not a merge output of ours
    except Exception:  # noqa: BLE001
        return None
    return meta if isinstance(meta, dict) else None


def merge_checkpoint(checkpoint: str, overrides: list[str], output: str | None):
    """Load a run's PEFT checkpoint, merge it, write the plain model's tensors; returns
    (the loaded run, the written file). Default output: model_merged.safetensors beside it."""
    from peftseg.checkpoint.load import load_model

    loaded = load_model(checkpoint, overrides)
    if loaded.kind != "peft":
        raise UserError(
            f"{loaded.source} is a {loaded.kind} checkpoint, not a run's PEFT checkpoint: there is no method "
            "left to merge. Give the run directory (or its model_* file) that `peftseg train` wrote."
        )
    out = Path(output or loaded.source.parent / "model_merged.safetensors")
    # invariant 2 (peftseg.io.output_guard): a known format, never the run's own checkpoint or record
    output_file(out, (".safetensors", ".pth"), inputs=[loaded.source], what="output=")
    if os.path.lexists(out):  # only this command's own earlier merge of the same checkpoint is replaced
        own_earlier_output(out, _merged_from(out), {"merged_from": str(loaded.source.resolve())},
                           f"{MERGED_KEY} metadata", "it is not a `peftseg merge` output", "output=")
        log.warning("replacing this command's own earlier merge of %s: %s", loaded.source, out)
    model = merge_and_unload(loaded.model.eval())
    # plain tensors under the model's names: loadable with model.weights=<out>; the metadata
    # (config, class names) lets `peftseg eval`/`predict` rebuild the model without overrides.
    # A .pth output keeps detectron2's checkpoint layout ({"model": state dict}).
    meta = merged_metadata(loaded.cfg, loaded.class_names, loaded.source)
    with write_errors(out):
        if out.suffix.lower() == ".pth":
            write_atomic_with(out, lambda f: torch.save({"model": model.state_dict(), MERGED_KEY: meta}, f))
        else:
            payload = safetensors_bytes(model.state_dict(), {MERGED_KEY: json.dumps(meta), "format": "pt"})
            write_atomic_with(out, lambda f: f.write(payload))
    return loaded, out
