"""Triton multi-scale deformable attention (forward + backward) against the grid_sample path,
on the CPU under Triton's interpreter; and how model.deform_attn_impl picks and falls back."""

import importlib
import warnings

import pytest
import torch

from peftseg.models import _msda as msda
from peftseg.models import build_model
from peftseg.models._maskdino.deform_attn import MSDeformAttn, sample_levels
from helpers import preset, ulps

pytest.importorskip("triton")


@pytest.fixture
def kernels():
    """models/msda_triton.py, its kernels in Triton's CPU interpreter (conftest.py sets
    TRITON_INTERPRET=1 before triton is first imported)."""
    import triton

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 was not set before triton was imported"
    return importlib.import_module("peftseg.models._msda_triton")


@pytest.fixture(autouse=True)
def fresh_dispatch_state(monkeypatch):
    monkeypatch.setattr(msda, "_warned", set())
    monkeypatch.setattr(msda, "_failed", set())


def _inputs(shapes, B=2, H=2, D=5, P=3, Q=9, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, H, D, generator=g, dtype=dtype)
    # spread past both borders: points outside a map sample zeros there, partly-outside ones
    # mix the edge pixels with zero padding
    loc = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    w = torch.rand(B, Q, H, L, P, generator=g, dtype=dtype)
    w = (w / w.sum((-1, -2), keepdim=True))
    return value, loc, w


def _check(kernels, shapes, value, loc, w, n_ulps=64):
    """Kernel vs grid_sample within `n_ulps` of each compared tensor's max: both sum the same
    4 corners x L levels x P points (<= 64 terms here) per output, in another order, one rounding each
    at most (measured <= 3 ulps); gradients scatter the same products back."""
    args = [t.clone().requires_grad_() for t in (value, loc, w)]
    args2 = [t.clone().requires_grad_() for t in (value, loc, w)]
    ref = sample_levels(args[0], shapes, args[1], args[2])
    got = kernels.ms_deform_attn(args2[0], shapes, args2[1], args2[2])
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert (got - ref).abs().max().item() <= ulps(ref, n_ulps)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))
    ref_grads = torch.autograd.grad(ref, args, g)
    got_grads = torch.autograd.grad(got, args2, g)
    for name, a, b in zip(("value", "locations", "weights"), ref_grads, got_grads):
        scale = a.abs().max().item()
        assert scale > 0, name
        assert (a - b).abs().max().item() <= ulps(scale, n_ulps), (name, (a - b).abs().max().item(), scale)


def test_kernel_matches_grid_sample_on_odd_levels(kernels):
    shapes = [(5, 3), (3, 4), (1, 1), (2, 7)]  # odd, non-square, a single pixel
    _check(kernels, shapes, *_inputs(shapes))


def test_kernel_matches_grid_sample_at_the_borders(kernels):
    shapes = [(4, 6), (3, 3)]
    value, loc, w = _inputs(shapes, Q=8, P=4)
    # exactly on the map's outer edges (0 and 1), on pixel centres, half a pixel outside and far out
    edges = torch.tensor([0.0, 1.0, 0.5 / 6, 1 - 0.5 / 6, -0.5 / 6, 1 + 0.5 / 6, -3.0, 4.0])
    loc[:, :, :, 0, :, 0] = edges[torch.randint(0, 8, loc[:, :, :, 0, :, 0].shape, generator=torch.Generator().manual_seed(3))]
    loc[:, 0] = 0.0
    loc[:, 1] = 1.0
    _check(kernels, shapes, value, loc, w)


def test_kernel_d_not_a_power_of_two_and_one_query(kernels):
    shapes = [(3, 5)]
    _check(kernels, shapes, *_inputs(shapes, B=1, H=3, D=3, P=1, Q=1))
    _check(kernels, shapes, *_inputs(shapes, B=1, H=1, D=8, P=2, Q=40))  # more than one query block


def test_module_with_triton_equals_pytorch(kernels):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    with torch.no_grad():  # off the init ring: offsets depend on the query
        attn.sampling_offsets.weight.normal_(0, 0.3)
        attn.attention_weights.weight.normal_(0, 0.3)
    shapes = [(4, 5), (2, 3)]
    query = torch.randn(1, 6, 16)
    ref_pts = torch.rand(1, 6, 2, 2)
    value = torch.randn(1, 26, 16)
    outs, grads = [], []
    for impl in ("pytorch", "triton"):
        attn.impl = impl
        attn.zero_grad()
        out = attn(query, ref_pts, value, shapes)
        out.square().sum().backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in attn.named_parameters()})
    # the sampling sums 4 x 2 levels x 2 points = 16 terms in another order (as _check), then the same
    # linear layers: measured <= 2 ulps; 64 ulps of each tensor's max
    assert (outs[0] - outs[1]).abs().max() <= ulps(outs[0], 64)
    for n in grads[0]:
        assert (grads[0][n] - grads[1][n]).abs().max() <= ulps(grads[0][n], 64), n


def test_auto_is_pytorch_until_a_gpu_measurement():
    assert msda.TRITON_MEASURED_FASTER is False
    assert msda.resolve("auto", torch.device("cpu")) == "pytorch"
    assert msda.resolve("auto", torch.device("cuda")) == "pytorch"
    assert msda.resolve("pytorch", torch.device("cuda")) == "pytorch"


def test_triton_without_cuda_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shapes = [(3, 3)]
    value, loc, w = _inputs(shapes)
    with pytest.warns(RuntimeWarning, match="needs a CUDA device") as record:
        a = msda.ms_deform_attn("triton", sample_levels, value, shapes, loc, w)
        b = msda.ms_deform_attn("triton", sample_levels, value, shapes, loc, w)
    assert len([r for r in record if "CUDA" in str(r.message)]) == 1
    assert torch.equal(a, sample_levels(value, shapes, loc, w)) and torch.equal(a, b)


def test_kernel_failure_falls_back_with_one_warning(kernels, monkeypatch):
    def broken(*args):
        raise RuntimeError("PTX: unsupported target sm_00")

    monkeypatch.setattr(kernels, "ms_deform_attn", broken)
    shapes = [(3, 3)]
    value, loc, w = _inputs(shapes)
    with pytest.warns(RuntimeWarning, match="failed.*unsupported target") as record:
        a = msda.ms_deform_attn("triton", sample_levels, value, shapes, loc, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither warns nor retries
        b = msda.ms_deform_attn("triton", sample_levels, value, shapes, loc, w)
    assert len(record) == 1
    assert torch.equal(a, sample_levels(value, shapes, loc, w)) and torch.equal(a, b)


def _spy(kernels, monkeypatch):
    calls = []

    def spy(value, shapes, locations, weights):
        calls.append(tuple(shapes))
        return sample_levels(value, shapes, locations, weights)

    monkeypatch.setattr(kernels, "ms_deform_attn", spy)
    return calls


def test_maskdino_config_sets_every_deformable_attention(kernels, monkeypatch):
    model = build_model(preset("model", "maskdino_tiny", deform_attn_impl="triton"), num_classes=3)
    impls = {m.impl for m in model.modules() if isinstance(m, MSDeformAttn)}
    assert impls == {"triton"}
    default = build_model(preset("model", "maskdino_tiny"), num_classes=3)
    assert {m.impl for m in default.modules() if isinstance(m, MSDeformAttn)} == {"auto"}


def test_mask2former_routes_through_the_same_dispatch(kernels, monkeypatch):
    """transformers' pixel-decoder attention reaches models/msda.py (the kernel is spied on
    here: its numbers are the tests above), and a model left on pytorch does not."""
    calls = _spy(kernels, monkeypatch)
    torch.manual_seed(0)
    routed = build_model(preset("model", "m2f_tiny", deform_attn_impl="triton"), num_classes=3).eval()
    torch.manual_seed(0)
    plain = build_model(preset("model", "m2f_tiny", deform_attn_impl="pytorch"), num_classes=3).eval()
    img = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}]
    with torch.no_grad():
        out_plain = plain(img)
        assert calls == []
        out_routed = routed(img)
    assert len(calls) == 2 and all(len(s) == 3 for s in calls), calls  # 2 encoder layers, 3 levels
    # the spy samples with maskdino's grid_sample path: transformers' own up to summation order
    # (measured <= 2 ulps); as in test_contract, 64 ulps of the score
    a, b = out_plain[0]["instances"].scores, out_routed[0]["instances"].scores
    assert torch.allclose(a, b, rtol=0, atol=ulps(a, 64))


def test_unknown_impl_is_a_user_error():
    from peftseg.errors import UserError

    with pytest.raises(UserError, match="deform_attn_impl"):
        build_model(preset("model", "maskdino_tiny", deform_attn_impl="cuda"), num_classes=3)
