"""How LoRA's factors start (`method.init`) and where its rank goes (`method.rank_pattern`,
`method.alpha_pattern`), through peft's own initialisations.

- default / gaussian / orthogonal: peft draws A (and B) at injection; the base is untouched.
- pissa / olora: peft factors each targeted weight (SVD / QR) into A0, B0 and a residual
  W_res = W - scale·B0·A0 that replaces the base weight. The run trains on W_res; what it
  saves as its final checkpoint is converted to a plain LoRA of rank 2r relative to the
  ORIGINAL W (peft's `subtract_mutated_init`: A' = [A; A0], B' = [B, -B0]), so it loads on
  the untouched base and merge, export, task variants and eval need nothing special.
- eva: A's rows are the top right-singular vectors of each layer's inputs, computed by peft's
  `get_eva_state_dict` from the first `method.init_batches` batches of the run's own train
  loader; B starts at zero, so the base is untouched.
- corda: peft's CorDA (instruction-previewed mode) from the covariance of each layer's inputs
  over the same batches; the base becomes a residual like PiSSA's and is converted the same way.

The batches come from the run (peftseg.engine.run hands `build_for_run` a `calibration`
callable, kept on the model's facts while the method is applied); a rebuild without one (eval
of a periodic checkpoint) cannot re-create a data-driven start and is refused by name.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from peftseg.errors import UserError
from peftseg.models.family import facts_of

# peftseg's names -> peft's `init_lora_weights`
PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora",
             "orthogonal": "orthogonal", "eva": "eva", "corda": "corda"}
# the inits that rewrite the base weight into a residual
MUTATING = ("pissa", "olora", "corda")
FROM_DATA = ("eva", "corda")


def init_configs(init: str) -> dict:
    """peft's sub-configs of the data-driven starts, as LoraConfig keyword arguments."""
    if init == "eva":
        from peft.tuners.lora.config import EvaConfig

        # rho=1: every layer keeps its configured rank (EVA would otherwise move rank between
        # layers, and the checkpoint could not be rebuilt from method.rank / rank_pattern)
        return {"eva_config": EvaConfig(rho=1.0)}
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig

        # instruction-previewed mode: the start follows the task's inputs (KPM preserves the
        # pretrained knowledge instead); the covariance file is filled in before preprocessing
        return {"corda_config": CordaConfig(corda_method="ipm")}
    return {}


def resolve_pattern(model: nn.Module, targeted: list[str], pattern: dict, field: str, groups: dict) -> dict:
    """`method.rank_pattern`-style {group name or module regex: value} as peft's pattern dict,
    keyed by the exact (escaped) module names it selects among `targeted`: peft matches its
    keys as suffixes (`(.*\\.)?key$`), so a regex of ours could also hit an unintended suffix.
    `groups`: the family's target groups (FamilyMap.lora_targets)."""
    out: dict[str, object] = {}
    owner: dict[str, str] = {}
    for key, value in dict(pattern).items():
        regex = groups.get(key, key)
        try:
            hits = [n for n in targeted if re.fullmatch(regex, n)]
        except re.error as e:
            raise UserError(f"{field} key {key!r} is neither a target group nor a valid module regex ({e}); "
                            f"use a target group of this model ({', '.join(groups)}).") from None
        if not hits:
            raise UserError(
                f"{field} key {key!r} matches none of the modules this LoRA targets; use one of the target "
                f"groups the run targets (the family's groups are: {', '.join(groups)}) or a regex of their "
                f"module names, e.g. {field}={{mlp: 16}} with method.targets including mlp."
            )
        for name in hits:
            if name in owner:
                raise UserError(f"{field} keys {owner[name]!r} and {key!r} both select {name}; give each module "
                                "one value (one key per target group).")
            owner[name] = key
            out[re.escape(name)] = value
    return out


def check_layers(model: nn.Module, targeted: list[str], init: str, field: str) -> None:
    """peft runs these inits on a Linear's weight; its LoRA on nn.MultiheadAttention (e.g. the
    decoder_cross_attn group) keeps in_proj as a bare Parameter, which they cannot factor, and a
    convolution's kernel is no matrix."""
    if init in ("default", "gaussian"):
        return
    # convolutions too: their 4-d weight is no matrix to factor, and these starts' conversion to a
    # plain LoRA on the untouched base is written for matrices
    other = [n for n in targeted if not isinstance(model.get_submodule(n), nn.Linear)]
    if other:
        kind = type(model.get_submodule(other[0])).__name__
        raise UserError(
            f"{field}={init} starts the factors from each layer's weight or inputs, which peft supports on "
            f"nn.Linear targets only, but the targets include {kind} layers ({other[0]}, "
            f"{len(other)} non-Linear targets in all); drop those target groups (e.g. the *_conv groups) "
            f"or use {field}=default (or gaussian)."
        )


class _Batch:
    """One training batch (detectron2's list of dicts) as peft's EVA moves inputs: it calls
    `.to(device)` on anything that has one, and warns on the ints and strings of a dict."""

    def __init__(self, items: list[dict]):
        self.items = items

    def to(self, device):
        return _Batch([{**d, "image": d["image"].to(device)} for d in self.items])


def _batches(calibration, n: int, init: str) -> list[list[dict]]:
    if calibration is None:
        raise UserError(
            f"method.init={init} starts LoRA from the activations of training batches, which only `peftseg train` "
            "provides; a model of such a run is rebuilt from its final checkpoint (model_final.safetensors, saved "
            "as a plain LoRA), so evaluate, merge or export that one, or resume the run with `train.resume`."
        )
    batches = list(itertools.islice(iter(calibration()), n))
    if not batches:
        raise UserError(f"method.init={init}: the training loader gave no batch; check the dataset's train split.")
    return batches


@torch.no_grad()
def _eva_rows(model: nn.Module, peft_cfg, batches: list[list[dict]]) -> dict[str, torch.Tensor]:
    from peft.tuners.lora.eva import get_eva_state_dict

    training = model.training
    try:
        # on the bare model (before injection): peft's helper needs a PeftModel wrapper otherwise
        return get_eva_state_dict(
            model, dataloader=[_Batch(b) for b in batches], peft_config=peft_cfg,
            forward_fn=lambda m, batch: m(batch.items), prepare_model_inputs_fn=None,
            prepare_layer_inputs_fn=None, gather_distributed_inputs=False, show_progress_bar=False,
        )
    finally:
        model.train(training)


@torch.no_grad()
def _corda_covariance(model: nn.Module, targeted: list[str], batches: list[list[dict]], path: Path) -> None:
    """Each targeted layer's input covariance, written where peft's `preprocess_corda` reads a
    precomputed one (CordaConfig.covariance_file). Written here because peft's own hook takes
    (tokens, features) inputs (a language model's batch of one); these detectors' layers see
    (batch, height, width, channels), so the inputs are flattened to rows first. The rest is
    peft's recipe: each call's input divided by its max, X^T X summed, averaged over calls."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            x = x / torch.max(x).abs()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + 1
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in targeted]
    training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    missing = [n for n in targeted if n not in counts]
    if missing:
        raise UserError(f"method.init=corda: the layer {missing[0]} saw no input in the calibration batches "
                        "(the model's inference path skips it); drop its target group or use another init.")
    torch.save({n: sums[n] / counts[n] for n in targeted}, path)


def inject_with_init(model: nn.Module, peft_cfg, cfg, adapter_name: str, targeted: list[str], inject):
    """Inject LoRA (`inject()`) started the way `cfg.init` says; returns the model."""
    init = cfg.init
    facts = facts_of(model)
    started = time.perf_counter()
    originals: dict[str, torch.Tensor] = {}
    if init in MUTATING:  # the exact base, for the fingerprint and the conversion at save
        originals = {n: model.get_submodule(n).weight.detach().clone() for n in targeted}
    if init == "eva":
        batches = _batches(getattr(facts, "calibration", None), cfg.init_batches, init)
        rows = _eva_rows(model, peft_cfg, batches)
        model = inject()
        for name, u in rows.items():
            layer = model.get_submodule(name)
            # what peft's initialize_lora_eva_weights does per layer (it needs a PeftModel wrapper)
            layer.lora_A[adapter_name].weight.data.copy_(u.to(layer.lora_A[adapter_name].weight))
        missing = [n for n in targeted if n not in rows]
        if missing:
            raise UserError(f"method.init=eva computed no start for {missing[0]} (its inputs never reached it in "
                            "the calibration batches); drop its target group or use another init.")
    elif init == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        batches = _batches(getattr(facts, "calibration", None), cfg.init_batches, init)
        with tempfile.TemporaryDirectory(prefix="peftseg-corda-") as tmp:
            cov = Path(tmp) / "covariance.pt"
            _corda_covariance(model, targeted, batches, cov)
            peft_cfg.corda_config.covariance_file = str(cov)
            preprocess_corda(model, peft_cfg)
        model = inject()
        for n in targeted:  # peft leaves its eigen-decomposition on each base layer
            base = model.get_submodule(n).get_base_layer()
            if hasattr(base, "eigens"):
                del base.eigens
    else:
        model = inject()
    if init != "default":
        facts.init_seconds = (facts.init_seconds or 0.0) + time.perf_counter() - started
    if originals:
        facts.mutated_init[adapter_name] = {
            "init": init,
            "originals": {f"{n}.base_layer.weight": w for n, w in originals.items()},
            "factors": {n: (model.get_submodule(n).lora_A[adapter_name].weight.detach().clone(),
                            model.get_submodule(n).lora_B[adapter_name].weight.detach().clone())
                        for n in targeted},
        }
    return model


def _scaled_alpha(alpha: float, use_rslora: bool) -> float:
    # rank 2r at the same scale: alpha/r -> 2alpha/2r; rsLoRA's alpha/sqrt(r) -> sqrt(2)alpha/sqrt(2r)
    return alpha * (math.sqrt(2.0) if use_rslora else 2.0)


def converted_method_config(method: dict) -> dict:
    """A saved `method` config whose LoRA started pissa/olora/corda/eva, as the plain LoRA the
    converted checkpoint holds (a combination's LoRA part under `lora`)."""
    method = copy.deepcopy(method)
    part = method["lora"] if method.get("name") == "adapter_lora" else method
    init = part.get("init", "default")
    if init in MUTATING:
        part["rank"] = 2 * part["rank"]
        part["alpha"] = _scaled_alpha(part["alpha"], part.get("use_rslora", False))
        if part.get("rank_pattern"):
            part["rank_pattern"] = {k: 2 * v for k, v in part["rank_pattern"].items()}
        if part.get("alpha_pattern"):
            part["alpha_pattern"] = {k: _scaled_alpha(v, part.get("use_rslora", False))
                                     for k, v in part["alpha_pattern"].items()}
    if init in MUTATING or init in FROM_DATA:
        part["init"] = "default"  # the factors are all in the file; nothing is drawn or computed at load
    return method


def converted_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (trainable tensors by name) with each residual-based LoRA rewritten relative to
    the original base: W_res + s·B·A = W + s·[B, -B0]·[A; A0] (peft's subtract_mutated_init)."""
    facts = facts_of(model)
    out = dict(state)
    for adapter, record in (facts.mutated_init if facts is not None else {}).items():
        for layer, (a0, b0) in record["factors"].items():
            a_key, b_key = f"{layer}.lora_A.{adapter}.weight", f"{layer}.lora_B.{adapter}.weight"
            mod = model.get_submodule(layer)
            a, b = mod.lora_A[adapter].weight.detach(), mod.lora_B[adapter].weight.detach()
            out[a_key] = torch.cat([a, a0.to(a)], dim=0).cpu()
            out[b_key] = torch.cat([b, -b0.to(b)], dim=1).cpu()
    return out


def converted_peft_config(config, adapter: str, model: nn.Module):
    """peft's LoraConfig of a converted adapter (rank 2r, same scale, plain init), for the peft/ export."""
    facts = facts_of(model)
    if facts is None or adapter not in facts.mutated_init:
        if str(getattr(config, "init_lora_weights", "")) in ("eva", "corda"):  # LoRA's field only
            config = copy.deepcopy(config)
            config.init_lora_weights = True
            config.eva_config = config.corda_config = None
        return config
    config = copy.deepcopy(config)
    config.r = 2 * config.r
    config.lora_alpha = _scaled_alpha(config.lora_alpha, config.use_rslora)
    config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {k: _scaled_alpha(v, config.use_rslora) for k, v in (config.alpha_pattern or {}).items()}
    config.init_lora_weights = True
    config.corda_config = None
    return config


def original_frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen parameter name -> the base weight it replaced (residual-based inits), so the base
    fingerprint is that of the untouched base the converted checkpoint loads on."""
    facts = facts_of(model)
    out: dict[str, torch.Tensor] = {}
    for record in (facts.mutated_init if facts is not None else {}).values():
        out.update(record["originals"])
    return out
