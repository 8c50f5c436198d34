"""Detectron2's ViT attention computed without an N x N map per head for the whole sequence.

Detectron2's `Attention` (decomposed relative position, MViTv2/ViTDet) materialises QK^T,
the dense relative-position bias and the softmax as full (B·heads, N, N) maps, and keeps the
softmax for backward: at 1024 px (N = 4096 in the global blocks) that is the ~2.3 GiB
transient every lean method pays, and most of what full fine-tuning stores.

`EfficientAttention` is the same module (a subclass: same parameter names, so official
checkpoints, LoRA targets and adapter sites are untouched) with a different forward:

- without relative position: `F.scaled_dot_product_attention` (flash / memory-efficient
  kernels where the device has them);
- with it, one of three paths (REL_POS_PATHS), chosen per device by `rel_pos_path`:
  - `chunked`: `rel_pos_attention`, an autograd.Function that walks the queries in chunks.
    The bias of a chunk is built from the small decomposed terms rel_h (B·heads, N, kh) and
    rel_w (B·heads, N, kw), never for the whole sequence; backward recomputes each chunk's
    scores from q, k and the terms (flash-attention style: only the output and the row
    log-sum-exp are kept), and returns the gradients of rel_h/rel_w, which autograd carries
    on to q and the rel-pos tables through the einsums that made them. The CPU's choice:
    measured at one ViT-B global block (docs/performance.md), SDPA with the dense bias keeps
    the N x N bias and its gradient (~1.6 GiB at 1024 px) where this keeps ~0.25 GiB.
  - `sdpa`: `F.scaled_dot_product_attention` with the dense bias rel_h + rel_w as its
    additive `attn_mask` (as timm's SAM ViT does): the N x N bias is built, but the softmax
    is not stored, and CUDA's memory-efficient kernel computes the bias's gradient. The
    choice on CUDA.
  - `flex`: FlexAttention (`torch.nn.attention.flex_attention`, compiled) with a `score_mod`
    that adds rel_h[q, k // kw] + rel_w[q, k % kw], so no N x N tensor exists at all. Only by
    `model.attention=flex`, on CUDA: this torch has no FlexAttention backward on the CPU.

Why our own Function for the CPU: PyTorch's SDPA takes the bias only as a dense mask, and the
Triton kernel of segment-anything-fast that takes rel_h/rel_w separately has no backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.modeling.backbone.utils import get_rel_pos
from detectron2.modeling.backbone.vit import Attention

# Bytes of one float32 (chunk, N) score map per (batch x head) slice, all slices together. A
# chunk's backward holds four such maps (scores/probabilities, dP, dS and a temporary), so
# 64 MiB keeps its transient near 256 MiB at any resolution, against 3 x 805 MiB for one
# stock global block at 1024 px, while chunks stay big enough (~340 query rows there) that
# the loop costs little next to the matmuls.
CHUNK_BYTES = 64 * 2**20


def _chunk_scores(q_c, k, rel_h_c, rel_w_c, scale):
    """Scores of one query chunk, (q·scale)kᵀ + rel_h + rel_w as detectron2 adds them, in at
    least float32 (the softmax's precision under autocast)."""
    n_bh, c, _ = q_c.shape
    kh, kw = rel_h_c.shape[-1], rel_w_c.shape[-1]
    acc = _acc(q_c.dtype)
    s = ((q_c * scale) @ k.transpose(-2, -1)).to(acc).view(n_bh, c, kh, kw)
    # in place: s is this function's own fresh tensor, and no graph is recorded here
    s.add_(rel_h_c.to(acc)[..., :, None]).add_(rel_w_c.to(acc)[..., None, :])
    return s.view(n_bh, c, kh * kw)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _scores_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the forward's QKᵀ runs in (autocast's, when on); backward recomputes the
    scores in the same dtype, so they match the saved log-sum-exp exactly."""
    dev = q.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype


def default_chunk(n_bh: int, n_keys: int) -> int:
    return max(1, CHUNK_BYTES // (4 * n_bh * n_keys))


class _RelPosAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, scale: float, chunk: int):
        n_bh, n, _ = q.shape
        out = torch.empty(n_bh, n, v.shape[-1], dtype=v.dtype, device=v.device)
        lse = torch.empty(n_bh, n, dtype=_acc(q.dtype), device=q.device)
        mm = _scores_dtype(q)
        qm, km = q.to(mm), k.to(mm)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            s = _chunk_scores(qm[:, a:b], km, rel_h[:, a:b], rel_w[:, a:b], scale)
            m = torch.logsumexp(s, dim=-1, keepdim=True)
            lse[:, a:b] = m.squeeze(-1)
            p = s.sub_(m).exp_()  # the softmax, in float32 as autocast computes it
            out[:, a:b] = p.to(v.dtype) @ v
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
        ctx.scale, ctx.chunk, ctx.mm = scale, chunk, mm
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        n = q.shape[1]
        kh, kw = rel_h.shape[-1], rel_w.shape[-1]
        # float32 accumulation whatever the input dtype (bf16/fp16 under AMP)
        acc = _acc(q.dtype)
        qf, kf, vf, d_out = q.to(acc), k.to(acc), v.to(acc), d_out.to(acc)
        dq = torch.empty_like(qf)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        d_rel_h = torch.empty(rel_h.shape, dtype=acc, device=q.device)
        d_rel_w = torch.empty(rel_w.shape, dtype=acc, device=q.device)
        delta = (d_out * out.to(acc)).sum(-1)  # rowsum(dO ∘ O) = rowsum(P ∘ dP)
        qm, km = q.to(ctx.mm), k.to(ctx.mm)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            p = _chunk_scores(qm[:, a:b], km, rel_h[:, a:b], rel_w[:, a:b], scale).sub_(lse[:, a:b, None]).exp_()
            do_c = d_out[:, a:b]
            dv += p.transpose(-2, -1) @ do_c
            ds = p.mul_((do_c @ vf.transpose(-2, -1)).sub_(delta[:, a:b, None]))  # dS = P ∘ (dP − delta)
            dq[:, a:b] = (ds @ kf) * scale
            dk += (ds.transpose(-2, -1) @ qf[:, a:b]) * scale
            ds4 = ds.view(ds.shape[0], b - a, kh, kw)
            d_rel_h[:, a:b] = ds4.sum(-1)
            d_rel_w[:, a:b] = ds4.sum(-2)
            del p, ds, ds4
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                d_rel_h.to(rel_h.dtype), d_rel_w.to(rel_w.dtype), None, None)


def rel_pos_attention(q, k, v, rel_h, rel_w, scale: float, chunk: int | None = None):
    """softmax((q·scale)kᵀ + B)v for q, k, v of shape (B·heads, N, C), where the bias
    B[n, (i, j)] = rel_h[n, i] + rel_w[n, j] (rel_h: (B·heads, N, kh), rel_w: (B·heads, N, kw),
    N keys = kh·kw); never builds more than `chunk` query rows of scores at once."""
    chunk = chunk or default_chunk(q.shape[0], k.shape[1])
    return _RelPosAttention.apply(q, k, v, rel_h, rel_w, float(scale), int(chunk))


# the rel-pos attention paths; "auto" in EfficientAttention.path picks one per device
REL_POS_PATHS = ("chunked", "sdpa", "flex")


def rel_pos_path(device: torch.device) -> str:
    """The path `auto` takes on `device`: sdpa on CUDA (its memory-efficient kernel takes the
    additive bias with its gradient), chunked elsewhere (the CPU kernels gain no time with the
    dense bias, and keep it and its gradient: see the module docstring)."""
    return "sdpa" if device.type == "cuda" else "chunked"


def dense_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """The (B·heads, N, kh·kw) bias rel_h[n, i] + rel_w[n, j] that detectron2's attention adds."""
    n_bh, n, kh = rel_h.shape
    return (rel_h[:, :, :, None] + rel_w[:, :, None, :]).reshape(n_bh, n, kh * rel_w.shape[-1])


def sdpa_rel_pos_attention(q, k, v, rel_h, rel_w, scale: float):
    """rel_pos_attention through SDPA, the bias passed densely as `attn_mask`."""
    bias = dense_bias(rel_h, rel_w)
    # SDPA wants the mask in the dtype it computes in: autocast's, when on (detectron2 adds the
    # bias in that dtype too, before its float32 softmax)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(_scores_dtype(q)), scale=scale)


_compiled_flex = None


def flex_rel_pos_attention(q, k, v, rel_h, rel_w, scale: float, heads: int, compiled: bool = True):
    """rel_pos_attention through FlexAttention: q, k, v (B·heads, N, C) are viewed as
    (B, heads, N, C), and the score_mod reads rel_h/rel_w per (query, key) pair. `compiled`:
    through torch.compile (the fused kernel; eager FlexAttention is a reference that
    materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    n_bh, n, c = q.shape
    kw = rel_w.shape[-1]
    b = n_bh // heads
    rh = rel_h.reshape(b, heads, n, -1)
    rw = rel_w.reshape(b, heads, n, kw)

    def score_mod(score, bi, hi, qi, ki):
        return score + rh[bi, hi, qi, ki // kw] + rw[bi, hi, qi, ki % kw]

    if compiled and _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    fn = _compiled_flex if compiled else flex_attention
    out = fn(q.reshape(b, heads, n, c), k.reshape(b, heads, n, c), v.reshape(b, heads, n, -1),
             score_mod=score_mod, scale=scale)
    return out.reshape(n_bh, n, -1)


class EfficientAttention(Attention):
    """detectron2.modeling.backbone.vit.Attention with a forward that never holds an N x N
    map per head for the whole sequence (see the module docstring); same parameters."""

    chunk: int | None = None  # query rows per chunk; None: from CHUNK_BYTES (tests set it small)
    # the rel-pos path (REL_POS_PATHS), or auto: rel_pos_path(device) at each call
    path: str = "auto"

    @classmethod
    def from_detectron2(cls, stock: Attention) -> "EfficientAttention":
        """Take over `stock`'s submodules and parameters (the same objects: no copy, and no
        fresh initialisation that would draw from the RNG and shift every later init)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.scale, new.use_rel_pos = stock.num_heads, stock.scale, stock.use_rel_pos
        new.qkv, new.proj = stock.qkv, stock.proj
        if stock.use_rel_pos:
            new.rel_pos_h, new.rel_pos_w = stock.rel_pos_h, stock.rel_pos_w
        new.train(stock.training)
        return new

    def forward(self, x):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # an exported graph (peftseg export) gets detectron2's own attention: plain ops every
            # runtime has, the same function; chunking is a training-memory measure
            return super().forward(x)
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        if self.use_rel_pos:
            Rh = get_rel_pos(H, H, self.rel_pos_h)
            Rw = get_rel_pos(W, W, self.rel_pos_w)
            r_q = q.reshape(B * self.num_heads, H, W, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).reshape(B * self.num_heads, H * W, H)
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).reshape(B * self.num_heads, H * W, W)
            path = rel_pos_path(x.device) if self.path == "auto" else self.path
            if path == "sdpa":
                x = sdpa_rel_pos_attention(q, k, v, rel_h, rel_w, self.scale)
            elif path == "flex":
                if x.device.type == "cpu" and torch.is_grad_enabled() and (
                        q.requires_grad or self.rel_pos_h.requires_grad):
                    from peftseg.errors import UserError

                    raise UserError(
                        "model.attention=flex: this torch has no FlexAttention backward on the CPU, so it "
                        "cannot train there; use model.attention=efficient (it picks the chunked path on the "
                        "CPU and SDPA on CUDA), or train on a CUDA device.")
                # compiled only on CUDA: the CPU's eager forward serves evaluation and tests
                x = flex_rel_pos_attention(q, k, v, rel_h, rel_w, self.scale, self.num_heads,
                                           compiled=x.device.type == "cuda")
            else:
                x = rel_pos_attention(q, k, v, rel_h, rel_w, self.scale, self.chunk)
        else:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        x = x.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


def use_efficient_attention(vit: nn.Module, path: str = "auto") -> int:
    """Swap every detectron2 ViT `Attention` under `vit` for `EfficientAttention` in place,
    its rel-pos path `path` (auto or one of REL_POS_PATHS); returns how many were swapped."""
    swapped = 0
    for name, module in list(vit.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is Attention:
                new = EfficientAttention.from_detectron2(child)
                new.path = path
                setattr(module, child_name, new)
                swapped += 1
    return swapped
