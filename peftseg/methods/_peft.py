"""Shared plumbing of the peft-backed methods (lora, loha, lokr, ia3, vera, adalora, oft, boft,
glora).

Targets are group names (`attn_qkv`, `attn_proj`, `mlp`, `heads`, …) that the model's
FamilyMap turns into module-name regexes; peft matches their union with `re.fullmatch`.

`adapter_name` is the name peft gives the injected adapter: "default" for a run; a task
variant's own name when peftseg.checkpoint.variants puts several variants on one base (peft's
multi-adapter API: the layers a second variant targets are already tuner layers and get one
more adapter, which `set_adapter` switches between).
"""

from __future__ import annotations

import re

import peft
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer

from peftseg.errors import UserError
from peftseg.methods.freeze import train_only_added
from peftseg.models import family_of
from peftseg.models.family import FamilyMap


_TUNERS = "_peftseg_peft_tuners"


def tuner_of(model: nn.Module, adapter_name: str = "default"):
    """The peft tuner kept for adapter `adapter_name` (AdaLoRA's, with its rank allocator), or None."""
    return vars(model).get(_TUNERS, {}).get(adapter_name)


def forget_tuners(model: nn.Module) -> None:
    """Drop the tuners kept beside the model (its peft layers were merged away)."""
    vars(model).pop(_TUNERS, None)


def targeted_modules(model: nn.Module, regex: str) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs peft will wrap for `regex` (family_targets' answer): peft
    re.fullmatch-es a str target against every module name."""
    return [(n, m) for n, m in model.named_modules() if n and re.fullmatch(regex, n)]


def adapters_in(layer: BaseTunerLayer) -> set[str]:
    """The names of the adapters a tuner layer holds: the keys of its per-adapter containers
    (peft's `adapter_layer_names`: lora_A, hada_w1_a, ia3_l, vera_lambda_b, …)."""
    names: set[str] = set()
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is not None:
            names.update(container.keys())
    return names


def target_regex(family: FamilyMap, groups: list[str]) -> str:
    """One regex for peft's `target_modules` (a str is re.fullmatch-ed against names)."""
    return "|".join(f"(?:{family.lora_targets[g]})" for g in groups)


def resolve_targets(model: nn.Module, family: FamilyMap, targets: list[str], field: str = "method.targets",
                    adapter_name: str = "default") -> list[str]:
    """Full names of the modules the target groups select; UserError for anything peft
    could not wrap the way a low-rank method means."""
    known = ", ".join(family.lora_targets)
    if not targets:
        raise UserError(
            f"{field} is empty; list at least one target group of family {family.name!r}: {known}."
        )
    unknown = [t for t in targets if t not in family.lora_targets]
    if unknown:
        raise UserError(
            f"{field} names {unknown}, which model family {family.name!r} does not "
            f"define; the target groups it has are: {known}."
        )
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for group in targets:
        pattern = family.lora_targets[group]
        hits = [n for n in modules if re.fullmatch(pattern, n)]
        if not hits:
            raise UserError(
                f"{field} group {group!r} (pattern {pattern!r}) matches no module of "
                f"this {family.name} model; the target groups of this family are: {known}."
            )
        for name in hits:
            _check_wrappable(name, modules[name], group, field, adapter_name)
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _check_wrappable(name: str, module: nn.Module, group: str, field: str, adapter_name: str) -> None:
    if isinstance(module, BaseTunerLayer):
        if adapter_name not in adapters_in(module):  # one more (task variant's) adapter in the same layer
            return
        raise UserError(
            f"{field} group {group!r} selects {name}, which another peft method of this run "
            "already wraps; give each method of a combination its own target groups."
        )
    if isinstance(module, (nn.Linear, nn.MultiheadAttention)):  # peft wraps MHA's in_proj and out_proj
        return
    if isinstance(module, nn.Conv2d) and (
        getattr(module, "norm", None) is not None or getattr(module, "activation", None) is not None
    ):
        raise UserError(
            f"{field} group {group!r} selects {name}, a detectron2 Conv2d that applies its "
            "own norm/activation inside forward, so peft would add the update after the "
            "norm instead of to the convolution; only nn.Linear layers are supported as "
            f"targets here, so drop this group from {field}."
        )
    raise UserError(
        f"{field} group {group!r} selects {name}, a {type(module).__name__}; only "
        f"nn.Linear layers are supported as targets here, so drop this group from {field}."
    )


def inject(model: nn.Module, peft_config: peft.PeftConfig, train_task_layers: bool, owner: str,
           adapter_name: str = "default") -> nn.Module:
    """Insert peft's layers (adapter `adapter_name`), then train exactly them (plus the task
    heads if asked)."""
    tuner_cls = peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type]
    try:
        if tuner_cls.uses_shared_state:
            # VeRA's projections are shared by all its layers and kept on the tuner, so peft's
            # inject_adapter_in_model refuses it; the tuner injects in place all the same, and
            # every layer holds the shared BufferDict as a submodule, so the tuner can go
            model = tuner_cls(model, peft_config, adapter_name=adapter_name).model
        elif hasattr(tuner_cls, "update_and_allocate"):
            # AdaLoRA's rank allocator lives on the tuner, and training must call it every
            # step: the tuner injects in place and is kept beside the model (tuner_of)
            tuner = tuner_cls(model, peft_config, adapter_name=adapter_name)
            model = tuner.model
            # in the instance dict, not as a submodule: the tuner holds the model, and a
            # submodule cycle would make state_dict and named_modules recurse forever
            vars(model).setdefault(_TUNERS, {})[adapter_name] = tuner
        else:
            model = peft.inject_adapter_in_model(peft_config, model, adapter_name=adapter_name)
    except ValueError as e:  # peft's word for a layer type this method has no version of
        if "not supported" not in str(e):
            raise
        raise UserError(
            f"{peft_config.peft_type.value} cannot wrap one of the selected targets ({str(e).splitlines()[0][:200]}); "
            "pick target groups of nn.Linear layers for this method (lora also takes nn.MultiheadAttention groups "
            "such as decoder_cross_attn)."
        ) from None
    # peft's LoRA on nn.MultiheadAttention re-derives the frozen base every forward: pin it
    from peftseg.methods._mha_pin import pin_multihead_attention_bases

    pin_multihead_attention_bases(model)
    return train_only_added(model, peft_added_parameters(model, adapter_name), owner, train_task_layers)


def peft_added_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The parameters of adapter `adapter`, named by peft's own bookkeeping: every tuner layer
    lists its per-adapter containers in `adapter_layer_names` (lora_A/lora_B/lora_embedding_*,
    lora_magnitude_vector under DoRA, vera_lambda_*, lokr_*, hada_*, ia3_l, ...).

    Not "the parameters whose id() is new after injection": peft's LoRA on
    nn.MultiheadAttention frees the parameters it replaces, so Python may hand a freed id to a
    new lora_B, which then looked old and stayed frozen (fewer parameters trained, silently)."""
    added: dict[int, nn.Parameter] = {}  # a tensor shared by several layers counts once
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in module.adapter_layer_names:
            container = getattr(module, attr, None)
            if container is None or adapter not in container:
                continue
            entry = container[adapter]
            params = [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
            added.update((id(p), p) for p in params)
    return list(added.values())


def family_targets(model: nn.Module, targets: list[str], field: str = "method.targets",
                   blocks="all", blocks_field: str = "method.blocks", adapter_name: str = "default") -> str:
    """Validate `targets` against the model's family and return peft's target regex;
    `blocks` (method.blocks) leaves the backbone blocks it does not select bare;
    `adapter_name`: the adapter about to be injected."""
    from peftseg.methods.options import exclusion_regex, outside, unselected_blocks

    family = family_of(model)
    chosen = resolve_targets(model, family, list(targets), field, adapter_name)
    excluded = unselected_blocks(model, blocks, blocks_field)
    if excluded and not outside(chosen, excluded):
        raise UserError(
            f"{blocks_field}={blocks!r} leaves none of the modules {field}={list(targets)} selects: "
            "they all sit in blocks the selection skips; select other blocks or other targets."
        )
    # a negative lookahead skips every module inside an unselected block
    return exclusion_regex(excluded) + f"(?:{target_regex(family, list(targets))})"
