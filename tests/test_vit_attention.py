"""model.attention=efficient computes detectron2's ViT attention (decomposed rel-pos) exactly:
outputs, input gradients, rel-pos tables and every LoRA/adapter parameter's gradient."""

import copy

import pytest
import torch
from detectron2.modeling.backbone.vit import Attention

from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods.adapter_lora import AdapterLoraConfig
from peftseg.models import build_model
from peftseg.models._vit_attention import EfficientAttention, rel_pos_attention
from helpers import preset, ulps


def _close(a, b, n=64):
    """max |a-b| within `n` float32 ulps of max |a| (and never both all-zero by accident). 64: the
    chunked path sums the same softmax (42 keys here) and products (16 channels) in another order,
    one rounding per term at most; measured <= 5 ulps for one layer, <= 8 through vitdet_tiny."""
    scale = a.abs().max().item()
    assert scale > 0, "reference tensor is all zero: the comparison would prove nothing"
    err = (a - b).abs().max().item()
    assert err <= ulps(scale, n), f"max diff {err:.3g} > {n} ulps of {scale:.3g}"


def _pair(rel_pos: bool, size=(6, 7), dim=48, heads=3):
    torch.manual_seed(0)
    stock = Attention(dim, num_heads=heads, use_rel_pos=rel_pos, rel_pos_zero_init=False, input_size=size)
    eff = EfficientAttention.from_detectron2(copy.deepcopy(stock))
    return stock, eff


@pytest.mark.parametrize("rel_pos", [True, False])
@pytest.mark.parametrize("chunk", [None, 5, 1])  # one chunk; uneven chunks (42 = 8x5 + 2); row by row
def test_attention_matches_detectron2(rel_pos, chunk):
    stock, eff = _pair(rel_pos)
    eff.chunk = chunk
    x = torch.randn(2, 6, 7, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = stock(x), eff(x2)
    _close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    _close(x.grad, x2.grad)
    names = dict(stock.named_parameters())
    assert set(names) == set(dict(eff.named_parameters())), "parameter names changed"
    for n, p in eff.named_parameters():
        _close(names[n].grad, p.grad)
    if rel_pos:
        assert {"rel_pos_h", "rel_pos_w"} <= set(names)


def test_rel_pos_attention_matches_dense_bias_in_float64():
    """The Function against the formula it implements, with bias from arbitrary rel_h/rel_w
    (not only detectron2's einsum), in float64 so the check is tight: gradcheck."""
    g = torch.Generator().manual_seed(1)
    bh, kh, kw, c = 2, 3, 4, 5
    n = kh * kw
    args = [torch.randn(bh, n, c, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    rel_h = torch.randn(bh, n, kh, generator=g, dtype=torch.float64, requires_grad=True)
    rel_w = torch.randn(bh, n, kw, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = args
    dense = (q * 0.3) @ k.transpose(-2, -1) + (rel_h[..., :, None] + rel_w[..., None, :]).reshape(bh, n, n)
    ref = dense.softmax(-1) @ v
    out = rel_pos_attention(q, k, v, rel_h, rel_w, 0.3, chunk=5)
    # 12 keys x 5 channels reordered by the chunks, as in _close, but in float64 (measured 1.4 ulps)
    assert torch.allclose(out, ref, rtol=0, atol=ulps(ref, 64, torch.float64))
    assert torch.autograd.gradcheck(lambda *t: rel_pos_attention(*t, 0.3, 5), (q, k, v, rel_h, rel_w))


def test_bf16_autocast_stays_close_and_finite():
    stock, eff = _pair(True)
    x = torch.randn(1, 6, 7, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y2 = stock(x), eff(x.clone().requires_grad_())
    assert y2.dtype == y.dtype
    # genuinely lossy: each path rounds q/k/v, the probabilities and the output to bf16 (eps 2^-7) at
    # other points, errors that need not cancel (measured 0.8 eps of the output's max): 4 bf16 eps
    assert (y.float() - y2.float()).abs().max().item() <= ulps(y.float(), 4, torch.bfloat16)
    y2.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in eff.parameters())


def _vitdet(attention: str):
    torch.manual_seed(0)
    model = build_model(preset("model", "vitdet_tiny", attention=attention), num_classes=3)
    torch.manual_seed(1)
    cfg = preset("method", "adapter_lora", AdapterLoraConfig)
    model = apply_method(model, cfg)
    # non-trivial values everywhere a gradient is compared: LoRA B, adapter up and the
    # rel-pos tables start at zero, which would make half the gradients vanish
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    # the method froze the backbone; its gradients (rel-pos tables, qkv) are compared too
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def test_vitdet_with_lora_and_adapters_matches_stock_attention():
    stock, eff = _vitdet("detectron2"), _vitdet("efficient")
    n_eff = sum(isinstance(m, EfficientAttention) for m in eff.modules())
    assert n_eff == 4 and not any(isinstance(m, EfficientAttention) for m in stock.modules())
    assert list(stock.state_dict()) == list(eff.state_dict()), "checkpoint keys differ"
    for a, b in zip(stock.state_dict().values(), eff.state_dict().values()):
        assert torch.equal(a, b)
    img = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    feats, feats2 = stock.backbone(img), eff.backbone(img)
    w = {k: torch.randn_like(v) for k, v in feats.items()}
    for k in feats:
        _close(feats[k], feats2[k])
    sum((feats[k] * w[k]).sum() for k in feats).backward()
    sum((feats2[k] * w[k]).sum() for k in feats2).backward()
    grads = {n: p.grad for n, p in stock.named_parameters() if p.grad is not None}
    peft = [n for n in grads if "lora_" in n or "adapter" in n]
    rel = [n for n in grads if "rel_pos" in n]
    assert peft and len(rel) == 8, (peft, rel)
    for n, p in eff.named_parameters():
        if n in grads:
            _close(grads[n], p.grad)


def test_unknown_attention_is_a_user_error():
    with pytest.raises(UserError, match="model.attention=efficient"):
        build_model(preset("model", "vitdet_tiny", attention="flash"), num_classes=3)


# ---- the rel-pos paths: SDPA with the bias as mask, FlexAttention ------------------------

def _block_pair(window: int, path: str):
    """detectron2's ViT Block (windowed when window > 0: 6x7 tokens padded into 4x4 windows),
    and a copy whose attention runs `path`."""
    from detectron2.modeling.backbone.vit import Block

    torch.manual_seed(0)
    size = (window, window) if window else (6, 7)
    stock = Block(48, num_heads=3, window_size=window, use_rel_pos=True, rel_pos_zero_init=False, input_size=size)
    eff = copy.deepcopy(stock)
    eff.attn = EfficientAttention.from_detectron2(eff.attn)
    eff.attn.path = path
    return stock, eff


@pytest.mark.parametrize("window", [0, 4], ids=["global", "windowed"])
def test_sdpa_path_matches_detectron2_forward_and_backward(window):
    stock, eff = _block_pair(window, "sdpa")
    x = torch.randn(2, 6, 7, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = stock(x), eff(x2)
    _close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    _close(x.grad, x2.grad)
    ref = dict(stock.named_parameters())
    compared = []
    for n, p in eff.named_parameters():
        _close(ref[n].grad, p.grad)
        compared.append(n)
    # the q/k/v projection and both rel-pos tables are among the gradients compared
    assert {"attn.qkv.weight", "attn.rel_pos_h", "attn.rel_pos_w"} <= set(compared)


def test_flex_path_matches_detectron2_forward_and_refuses_to_train_on_cpu():
    """FlexAttention runs eagerly on the CPU without autograd (this torch has no CPU backward):
    its forward is compared here; its backward is scripts/gpu_check.py's, on CUDA."""
    stock, eff = _block_pair(0, "flex")
    x = torch.randn(1, 6, 7, 48)
    with torch.no_grad():
        _close(stock(x), eff(x))
    with pytest.raises(UserError, match="no FlexAttention backward on the CPU"):
        eff(x)


def test_auto_path_is_picked_per_device():
    from peftseg.models._vit_attention import rel_pos_path

    assert rel_pos_path(torch.device("cpu")) == "chunked"
    assert rel_pos_path(torch.device("cuda", 0)) == "sdpa"
    assert {m.path for m in build_model(preset("model", "vitdet_tiny", attention="sdpa"), num_classes=3).modules()
            if isinstance(m, EfficientAttention)} == {"sdpa"}
