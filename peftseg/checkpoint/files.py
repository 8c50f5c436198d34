"""PEFT checkpoints: only what the method trains, plus what it takes to rebuild the rest.

A checkpoint holds the trainable parameters (and the buffers of modules that own one),
the run's resolved config, the class names and a fingerprint of the frozen base
weights. The base itself is rebuilt from the config (`model.weights`, or the seeded
random init), so a ViT-B LoRA checkpoint is megabytes, not the whole model.
Periodic checkpoints (`model_<iter>.pth`, torch's format, read with weights_only=True)
also carry optimizer, scheduler, iteration, RNG states and data position for resuming;
`model_final.safetensors` does not (nothing is left to resume), and comes with peft's own
layout of the peft-backed part under `peft/` (peftseg.checkpoint.formats). Final `.pth`
checkpoints of earlier versions still load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer

from peftseg.data.loading.resume_state import resume_state
from peftseg.errors import UserError
from peftseg.io.atomic import write_atomic_with
from peftseg.checkpoint.formats import checkpoint_metadata, safetensors_bytes, write_peft_export
from peftseg.checkpoint.provenance import adapt_to_installed_peft
from peftseg.io.safe_load import load_any, load_safetensors

FINAL = "model_final"
MERGED_KEY = "peftseg_merged"  # metadata key of a `peftseg merge` file, beside "model"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters, the method's own frozen ones (LoRA-FA's A), and buffers of the
    modules that own a trainable parameter."""
    from peftseg.params import added_params

    added = added_params(model)
    state = {n: p.detach() for n, p in model.named_parameters() if n in added and not p.requires_grad}
    for mod_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        state.update({prefix + n: p.detach() for n, p in own if p.requires_grad})
        # a buffer is saved when the module's own state_dict holds it (non-persistent ones it leaves out)
        saved = {k for k in module.state_dict(keep_vars=True) if "." not in k}
        state.update({prefix + n: b for n, b in module.named_buffers(recurse=False) if n in saved})
    return state


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the frozen parameters of the base: a checkpoint only fits the base it was
    trained on. A method's own frozen parameters (LoRA-FA's A) are saved, not the base's; a
    weight a LoRA start rewrote into a residual (pissa/olora/corda) counts as the untouched
    weight it replaced, which is the base its final checkpoint is converted to."""
    from peftseg.methods._lora_init import original_frozen
    from peftseg.params import added_params

    added, originals = added_params(model), original_frozen(model)
    return fingerprint((name, originals.get(name, p)) for name, p in model.named_parameters()
                       if not p.requires_grad and name not in added)


def fingerprint(params) -> str:
    """sha256 over (name, tensor) pairs in name order: base_fingerprint's, and that of a task
    variant's frozen parameters under the names its model alone gives them."""
    h = hashlib.sha256()
    for name, p in sorted(params, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory's final (else latest) checkpoint."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / f"{FINAL}.safetensors", p / f"{FINAL}.pth", p / "last_checkpoint"):
            if candidate.name == "last_checkpoint" and candidate.is_file():
                named = candidate.read_text(errors="replace").strip()
                candidate = p / named
                if not candidate.is_file():
                    there = sorted(q.name for q in p.glob("model_*.pth"))
                    raise UserError(
                        f"{p / 'last_checkpoint'} names {named!r}, which is not a file in {p} (deleted or moved?); "
                        + (f"give one of the checkpoints there, e.g. {p / there[-1]} (all: {', '.join(there)})."
                           if there else "no model_*.pth is left there either: start a new run.")
                    )
            if candidate.is_file():
                return candidate
        raise UserError(
            f"{p} holds no checkpoint (no {FINAL}.safetensors, {FINAL}.pth or last_checkpoint file); give a "
            "run directory of `peftseg train` or the path of one of its model_* files."
        )
    if not p.is_file():
        raise UserError(
            f"checkpoint {p} does not exist; give a run directory (outputs/<date>/<time>) or the "
            "path of a model_* checkpoint file inside one."
        )
    return p


def read_checkpoint_file(path: str | os.PathLike) -> tuple[Path, dict]:
    """Any checkpoint a user has, read once onto the CPU without running code: a dict with
    "model" (the state dict) and, where present, the metadata of a run checkpoint
    ("peftseg") or of a `peftseg merge` file (MERGED_KEY). The one reader of checkpoint files."""
    source = checkpoint_file(path)
    if source.suffix == ".safetensors":
        tensors, header = load_safetensors(source, "checkpoint")
        data = {"model": tensors}
        for key in ("peftseg", MERGED_KEY):
            if key in header:
                try:
                    data[key] = json.loads(header[key])
                except ValueError as e:
                    raise UserError(f"{source}: its {key!r} metadata is not JSON ({e}); the file was edited or "
                                    "damaged — write it again with peftseg.") from None
    else:
        data = load_any(source, "checkpoint")  # weights_only / arrays-only: a checkpoint is data
        if not isinstance(data, dict):
            raise UserError(f"{source} holds a {type(data).__name__}, not a checkpoint dict; give a "
                            "detectron2/PyTorch checkpoint (a dict with a 'model' state dict).")
    return source, data


def require_run_checkpoint(source: Path, data: dict) -> dict:
    """`data` (read by read_checkpoint_file) as a peftseg run checkpoint; UserError if it is not one."""
    if "peftseg" not in data:
        raise UserError(
            f"{source} is not a peftseg checkpoint (it has no 'peftseg' metadata). A plain detectron2 or "
            "PyTorch checkpoint is loaded as pretrained weights instead: `peftseg train model.weights=<file>`."
        )
    return data


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """A peftseg run checkpoint, read once; UserError if the file is not one."""
    source, data = read_checkpoint_file(path)
    return source, require_run_checkpoint(source, data)


def _model_key(config: dict) -> dict:
    # where the base weights come from matters (the fingerprint checks it); the path does not
    return {k: v for k, v in config["model"].items() if k != "weights"}


def check_compatible(meta: dict, config: dict, source: Path) -> None:
    """A checkpoint must come from the same model shape and the same method settings."""
    theirs = meta["config"]
    for what, mine, other in (
        ("model", _model_key(config), _model_key(theirs)),
        ("method", config["method"], theirs["method"]),
    ):
        if mine != other:
            diff = sorted(k for k in set(mine) | set(other) if mine.get(k) != other.get(k))
            if "name" in diff:  # a different method/model altogether: its knobs are noise
                diff = ["name"]
            shown = ", ".join(f"{what}.{k}: checkpoint {other.get(k)!r} vs this run {mine.get(k)!r}" for k in diff[:4])
            raise UserError(
                f"checkpoint {source} was trained with a different {what} ({shown}); a PEFT checkpoint "
                f"only fits the {what} it was made with, so run with the checkpoint's settings "
                f"({what}={other.get('name')} and the same {what}.* values) or start a new run."
            )


class PeftCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, saving the trainable part only, atomically."""

    def __init__(self, model: nn.Module, save_dir: str = "", *, meta: dict, per_rank_batch: int | None = None,
                 **checkpointables):
        """`per_rank_batch`: images per step on each process, given by a training loop: its
        periodic checkpoints then carry RNG states and the data position, to resume exactly."""
        super().__init__(model, save_dir, **checkpointables)
        self.meta = dict(meta)
        self._fingerprint: str | None = None
        self.per_rank_batch = per_rank_batch

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # frozen weights never change: hash them once
            self._fingerprint = base_fingerprint(self.model)
        return self._fingerprint

    def save(self, name: str, **kwargs) -> None:
        resume = None
        if name != FINAL and self.per_rank_batch and "iteration" in kwargs:
            # a collective under DDP: every rank gets here (PeriodicCheckpointer calls save on all)
            resume = resume_state(kwargs["iteration"], self.per_rank_batch)
        if not self.save_dir or not self.save_to_disk:
            return
        state = trainable_state(self.model)
        data = {
            "model": {k: v.to("cpu") for k, v in state.items()},
            "peftseg": {**self.meta, "trainable": sorted(state), "base_fingerprint": self.fingerprint},
        }
        if name == FINAL:
            # tensors + JSON metadata, and peft's own layout of the peft-backed part; a LoRA that
            # started from the data or rewrote the base is saved as the plain LoRA it amounts to
            # on the untouched base (peftseg.methods._lora_init), which is what loads it
            from peftseg.methods._lora_init import converted_method_config, converted_state

            state = converted_state(self.model, state)
            data["model"] = {k: v.to("cpu") for k, v in state.items()}
            config = self.meta.get("config")
            if isinstance(config, dict) and "method" in config:
                data["peftseg"]["config"] = {**config, "method": converted_method_config(config["method"])}
            basename = f"{name}.safetensors"
            meta = {**data["peftseg"], **{k: v for k, v in kwargs.items() if isinstance(v, (int, float, str))}}
            payload = safetensors_bytes(data["model"], checkpoint_metadata(meta))
            write_atomic_with(Path(self.save_dir) / basename, lambda f: f.write(payload))
            write_peft_export(self.model, state, Path(self.save_dir))
        else:
            # periodic: optimizer/scheduler/RNG state too, which only torch's format holds;
            # read back with weights_only=True
            data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
            if resume is not None:
                data["resume"] = resume
            data.update(kwargs)
            basename = f"{name}.pth"
            # atomic: a run killed mid-save leaves the previous checkpoint, never a truncated one
            write_atomic_with(Path(self.save_dir) / basename, lambda f: torch.save(data, f))
        self.logger.info("Saved checkpoint %s", os.path.join(self.save_dir, basename))
        self.tag_last_checkpoint(basename)

    def load_peft(self, path: str | os.PathLike, config: dict, data: dict | None = None, *,
                  resuming: bool = False) -> dict:
        """Load a peftseg checkpoint into the (rebuilt) model, plus optimizer/scheduler if
        present; returns what is left (e.g. `iteration`). `data`: the file as already read
        by read_checkpoint_file, so that no caller reads a checkpoint twice. `resuming`:
        training goes on from it (a checkpoint of older peft semantics is refused, not converted)."""
        if data is None:
            source, data = read_checkpoint(path)
        else:
            source, data = Path(path), dict(require_run_checkpoint(Path(path), data))
        meta = data.pop("peftseg")
        check_compatible(meta, config, source)
        if meta["base_fingerprint"] != self.fingerprint:
            raise UserError(
                f"checkpoint {source} was trained on different frozen base weights than this model has "
                f"(model.weights={meta['config']['model'].get('weights')!r}, train.seed="
                f"{meta['config']['train'].get('seed')!r} when it was made); rebuild the same base: "
                "use the checkpoint's model.weights and train.seed, and the same torch version."
            )
        state = data.pop("model")
        missing = set(meta["trainable"]) - set(state)
        unknown = set(state) - set(self.model.state_dict())
        if missing or unknown:
            raise UserError(
                f"checkpoint {source} does not fit this model: missing {sorted(missing)[:3]}, unknown "
                f"{sorted(unknown)[:3]}; it was written by a different peftseg version or edited."
            )
        state = adapt_to_installed_peft(state, meta, source, resuming=resuming)
        self.model.load_state_dict(state, strict=False)
        for key, obj in self.checkpointables.items():
            if key in data:
                obj.load_state_dict(data.pop(key))
        self.logger.info("Loaded %d tensors of checkpoint %s", len(state), source)
        return data
