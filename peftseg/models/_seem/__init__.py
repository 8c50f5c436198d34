"""SEEM (Zou et al., NeurIPS 2023), its instance-segmentation path, in PyTorch on detectron2:
the heavy half of the `seem` family. Never auto-imported (leading underscore);
`peftseg.models.seem` imports it inside `build`.

The module tree uses the official project's attribute names (UX-Decoder/Segment-Everything-
Everywhere-All-At-Once: backbone / sem_seg_head.pixel_decoder / sem_seg_head.predictor (with
lang_encoder) / criterion / dilation_kernel), so released checkpoints load key for key. The code
is written here from the paper and the names and shapes of the official modules.
"""
