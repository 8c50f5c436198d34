"""Family `seem`: presets (the official v1 names and shapes), FamilyMap (adapter sites, LoRA
groups, the frozen text encoder and its accounting group), the training objective and the
cached class embeddings. Every method on seem_tiny: tests/test_contract.py; official outputs:
tests/test_seem_parity.py."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from detectron2.utils.events import EventStorage
from peft.tuners.tuners_utils import BaseTunerLayer

from helpers import preset, shapes_batch, ulps
from peftseg.config import schemas
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods._adapter_layers import AdapterStack
from peftseg.models import build_model
from peftseg.models.seem import FAMILY, SeemConfig
from peftseg.params import count_parameters

DATA = Path(__file__).resolve().parent / "data" / "seem"
P = "sem_seg_head.predictor"
ENC = "sem_seg_head.pixel_decoder.transformer.encoder.layers"
LANG = f"{P}.lang_encoder."
NAMES = ["red square", "green circle", "blue triangle"]


def tiny(num_classes: int = 3, **overrides):
    torch.manual_seed(0)
    return build_model(preset("model", "seem_tiny", SeemConfig, **overrides), num_classes, NAMES[:num_classes])


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return shapes_batch(tmp_path_factory.mktemp("seem_shapes"), n=2)


def method(name, **overrides):
    return preset("method", name, schemas()["method"][name], **overrides)


def images(n=1, size=128):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
             "height": size, "width": size} for _ in range(n)]


def official_names(depths, enc, dec, text):
    """The official v1 key names: the oracle's (tests/data/seem, shrunk sizes) with every
    indexed layer list expanded to the given counts."""
    from safetensors import safe_open

    with safe_open(DATA / "official_weights.safetensors", "pt") as f:
        names = json.loads(f.metadata()["order"])
    expanded = set()
    for n in names:
        if m := re.match(r"backbone\.layers\.(\d+)\.blocks\.\d+\.(.*)", n):
            s = int(m.group(1))
            expanded |= {f"backbone.layers.{s}.blocks.{b}.{m.group(2)}" for b in range(depths[s])}
        elif m := re.match(rf"{ENC}\.\d+\.(.*)", n):
            expanded |= {f"{ENC}.{i}.{m.group(1)}" for i in range(enc)}
        elif m := re.match(rf"{P}\.(transformer_\w+_layers)\.\d+\.(.*)", n):
            expanded |= {f"{P}.{m.group(1)}.{i}.{m.group(2)}" for i in range(dec)}
        elif m := re.match(rf"{P}\.lang_encoder\.lang_encoder\.resblocks\.\d+\.(.*)", n):
            expanded |= {f"{P}.lang_encoder.lang_encoder.resblocks.{i}.{m.group(1)}" for i in range(text)}
        elif m := re.match(r"(backbone\.layers\.\d+\.blocks\.\d+\.modulation\.focal_layers)\.\d+(.*)", n):
            expanded.add(n)
        else:
            expanded.add(n)
    return expanded


def test_seem_focalt_has_the_official_v1_names_and_shapes():
    cfg = preset("model", "seem_focalt", SeemConfig)
    from peftseg.models._seem.meta_arch import build_seem

    with torch.device("meta"):  # shapes only: no memory, no init cost
        state = build_seem(cfg, num_classes=133).state_dict()
    assert set(state) == official_names([2, 2, 6, 2], enc=6, dec=9, text=12)
    shapes = {
        "backbone.patch_embed.proj.weight": (96, 3, 7, 7),
        "backbone.layers.2.blocks.5.modulation.f.weight": (2 * 384 + 4, 384),
        "backbone.layers.2.blocks.5.modulation.focal_layers.2.0.weight": (384, 1, 7, 7),
        "backbone.layers.3.blocks.1.mlp.fc1.weight": (3072, 768),
        "backbone.norm3.weight": (768,),
        "sem_seg_head.pixel_decoder.adapter_1.weight": (512, 96, 1, 1),
        "sem_seg_head.pixel_decoder.input_proj.weight": (512, 768, 1, 1),
        f"{ENC}.5.linear1.weight": (2048, 512),
        f"{P}.transformer_cross_attention_layers.8.multihead_attn.in_proj_weight": (1536, 512),
        f"{P}.query_feat.weight": (101, 512),
        f"{P}.class_embed": (512, 512),
        f"{P}.lang_encoder.lang_encoder.token_embedding.weight": (49408, 512),
        f"{P}.lang_encoder.lang_encoder.positional_embedding": (77, 512),
        f"{P}.lang_encoder.lang_proj": (512, 512),
        "criterion.empty_weight": (134,),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_seem_focall_is_focal_without_depthwise_convs():
    cfg = preset("model", "seem_focall", SeemConfig)
    from peftseg.models._seem.meta_arch import build_seem

    with torch.device("meta"):
        state = build_seem(cfg, num_classes=80).state_dict()
    assert not any(".dw1." in k or ".dw2." in k for k in state)
    assert tuple(state["backbone.layers.2.blocks.17.modulation.f.weight"].shape) == (2 * 768 + 5, 768)
    assert tuple(state["backbone.layers.0.blocks.0.modulation.focal_layers.3.0.weight"].shape) == (192, 1, 9, 9)
    assert "backbone.layers.2.blocks.18.gamma_1" not in state


@pytest.mark.parametrize("key,value,needle", [
    ("backbone", "swin", "backbone"),
    ("hidden_dim", 128, "hidden_dim"),
    ("depths", [1, 1, 2], "depths"),
    ("num_queries", 0, "num_queries"),
    ("context_length", 64, "context_length"),
    ("no_object_weight", -0.1, "no_object_weight"),
])
def test_bad_values_fail_with_the_key_named(key, value, needle):
    with pytest.raises(UserError, match=needle):
        tiny(**{key: value})


def test_family_map_sites_and_lora_groups_match_the_study_layout(model):
    names = [n for n, _ in model.named_modules()]

    def hits(pattern):
        return [n for n in names if re.fullmatch(pattern, n)]

    enc, dec, blocks = 2, 3, 5  # seem_tiny: 2 encoder layers, 3 decoder layers, depths [1, 1, 2, 1]
    attn = hits(FAMILY.adapter_sites["attn"])
    assert len([n for n in attn if n.startswith(ENC)]) == enc
    assert sorted(n.rsplit(".", 1)[1] for n in attn if n.startswith(P)) == ["multihead_attn"] * dec + ["self_attn"] * dec
    assert len(hits(FAMILY.adapter_sites["mlp"])) == blocks
    counts = {group: len(hits(p)) for group, p in FAMILY.lora_targets.items()}
    assert counts == {
        "attn_qkv": blocks, "attn_proj": blocks, "mlp": 2 * blocks,
        "decoder_attn": 2 * dec, "decoder_self_attn": dec, "decoder_cross_attn": dec,
        "pixel_decoder_attn": enc, "encoder_attn": enc, "decoder_ffn": 2 * dec, "pixel_decoder_ffn": 2 * enc, "task_heads": 3,
        # the FPN's 3 lateral (adapter_*) and 4 output (layer_*) convs, mask features, input projection
        "pixel_decoder_conv": 3 + 4 + 1 + 1,
    }
    assert all(isinstance(model.get_submodule(n), torch.nn.MultiheadAttention)
               for n in hits(FAMILY.lora_targets["decoder_attn"]) + hits(FAMILY.lora_targets["pixel_decoder_attn"]))
    heads = {n for n, _ in model.named_parameters() if FAMILY.group_of(n) == "task_heads"}
    assert f"{P}.class_embed" in heads and any(n.startswith(f"{P}.mask_embed.") for n in heads)
    assert not any(n.startswith(("backbone.", "sem_seg_head.pixel_decoder.", LANG)) for n in heads)
    ckpt = [n for n in names if any(re.fullmatch(p, n) for p in FAMILY.checkpoint_blocks)]
    assert len(ckpt) == blocks + enc + 3 * dec


def test_text_encoder_is_frozen_in_full_and_accounted_as_text(model):
    m = apply_method(copy.deepcopy(model), method("full"))
    params = dict(m.named_parameters())
    lang = {n for n in params if n.startswith(LANG)}
    spatial = {n for n in params if n.startswith(tuple(f"{P}.{p}" for p in
                                                       ("mask_sptial_embed", "spatial_embed", "spatial_featured", "pn_indicator")))}
    assert len(lang) == 2 + 2 + 12 * 2 + 2 and len(spatial) == 6  # proj, scale, embeddings, 2 blocks, ln_final
    assert not any(params[n].requires_grad for n in lang | spatial)
    assert all(p.requires_grad for n, p in params.items() if n not in lang | spatial)
    counts = count_parameters(m)
    text = counts.by_group["text"]
    assert text["total"] == sum(params[n].numel() for n in lang) and text["trainable"] == 0
    assert text["total"] > 49408 * 64  # the token embedding is most of it
    assert counts.trainable == counts.total - text["total"] - sum(params[n].numel() for n in spatial)
    # bitfit unfreezes biases everywhere but the family's frozen part
    b = apply_method(copy.deepcopy(model), method("bitfit"))
    assert not any(p.requires_grad for n, p in b.named_parameters() if n.startswith(LANG))


def test_adapters_at_the_study_sites_start_as_identity(model):
    m = apply_method(copy.deepcopy(model), method("adapter", sites=["attn"]))
    stacks = {n for n, mod in m.named_modules() if isinstance(getattr(mod, "peft_adapters", None), AdapterStack)}
    assert len(stacks) == 2 + 2 * 3
    with torch.no_grad():
        ref, got = model(images())[0]["instances"], m.eval()(images())[0]["instances"]
    assert torch.equal(ref.scores, got.scores)


def test_lora_on_decoder_attention_wraps_multihead_attention(model, batch):
    m = apply_method(copy.deepcopy(model), method("lora", targets=["decoder_attn", "pixel_decoder_attn"]))
    wrapped = {n for n, mod in m.named_modules() if isinstance(mod, BaseTunerLayer)}
    assert len([n for n in wrapped if n.endswith(("self_attn", "multihead_attn"))]) == 2 * 3 + 2
    counts = count_parameters(m)
    assert counts.by_group["peft"]["trainable"] > 0
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    with EventStorage():
        for _ in range(2):
            optimizer.zero_grad()
            sum(m(batch).values()).backward()
            optimizer.step()
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("transformer_cross_attention_layers.2.multihead_attn" in n and "lora_" in n for n in grads)
    assert any(n.startswith(ENC) and "lora_" in n for n in grads)
    # peft merges and unmerges the update around every MultiheadAttention forward; the base it
    # leaves must be the frozen one bit for bit (peftseg.methods._mha_pin), or checkpoints
    # stop matching their base fingerprint
    params = dict(m.named_parameters())
    drifted = [n for n, v in frozen.items() if not torch.equal(params[n], v)]
    assert drifted == []


def test_every_lora_factor_on_multihead_attention_is_trained_and_counted(model):
    """peft's LoRA on nn.MultiheadAttention frees the parameters it replaces, so a new lora_B
    can get a freed id(); a method that told "added" from "old" by id() left such a factor
    frozen in some injections (2 to 6 of 32 here, seen in 3 of 5 tries). Several injections,
    each checked against the closed form: per MultiheadAttention of width d, rank r,
    in_proj r*(d + 3d) and out_proj r*(d + d)."""
    from torch import nn

    cfg = method("lora", targets=["decoder_attn", "pixel_decoder_attn"])
    mha = [mod for mod in model.modules() if isinstance(mod, nn.MultiheadAttention)
           and not any(mod is m for m in model.sem_seg_head.predictor.lang_encoder.modules())]
    lora_total = sum(6 * cfg.rank * mod.embed_dim for mod in mha)
    task = sum(p.numel() for n, p in model.named_parameters() if FAMILY.group_of(n) in FAMILY.task_layers)
    for attempt in range(5):
        m = apply_method(copy.deepcopy(model), cfg)
        factors = {n: p for n, p in m.named_parameters() if re.search(r"\.lora_[AB]\.default\.weight$", n)}
        assert len(factors) == 4 * len(mha)  # A and B on in_proj and on out_proj
        assert [n for n, p in factors.items() if not p.requires_grad] == [], attempt
        assert sum(p.numel() for p in factors.values()) == lora_total
        counts = count_parameters(m)
        assert counts.by_group["peft"] == {"total": lora_total, "trainable": lora_total}
        assert counts.trainable == lora_total + task


def test_training_step_gives_the_official_loss_terms_and_no_text_forward(batch):
    m = tiny().train()
    calls = []
    m.sem_seg_head.predictor.lang_encoder.lang_encoder.register_forward_hook(lambda *a: calls.append(1))
    with EventStorage():
        losses = m(batch)
    # last layer (_0) and the 3 earlier predictions (learnable queries included), deep supervision
    assert set(losses) == {f"loss_mask_{k}_{i}" for k in ("ce", "bce", "dice") for i in range(4)}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    assert calls == []  # class embeddings come from the cache, never from a text forward
    sum(losses.values()).backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert f"{P}.class_embed" in grads and f"{P}.query_feat.weight" in grads
    assert any(n.startswith("backbone.layers.0.blocks.0.modulation.") for n in grads)
    # only the logit scale is on the graph (no method applied here; every method freezes it)
    assert {n for n in grads if n.startswith(LANG)} == {LANG + "logit_scale"}


def test_class_loss_weighs_background_with_the_no_object_coefficient():
    from peftseg.models._seem.criterion import HungarianMatcher, SetCriterion

    crit = SetCriterion(2, HungarianMatcher(2.0, 5.0, 5.0, 64), {"ce": 1.0, "bce": 1.0, "dice": 1.0}, 0.1, 64, 3.0, 0.75)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 8, 8)}]
    loss = crit.loss_labels({"pred_logits": logits}, targets, [(torch.tensor([0]), torch.tensor([0]))])
    ce = torch.nn.functional.cross_entropy(logits[0], torch.tensor([0, 2]), reduction="none")
    want = ((ce[0] * 1.0 + ce[1] * 0.1) / 1.1).item()
    # a weighted mean of 2 terms: 2 products, 2 sums (1.1 among them) and a division: 8 ulps of it
    assert loss.item() == pytest.approx(want, abs=ulps(want, 8))


def test_class_embeddings_are_cached_per_dataset_and_follow_loaded_weights(model):
    lang = model.sem_seg_head.predictor.lang_encoder
    assert lang.class_names == (*NAMES, "background")
    assert lang.class_embeddings.shape == (4, 64)
    assert "class_embeddings" not in "".join(model.state_dict())  # derived, never stored
    m = copy.deepcopy(model)
    before = m.sem_seg_head.predictor.lang_encoder.class_embeddings.clone()
    state = {k: v + 0.01 if k.startswith(LANG + "lang_encoder.ln_final") else v for k, v in model.state_dict().items()}
    m.load_state_dict(state)
    after = m.sem_seg_head.predictor.lang_encoder.class_embeddings
    # recomputed from the loaded text encoder; each change below is more than re-running the text
    # encoder could round (64 ulps of the embeddings)
    assert not torch.allclose(before, after, rtol=0, atol=ulps(before, 64))
    m.set_class_names(["cat", "dog", "bird"])
    assert not torch.allclose(after, m.sem_seg_head.predictor.lang_encoder.class_embeddings, rtol=0,
                              atol=ulps(after, 64))
    with pytest.raises(ValueError, match="2 class names"):
        m.set_class_names(["cat", "dog"])


def test_class_embeddings_are_recomputed_only_when_text_encoder_tensors_are_loaded(model):
    m = copy.deepcopy(model)
    lang = m.sem_seg_head.predictor.lang_encoder
    text_forwards = []
    lang.lang_encoder.register_forward_hook(lambda *a: text_forwards.append(1))
    state = model.state_dict()
    # a visual-only load (an adapter checkpoint, the decoder of another run): no text forward,
    # and the cache is the very tensor it was
    cached = lang.class_embeddings
    visual = {k: v for k, v in state.items() if not k.startswith(LANG)}
    assert m.load_state_dict(visual, strict=False).unexpected_keys == []
    m.load_state_dict({LANG + "logit_scale": torch.tensor(2.0)}, strict=False)  # scales, not embeddings
    assert text_forwards == [] and lang.class_embeddings is cached
    # the projection alone changes every embedding: recomputed, once per class and background
    proj = LANG + "lang_proj"
    m.load_state_dict({proj: state[proj].flip(0)}, strict=False)
    assert len(text_forwards) == len(NAMES) + 1
    assert not torch.allclose(lang.class_embeddings, cached, rtol=0, atol=ulps(cached, 64))  # beyond rounding
    # a failed load clears the mark too: the next visual-only load stays free
    with pytest.raises(RuntimeError):
        m.load_state_dict({LANG + "lang_encoder.ln_final.weight": torch.zeros(3)}, strict=False)
    text_forwards.clear()
    m.load_state_dict(visual, strict=False)
    assert text_forwards == []
