"""Shared plumbing of the peft-backed methods (lora, loha, lokr, ia3, vera, adalora, oft, boft,
glora).

Targets are group names (`attn_qkv`, `attn_proj`, `mlp`, `heads`, …) that the model's
FamilyMap turns into module-name regexes; peft matches their union with `re.fullmatch`.
Convolution groups (`neck_conv`, `pixel_decoder_conv`, `mask_head_conv`, `backbone_conv`, …) are
for LoRA alone (`convs=True`): a detectron2 Conv2d applies its own norm/activation, and only
LoRA has a layer here that adds its update before them (methods/_conv_lora.py).

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
                    adapter_name: str = "default", convs: bool = False) -> list[str]:
    """Full names of the modules the target groups select; UserError for anything peft
    could not wrap the way a low-rank method means. `convs`: the method wraps 2-D convolutions
    (LoRA; inject registers the layer that puts the update before a detectron2 Conv2d's norm)."""
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
        hits = [n for n in hits if n not in _containers(hits)]
        for name in hits:
            _check_wrappable(name, modules[name], group, field, adapter_name, convs)
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _containers(hits: list[str]) -> set[str]:
    """The hits that hold other hits: a group whose layer is one module in one model and a
    Sequential of them in another (detectron2's RPN head: `conv`, or `conv.conv0`, `conv.conv1`)
    names both; the layers inside are the targets, the container is skipped."""
    return {n for n in hits if any(h.startswith(n + ".") for h in hits)}


def _check_wrappable(name: str, module: nn.Module, group: str, field: str, adapter_name: str,
                     convs: bool = False) -> None:
    if isinstance(module, BaseTunerLayer):
        if adapter_name not in adapters_in(module):  # one more (task variant's) adapter in the same layer
            return
        raise UserError(
            f"{field} group {group!r} selects {name}, which another peft method of this run "
            "already wraps; give each method of a combination its own target groups."
        )
    if isinstance(module, (nn.Linear, nn.MultiheadAttention)):  # peft wraps MHA's in_proj and out_proj
        return
    if isinstance(module, nn.Conv2d):
        if not convs:
            raise UserError(
                f"{field} group {group!r} selects {name}, a convolution; only method=lora wraps "
                "convolutions here (its update joins a detectron2 Conv2d before the layer's own "
                f"norm/activation), so use method=lora for this group or drop it from {field}."
            )
        if module.groups > 1:
            raise UserError(
                f"{field} group {group!r} selects {name}, a grouped convolution (groups="
                f"{module.groups}), whose LoRA update peft can neither give every rank nor merge; "
                f"drop this group from {field}."
            )
        return
    if isinstance(module, nn.ConvTranspose2d):
        raise UserError(
            f"{field} group {group!r} selects {name}, a transposed convolution, which peft's LoRA "
            f"has no layer for; drop this group from {field}."
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
    if isinstance(peft_config, peft.LoraConfig):
        # detectron2 Conv2d targets get the layer that adds the update before the layer's own
        # norm/activation; plain nn.Conv2d and nn.Linear keep peft's own layers
        from peftseg.compat import register_custom_lora_layers
        from peftseg.methods._conv_lora import custom_layers

        register_custom_lora_layers(peft_config, custom_layers())
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
    rebind_plain_references(model, {id(inner): layer for layer, inner in _wrapped_by(model)})
    return train_only_added(model, peft_added_parameters(model, adapter_name), owner, train_task_layers)


def _wrapped_by(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(outermost tuner layer, a module it wraps) for every module inside a chain of wrappers."""
    pairs = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            inner = module
            while isinstance(inner, BaseTunerLayer):
                inner = inner.base_layer
                pairs.append((module, inner))
    wrapped = {id(inner) for _, inner in pairs}
    return [(outer, inner) for outer, inner in pairs if id(outer) not in wrapped]


def rebind_plain_references(model: nn.Module, replaced: dict[int, nn.Module]) -> int:
    """Point the plain Python lists and tuples that modules keep as attributes at the module that
    replaced one of their items (`replaced`: id of the old module -> the new one); returns how
    many references moved.

    peft (and its unload) puts a wrapper in the parent's registered child slot only, but some
    modules call their layers through a plain list kept beside the registered children:
    detectron2's FPN (`lateral_convs`, `output_convs`) and the Mask DINO / SEEM pixel decoders.
    Those calls would bypass the wrapper: the update never computed, its factors never trained."""
    moved = 0
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if key.startswith("_") or not isinstance(value, (list, tuple)):
                continue  # _modules/_parameters: the registered slots peft already set
            if not any(id(item) in replaced for item in value):
                continue
            new = [replaced.get(id(item), item) for item in value]
            moved += sum(a is not b for a, b in zip(value, new))
            if isinstance(value, list):
                value[:] = new
            else:
                vars(module)[key] = type(value)(new) if type(value) is tuple else type(value)(*new)
    return moved


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
                   blocks="all", blocks_field: str = "method.blocks", adapter_name: str = "default",
                   convs: bool = False) -> str:
    """Validate `targets` against the model's family and return peft's target regex;
    `blocks` (method.blocks) leaves the backbone blocks it does not select bare;
    `adapter_name`: the adapter about to be injected; `convs`: the method wraps convolutions."""
    from peftseg.methods.options import exclusion_regex, outside, unselected_blocks

    family = family_of(model)
    chosen = resolve_targets(model, family, list(targets), field, adapter_name, convs)
    excluded = unselected_blocks(model, blocks, blocks_field)
    if excluded and not outside(chosen, excluded):
        raise UserError(
            f"{blocks_field}={blocks!r} leaves none of the modules {field}={list(targets)} selects: "
            "they all sit in blocks the selection skips; select other blocks or other targets."
        )
    # a negative lookahead skips every module inside an unselected block, and one the containers
    # a pattern reaches its layers through (peft would try to wrap them whole)
    regex = target_regex(family, list(targets))
    containers = _containers([n for n, _ in model.named_modules() if re.fullmatch(regex, n)])
    skip = "(?!(?:" + "|".join(re.escape(c) for c in sorted(containers)) + ")$)" if containers else ""
    return exclusion_regex(excluded) + skip + f"(?:{regex})"
