"""Mask DINO (Li et al., CVPR 2023) in pure PyTorch on detectron2: the heavy half of the
`maskdino` family. Never auto-imported (leading underscore); `peftseg.models.maskdino`
imports it inside `build`.

The module tree uses the official project's attribute names (IDEA-Research/MaskDINO:
backbone / sem_seg_head.pixel_decoder / sem_seg_head.predictor / criterion), so released
checkpoints load key for key. The code is written here from the paper and the names and
shapes of the official modules; the compiled CUDA op of the official project is replaced
by a grid_sample implementation of multi-scale deformable attention.
"""
