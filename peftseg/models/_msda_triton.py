"""Multi-scale deformable attention (Deformable DETR's sampling step) as Triton kernels,
forward and backward.

The reference is the grid_sample path (`_maskdino/deform_attn.sample_levels`, transformers'
`multi_scale_deformable_attention`): per query, head, level and point, a bilinear sample of
the level's value map at `location` (x, y in [0, 1] across the map's pixel edges, i.e.
grid_sample with align_corners=False and zero padding), weighted and summed. The grid_sample
path materialises every sample (B·heads, d, Q, points) per level and keeps them for backward;
these kernels gather the four corners, accumulate in registers and write only the output.
Backward recomputes the corners and scatters value gradients with atomic adds (the value map
is shared by many queries), as the official CUDA op does. Same numbers as grid_sample up to
float32 rounding (the interpreter tests in tests/test_msda_triton.py check it).

Written for this project after the published designs (Deformable DETR's CUDA op, the
msda-triton and segment-anything-fast Triton kernels): no maintained wheel ships a Triton
MSDA with backward for current torch/triton. Importing this module imports triton; the
kernels compile on first use (or run in Triton's CPU interpreter under TRITON_INTERPRET=1,
which must be set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _corner(vbase, start, yy, xx, hl, wl, qmask, ds, dmask, HD: tl.constexpr):
    """value rows at integer corner (yy, xx) of one level, zero outside the map: (BLOCK_Q, BLOCK_D)."""
    valid = qmask & (xx >= 0) & (xx < wl) & (yy >= 0) & (yy < hl)
    row = start + yy * wl + xx
    ptr = vbase + row[:, None] * HD + ds[None, :]
    return tl.load(ptr, mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32), valid, row


@triton.jit
def _msda_fwd(value, shapes, starts, loc, attw, out, Q, S,
              H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ds = tl.arange(0, BLOCK_D)
    qmask = qs < Q
    dmask = ds < D
    vbase = value + b * S * H * D + h * D
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for l in tl.static_range(L):
        hl = tl.load(shapes + 2 * l)
        wl = tl.load(shapes + 2 * l + 1)
        start = tl.load(starts + l)
        for p in tl.static_range(P):
            idx = ((b * Q + qs) * H + h) * (L * P) + l * P + p
            lx = tl.load(loc + 2 * idx, mask=qmask, other=0.0)
            ly = tl.load(loc + 2 * idx + 1, mask=qmask, other=0.0)
            a = tl.load(attw + idx, mask=qmask, other=0.0)
            x = lx * wl - 0.5
            y = ly * hl - 0.5
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            v00, _, _ = _corner(vbase, start, y0, x0, hl, wl, qmask, ds, dmask, H * D)
            v01, _, _ = _corner(vbase, start, y0, x0 + 1, hl, wl, qmask, ds, dmask, H * D)
            v10, _, _ = _corner(vbase, start, y0 + 1, x0, hl, wl, qmask, ds, dmask, H * D)
            v11, _, _ = _corner(vbase, start, y0 + 1, x0 + 1, hl, wl, qmask, ds, dmask, H * D)
            s = ((1 - fy) * (1 - fx))[:, None] * v00 + ((1 - fy) * fx)[:, None] * v01 \
                + (fy * (1 - fx))[:, None] * v10 + (fy * fx)[:, None] * v11
            acc += a[:, None] * s
    optr = out + ((b * Q + qs) * H + h)[:, None] * D + ds[None, :]
    tl.store(optr, acc.to(out.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


@triton.jit
def _scatter(gvbase, row, valid, coef, g, ds, dmask, HD: tl.constexpr):
    ptr = gvbase + row[:, None] * HD + ds[None, :]
    tl.atomic_add(ptr, coef[:, None] * g, mask=valid[:, None] & dmask[None, :])


@triton.jit
def _msda_bwd(value, shapes, starts, loc, attw, dout, grad_value, grad_loc, grad_attw, Q, S,
              H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ds = tl.arange(0, BLOCK_D)
    qmask = qs < Q
    dmask = ds < D
    vbase = value + b * S * H * D + h * D
    gvbase = grad_value + b * S * H * D + h * D
    g = tl.load(dout + ((b * Q + qs) * H + h)[:, None] * D + ds[None, :],
                mask=qmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    for l in tl.static_range(L):
        hl = tl.load(shapes + 2 * l)
        wl = tl.load(shapes + 2 * l + 1)
        start = tl.load(starts + l)
        for p in tl.static_range(P):
            idx = ((b * Q + qs) * H + h) * (L * P) + l * P + p
            lx = tl.load(loc + 2 * idx, mask=qmask, other=0.0)
            ly = tl.load(loc + 2 * idx + 1, mask=qmask, other=0.0)
            a = tl.load(attw + idx, mask=qmask, other=0.0)
            x = lx * wl - 0.5
            y = ly * hl - 0.5
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            v00, m00, r00 = _corner(vbase, start, y0, x0, hl, wl, qmask, ds, dmask, H * D)
            v01, m01, r01 = _corner(vbase, start, y0, x0 + 1, hl, wl, qmask, ds, dmask, H * D)
            v10, m10, r10 = _corner(vbase, start, y0 + 1, x0, hl, wl, qmask, ds, dmask, H * D)
            v11, m11, r11 = _corner(vbase, start, y0 + 1, x0 + 1, hl, wl, qmask, ds, dmask, H * D)
            w00 = (1 - fy) * (1 - fx)
            w01 = (1 - fy) * fx
            w10 = fy * (1 - fx)
            w11 = fy * fx
            s = w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
            tl.store(grad_attw + idx, tl.sum(g * s, axis=1), mask=qmask)
            dsx = (1 - fy)[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)
            dsy = (1 - fx)[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)
            # d location = d pixel coordinate x (width, height of the level)
            tl.store(grad_loc + 2 * idx, a * wl * tl.sum(g * dsx, axis=1), mask=qmask)
            tl.store(grad_loc + 2 * idx + 1, a * hl * tl.sum(g * dsy, axis=1), mask=qmask)
            _scatter(gvbase, r00, m00, a * w00, g, ds, dmask, H * D)
            _scatter(gvbase, r01, m01, a * w01, g, ds, dmask, H * D)
            _scatter(gvbase, r10, m10, a * w10, g, ds, dmask, H * D)
            _scatter(gvbase, r11, m11, a * w11, g, ds, dmask, H * D)


BLOCK_Q = 32


def _geometry(shapes: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    hw = torch.tensor([[int(h), int(w)] for h, w in shapes], dtype=torch.int32)
    sizes = hw[:, 0] * hw[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]).to(torch.int32)
    return hw.to(device), starts.to(device)


class _MSDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, shapes, locations, weights):
        B, S, H, D = value.shape
        _, Q, _, L, P, _ = locations.shape
        hw, starts = _geometry(shapes, value.device)
        value_c = value.contiguous()
        # float32 sampling coordinates whatever the autocast dtype: bf16 locations would put
        # points up to a pixel off on a 256-wide level
        loc = locations.float().contiguous()
        w = weights.float().contiguous()
        out = torch.empty(B, Q, H, D, dtype=value.dtype, device=value.device)
        grid = (triton.cdiv(Q, BLOCK_Q), B * H)
        _msda_fwd[grid](value_c, hw, starts, loc, w, out, Q, S, H=H, D=D, L=L, P=P,
                        BLOCK_Q=BLOCK_Q, BLOCK_D=triton.next_power_of_2(D))
        ctx.save_for_backward(value_c, hw, starts, loc, w)
        ctx.dtypes = (value.dtype, locations.dtype, weights.dtype)
        return out.view(B, Q, H * D)

    @staticmethod
    def backward(ctx, d_out):
        value, hw, starts, loc, w = ctx.saved_tensors
        B, S, H, D = value.shape
        _, Q, _, L, P, _ = loc.shape
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)  # atomics: fp32
        grad_loc = torch.empty_like(loc)
        grad_w = torch.empty_like(w)
        grid = (triton.cdiv(Q, BLOCK_Q), B * H)
        _msda_bwd[grid](value, hw, starts, loc, w, d_out.contiguous().view(B, Q, H, D), grad_value,
                        grad_loc, grad_w, Q, S, H=H, D=D, L=L, P=P,
                        BLOCK_Q=BLOCK_Q, BLOCK_D=triton.next_power_of_2(D))
        v_dtype, l_dtype, w_dtype = ctx.dtypes
        return grad_value.to(v_dtype), None, grad_loc.to(l_dtype), grad_w.to(w_dtype)


def ms_deform_attn(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """value (B, S, heads, d) with S = sum(h*w); locations (B, Q, heads, levels, points, 2) as
    (x, y) in [0, 1]; weights (B, Q, heads, levels, points). Returns (B, Q, heads * d)."""
    return _MSDA.apply(value, [tuple(s) for s in shapes], locations, weights)
