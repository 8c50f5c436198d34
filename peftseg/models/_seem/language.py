"""SEEM's language side: the CLIP-style text transformer (`lang_encoder.lang_encoder`), its
projection and logit scale (`lang_encoder.lang_proj`, `lang_encoder.logit_scale`), and the
class embeddings the classifier compares queries with.

Names and the forward follow the official `modeling/language/vlpencoder.py` and
`LangEncoder/transformer.py`: pre-LN residual blocks over nn.MultiheadAttention with a causal
mask, QuickGELU MLPs, TF-style LayerNorms (eps 1e-12, computed in float), the hidden state at
the first end-of-text token, `@ lang_proj`, normalised.

The encoder is frozen in every method of this project, so the class embeddings are computed
once per class list (`set_class_names`) and kept as a non-persistent buffer: no text forward
runs in a training step.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

import torch
import torch.nn as nn

from peftseg.models._seem.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, prompt_tokens

log = logging.getLogger(__name__)


class TFLayerNorm(nn.Module):
    """LayerNorm with the epsilon inside the square root, in float (the official text
    encoder's `LayerNorm`; torch's nn.LayerNorm differs in rounding at eps 1e-12)."""

    def __init__(self, width: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.variance_epsilon)
        return self.weight * x.to(dtype) + self.bias


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = TFLayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = TFLayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, context_length: int = CONTEXT_LENGTH,
                 vocab_size: int = VOCAB_SIZE, autoregressive: bool = True):
        super().__init__()
        self.context_length = context_length
        self.autoregressive = autoregressive
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_final = TFLayerNorm(width)
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)
        nn.init.trunc_normal_(self.token_embedding.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (N x L x width). Causal attention only: the official encoder applies
        no key-padding mask when it is autoregressive."""
        x = self.token_embedding(input_ids) + self.positional_embedding
        x = x.permute(1, 0, 2)  # L x N x D, nn.MultiheadAttention's default layout
        mask = None
        if self.autoregressive:
            mask = torch.full((x.shape[0], x.shape[0]), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        for block in self.resblocks:
            x = block(x, mask)
        return self.ln_final(x.permute(1, 0, 2))


class LanguageEncoder(nn.Module):
    """`sem_seg_head.predictor.lang_encoder`: text transformer + projection + logit scale, and
    the cached class embeddings (`class_embeddings`, C+1 rows, the last is "background")."""

    def __init__(self, width: int, layers: int, heads: int, dim_proj: int,
                 context_length: int = CONTEXT_LENGTH, autoregressive: bool = True):
        super().__init__()
        self.lang_encoder = TextTransformer(width, layers, heads, context_length, autoregressive=autoregressive)
        self.lang_proj = nn.Parameter(torch.empty(width, dim_proj))
        nn.init.trunc_normal_(self.lang_proj, std=0.02)
        # CLIP's initial temperature 1/0.07, where CLIP training starts (the official
        # vlpencoder initialises 1, exp(1) = 2.7). Only a model built without weights keeps it:
        # released checkpoints (and the oracle's weights) load their own value. The scale is
        # frozen with the text encoder, and a random text encoder (seem_tiny) gives class
        # embeddings with cosines of 0.92-0.97 to each other, so a class score can lead another
        # by at most exp(logit_scale) * |t_i - t_j|: about 1 at exp(1), which kept class
        # probabilities close to uniform (seem_tiny full on shapes, 400 iterations: mask AP
        # 21.7 at exp(1), 25.9 at 1/0.07).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.context_length = context_length
        # not in the state dict: derived from the class names and the (frozen) weights above
        self.register_buffer("class_embeddings", torch.zeros(0, dim_proj), persistent=False)
        self.class_names: tuple[str, ...] = ()
        # a state dict loaded later (official weights, a merged checkpoint, a resume) may change
        # what the cached embeddings were computed from: recompute them when it carries text
        # encoder tensors, and only then (an adapter checkpoint or a visual-only load leaves
        # them as they are, and a text forward of 81 prompts per class is not free)
        self._text_loaded = False
        self.register_load_state_dict_pre_hook(_note_text_tensors)
        self.register_load_state_dict_post_hook(_refresh_class_embeddings)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Normalised projected embedding of each token sequence (N x dim_proj)."""
        hidden = self.lang_encoder(input_ids)
        # the first end-of-text token: padding is end-of-text too, argmax returns the first maximum
        x = hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]
        x = x @ self.lang_proj
        return x / (x.norm(dim=-1, keepdim=True) + 1e-7)

    @torch.no_grad()
    def class_text_embeddings(self, class_names: list[str]) -> torch.Tensor:
        """The official eval recipe: per class, the normalised mean of its 81 template
        embeddings (C x dim_proj)."""
        ids, _ = prompt_tokens(class_names, self.context_length)
        device = self.lang_proj.device
        rows = []
        for class_ids in ids:
            emb = self.encode(class_ids.to(device)).mean(dim=0)
            rows.append(emb / emb.norm())
        return torch.stack(rows)

    def set_class_names(self, class_names: list[str]) -> None:
        """Compute and cache the classifier's text embeddings for `class_names` + background."""
        names = tuple(class_names) + ("background",)
        was_training = self.training
        self.eval()
        emb = self.class_text_embeddings(list(names))
        self.train(was_training)
        self.class_embeddings = emb.to(self.lang_proj.dtype)
        self.class_names = names
        log.debug("seem: text embeddings for %d classes + background computed once and cached", len(names) - 1)

    def class_state(self) -> tuple[tuple[str, ...], torch.Tensor]:
        """The cached class names (+ background) and their embeddings, as `load_class_state`
        takes them back: task variants of other classes on one base switch these instead of
        running the text encoder at every switch (peftseg.checkpoint.variants)."""
        return self.class_names, self.class_embeddings

    def load_class_state(self, state: tuple[tuple[str, ...], torch.Tensor]) -> None:
        names, embeddings = state
        self.class_embeddings = embeddings
        self.class_names = tuple(names)

    def compute_similarity(self, v_emb: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cos(query, class) for every class and background (B x Q x C+1)."""
        v_emb = v_emb / (v_emb.norm(dim=-1, keepdim=True) + 1e-7)
        return self.logit_scale.exp() * v_emb @ self.class_embeddings.to(v_emb.dtype).t()


# what the class embeddings are computed from (logit_scale only scales the similarities)
_TEXT_TENSORS = ("lang_encoder.", "lang_proj")


def _note_text_tensors(module: LanguageEncoder, state_dict, prefix, *args) -> None:
    """Load pre-hook: does this load bring tensors the class embeddings depend on?"""
    if any(k.startswith(tuple(prefix + t for t in _TEXT_TENSORS)) for k in state_dict):
        module._text_loaded = True


def _refresh_class_embeddings(module: LanguageEncoder, incompatible_keys) -> None:
    loaded, module._text_loaded = module._text_loaded, False
    if loaded and module.class_names:
        module.set_class_names(list(module.class_names[:-1]))
