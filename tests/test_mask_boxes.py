"""Boxes around masks (peftseg.models._mask_boxes): detectron2's and torchvision's boxes, and still
a function of the masks once traced (their Python loops froze the traced image's boxes into
exported seem and maskdino graphs)."""

from __future__ import annotations

import pytest
import torch
from detectron2.structures import BitMasks
from torchvision.ops import masks_to_boxes

from peftseg.models._mask_boxes import mask_boxes


def _masks(seed: int) -> torch.Tensor:
    """Rectangles and scattered pixels of random extent, two of them empty."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(12, 17, 23, generator=g) > 0.995
    for i in range(2, 10):
        y0, x0 = torch.randint(0, 12, (2,), generator=g).tolist()
        masks[i, y0:y0 + 5, x0:x0 + 9] = True
    masks[0] = False
    masks[11] = False
    masks[10, 16, 22] = True  # the last pixel: x2 = w, y2 = h
    return masks


def test_the_boxes_are_detectron2s_and_torchvisions():
    masks = _masks(0)
    assert torch.equal(mask_boxes(masks), BitMasks(masks).get_bounding_boxes().tensor)
    assert torch.equal(mask_boxes(masks.float()), BitMasks(masks).get_bounding_boxes().tensor)  # 0/1 floats too
    assert mask_boxes(masks)[0].tolist() == [0, 0, 0, 0]  # empty, as detectron2 gives it
    assert mask_boxes(masks)[10, 2:].tolist() == [23, 17]
    nonempty = masks.flatten(1).any(1)  # torchvision refuses empty masks
    assert torch.equal(mask_boxes(masks[nonempty], exclusive_end=False), masks_to_boxes(masks[nonempty]))
    assert mask_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)


@pytest.mark.parametrize("exclusive_end", [True, False])
def test_traced_boxes_follow_the_masks_they_are_given(exclusive_end, tmp_path):
    traced = torch.jit.trace(lambda m: mask_boxes(m, exclusive_end), (_masks(0),), check_trace=False)
    other = _masks(1)
    assert not torch.equal(mask_boxes(other, exclusive_end), mask_boxes(_masks(0), exclusive_end))
    assert torch.equal(traced(other), mask_boxes(other, exclusive_end))

    import onnxruntime as ort

    class Boxes(torch.nn.Module):
        def forward(self, m):
            return mask_boxes(m, exclusive_end)

    path = tmp_path / "boxes.onnx"
    torch.onnx.export(Boxes(), (_masks(0),), str(path), dynamo=False, opset_version=17, input_names=["m"])
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"m": other.numpy()})
    assert torch.equal(torch.from_numpy(got), mask_boxes(other, exclusive_end))
