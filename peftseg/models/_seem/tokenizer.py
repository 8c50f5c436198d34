"""The text side's inputs: the 81 prompt templates of the official class-embedding recipe and
CLIP's BPE tokenizer, built offline.

The official code calls `CLIPTokenizer.from_pretrained("openai/clip-vit-base-patch32")`, a hub
download. Here the same vocabulary comes from the BPE merges file that the `open_clip_torch`
package ships (`open_clip/bpe_simple_vocab_16e6.txt.gz`, the file CLIP's own SimpleTokenizer
reads), and is handed to transformers' CLIPTokenizer in memory: no network access, ever.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

from peftseg.errors import UserError

CONTEXT_LENGTH = 77
# CLIP's vocabulary: 256 byte symbols, the same with "</w>", 48,894 merges, then the two
# special tokens (49406, 49407) = 49,408 entries; the merges are lines 1..48894 of the file
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 256 * 2 + NUM_MERGES + 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"

# utils/prompt_engineering.get_prompt_templates() of the official code: CLIP's ImageNet
# templates after the bare "{}." (the class embedding is their normalised mean)
PROMPT_TEMPLATES = (
    '{}.', 'a photo of a {}.', 'a bad photo of a {}.', 'a photo of many {}.',
    'a sculpture of a {}.', 'a photo of the hard to see {}.', 'a low resolution photo of the {}.',
    'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.',
    'a photo of a hard to see {}.', 'a bright photo of a {}.', 'a photo of a clean {}.',
    'a photo of a dirty {}.', 'a dark photo of the {}.', 'a drawing of a {}.', 'a photo of my {}.',
    'the plastic {}.', 'a photo of the cool {}.', 'a close-up photo of a {}.',
    'a black and white photo of the {}.', 'a painting of the {}.', 'a painting of a {}.',
    'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.', 'a blurry photo of the {}.', 'a photo of the {}.',
    'a good photo of the {}.', 'a rendering of the {}.', 'a {} in a video game.',
    'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.',
    'a photo of a nice {}.', 'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.',
    'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.', 'a pixelated photo of a {}.',
    'itap of the {}.', 'a jpeg corrupted photo of the {}.', 'a good photo of a {}.',
    'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.',
    'a dark photo of a {}.', 'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.',
    'a photo of a cool {}.', 'a photo of a small {}.', 'a tattoo of the {}.',
)


def clean_class_name(name: str) -> str:
    """The official name cleaning before formatting a template (COCO panoptic suffixes)."""
    return name.replace("-other", "").replace("-merged", "").replace("-stuff", "")


def bpe_file() -> Path:
    """open_clip's copy of CLIP's BPE merges, located without importing open_clip (its
    package import pulls in its model zoo)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the seem family's text encoder needs CLIP's BPE vocabulary, which comes from the "
            "open_clip_torch package; install it with `pip install open_clip_torch` "
            "(it is a dependency of peftseg)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise UserError(f"open_clip_torch is installed but has no {path.name} at {path}; reinstall it "
                        "with `pip install --force-reinstall open_clip_torch`.")
    return path


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """transformers' CLIPTokenizer over CLIP's vocabulary (built once per process)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(bpe_file().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges,
                         bos_token=SOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
                         model_max_length=CONTEXT_LENGTH)


def tokenize(texts: list[str], context_length: int = CONTEXT_LENGTH):
    """input_ids and attention_mask (N x context_length, int64), padded with EOT as the
    official `padding="max_length", truncation=True` call does."""
    out = clip_tokenizer()(list(texts), padding="max_length", truncation=True,
                           max_length=context_length, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def prompt_tokens(class_names: list[str], context_length: int = CONTEXT_LENGTH):
    """(C x 81 x L) ids and attention masks of every template for every class name."""
    import torch

    ids, masks = [], []
    for name in class_names:
        i, m = tokenize([t.format(clean_class_name(name)) for t in PROMPT_TEMPLATES], context_length)
        ids.append(i)
        masks.append(m)
    return torch.stack(ids), torch.stack(masks)
