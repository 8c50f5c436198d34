"""`peftseg export`: a trained model as one ONNX or TorchScript file, its parity checked.

The graph maps one image tensor (float32, (3, S, S), values 0..255 in the model's channel
order, S = model.image_size: resizing is the caller's) to boxes (x1, y1, x2, y2 in input
pixels), classes, masks and scores:
- LoRA-family updates are folded into the weights they adapt (peft's merge, as `peftseg
  merge` does); bottleneck adapters and side paths, which have no merged form, are traced
  as part of the graph (their forward hooks run while tracing);
- Mask R-CNN families go through Detectron2's TracingAdapter with the model's own
  `inference(do_postprocess=False)`: masks are the mask head's per-box probabilities
  (N, 1, M, M), before pasting into the image (which detectron2 scripts with control flow
  that ONNX runtimes reject);
- query-based families (mask2former, maskdino) are traced through their forward, whose
  multi-scale deformable attention is the grid_sample implementation: no custom op.
  Their masks are what the model returns (maskdino: binary masks at input size).

After writing, the file is loaded by its runtime (onnxruntime / torch.jit.load) and run on
3 images next to the PyTorch model; the max abs differences go to `<file>.parity.json`.
Files are written atomically: an export that fails leaves nothing behind.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from peftseg.errors import UserError
from peftseg.io.atomic import write_atomic_with, write_json
from peftseg.io.output_guard import check_targets, output_file, write_errors

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
OPSET = 17  # GridSample (deformable attention) needs >= 16
# Max abs difference accepted between the exported file and PyTorch, per output, in float32
# roundings (ulps) of the size compared: another runtime's kernels sum the same network in
# other orders and fuse ops, and that error grows with depth (about 100 ulps seen on ViT-B at
# 1024 px). Scores and mask probabilities are at most 1; boxes are pixels, so theirs scales
# with the image side (64 ulps: 1e-3 px at 128 px, 8e-3 px at 1024 px).
ULPS = {"scores": 1024, "boxes": 64, "masks": 1024}
_EPS32 = float(np.finfo(np.float32).eps)


def tolerance_for(image_side: int) -> dict[str, float]:
    return {"scores": ULPS["scores"] * _EPS32, "boxes": ULPS["boxes"] * _EPS32 * image_side,
            "masks": ULPS["masks"] * _EPS32}
PARITY_IMAGES = 3
_FIELDS = {"pred_boxes": "boxes", "pred_classes": "classes", "pred_masks": "masks", "scores": "scores"}


@dataclass
class Exported:
    path: Path
    parity: dict  # what <file>.parity.json holds
    family: str

    @property
    def parity_path(self) -> Path:
        return parity_path(self.path)


def parity_path(path: Path) -> Path:
    return path.with_name(path.name + ".parity.json")


def _rcnn_inference(model, inputs):
    # raw per-box mask probabilities; pasting them into the image is left to the caller
    return model.inference(inputs, do_postprocess=False)


def tracing_adapter(model: nn.Module, image: torch.Tensor):
    """Detectron2's TracingAdapter: the model as a function of tensors only."""
    from detectron2.export import TracingAdapter
    from detectron2.modeling import GeneralizedRCNN

    inference = _rcnn_inference if isinstance(model, GeneralizedRCNN) else None
    adapter = TracingAdapter(model, [{"image": image}], inference_func=inference)
    return adapter.eval()


def _output_names(adapter, outputs) -> list[str]:
    """Names of the flattened outputs: one per Instances field, plus the image size."""
    from detectron2.export.flatten import InstancesSchema

    schema = adapter.outputs_schema
    while not isinstance(schema, InstancesSchema):  # [Instances] (R-CNN) or [{"instances": …}]
        (schema,) = schema.schemas
    names = [_FIELDS.get(k, k) for k in schema.keys]
    return names + ["image_size"] if len(outputs) == len(names) + 1 else names


def example_images(size: int, n: int, seed: int) -> list[torch.Tensor]:
    """Seeded images of the graph's input shape: smooth blobs over noise, so that a model
    finds objects in them (pure noise gives trained models nothing to detect)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    for _ in range(n):
        image = torch.rand(3, size, size, generator=g) * 40 + 100
        for _ in range(4):
            cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([size, size, size / 4])).tolist()
            colour = torch.rand(3, 1, 1, generator=g) * 255
            inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 4) ** 2).float()
            image = image * (1 - inside) + colour * inside
        out.append(image.clamp(0, 255))
    return out


def _unsupported(e: Exception, family: str, fmt: str) -> UserError:
    text = str(e)
    m = re.search(r"operator '?([\w:.]+)'?", text) or re.search(r"(aten::\w+|prim::\w+)", text)
    op = m.group(1) if m else type(e).__name__
    return UserError(
        f"model family {family!r} cannot be exported to {fmt}: operator {op} has no {fmt} form "
        f"({text.splitlines()[0][:300] if text else type(e).__name__}). Nothing was written; export another "
        "format, or serve this model with PyTorch (`peftseg predict`)."
    )


def _serialise(adapter, image: torch.Tensor, fmt: str, family: str) -> tuple[bytes, list[str]]:
    import warnings

    with torch.no_grad():
        reference = adapter(image)
    names = _output_names(adapter, reference)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings on every Python-level shape check
            if fmt == "onnx":
                torch.onnx.export(adapter, (image,), buf, dynamo=False, opset_version=OPSET,
                                  input_names=["image"], output_names=names, do_constant_folding=True)
            else:
                traced = torch.jit.trace(adapter, (image,), check_trace=False)
                torch.jit.save(traced, buf)
    except UserError:
        raise
    except Exception as e:  # the exporter's word for an op it has no form of: refused by name
        raise _unsupported(e, family, fmt) from None
    finally:
        adapter.eval()  # torch.onnx.export restores the mode it found; keep eval either way
    return buf.getvalue(), names


def _runner(payload: bytes, fmt: str):
    """The exported file as its own runtime loads it: image tensor -> list of numpy arrays."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
        return lambda image: session.run(None, {"image": image.numpy()})
    loaded = torch.jit.load(io.BytesIO(payload), map_location="cpu").eval()

    def run(image):
        with torch.no_grad():
            return [o.numpy() for o in loaded(image)]
    return run


def check_parity(adapter, run, names: list[str], images: list[torch.Tensor]) -> dict:
    """Max abs differences (exported vs PyTorch) over `images`, per output; classes must match."""
    diffs = {k: 0.0 for k in ULPS}
    per_image, same_classes, same_count = [], True, True
    for image in images:
        with torch.no_grad():
            ref = {n: t.numpy() for n, t in zip(names, adapter(image))}
        got = dict(zip(names, run(image)))
        n_ref, n_got = len(ref["scores"]), len(got["scores"])
        per_image.append({"detections_pytorch": n_ref, "detections_exported": n_got})
        if n_ref != n_got:
            same_count = False
            continue
        same_classes &= bool(np.array_equal(ref["classes"], got["classes"]))
        for key in ULPS:
            if n_ref:
                d = np.abs(ref[key].astype(np.float64) - got[key].astype(np.float64)).max()
                diffs[key] = max(diffs[key], float(d))
    finite = all(np.isfinite(v) for v in diffs.values())
    tolerance = tolerance_for(max(images[0].shape[-2:]))
    ok = same_count and same_classes and finite and all(diffs[k] <= tolerance[k] for k in ULPS)
    return {
        "max_abs_diff": diffs if same_count else {k: None for k in ULPS},
        "classes_equal": same_classes if same_count else None,
        "same_detection_count": same_count,
        "images": per_image,
        "tolerance": tolerance,
        "within_tolerance": bool(ok),
    }


def default_output(source: Path, fmt: str) -> Path:
    return source.with_name(source.name.split(".")[0] + FORMATS[fmt])


def export_checkpoint(checkpoint: str, fmt: str, output: str | None, overrides: list[str],
                      classes: list[str] | None = None) -> Exported:
    """Load (checkpoint.load), fold peft layers, trace, write atomically, check parity."""
    from peftseg.checkpoint.load import load_model
    from peftseg.checkpoint.merge import fold_tuner_layers

    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r} is not an export format; choose format=onnx or format=torchscript.")
    loaded = load_model(checkpoint, overrides, classes=classes)  # classes: a plain checkpoint's
    family = str(loaded.cfg.model.family)
    out = Path(output) if output else default_output(loaded.source, fmt)
    # invariant 2 (peftseg.io.output_guard): the format's suffix, never the checkpoint, a run's own
    # file, a link or a device (as root, an atomic write over /dev/null replaced the device)
    output_file(out, ("." + FORMATS[fmt].rsplit(".", 1)[-1],), inputs=[loaded.source] if loaded.source else [], what="output=")
    check_targets([parity_path(out)], [], what="output=")
    model = fold_tuner_layers(loaded.model.to("cpu").eval())
    size = int(loaded.cfg.model.image_size)
    (trace_image,) = example_images(size, 1, seed=1234)
    adapter = tracing_adapter(model, trace_image)
    start = time.perf_counter()
    payload, names = _serialise(adapter, trace_image, fmt, family)
    seconds = time.perf_counter() - start
    if fmt == "onnx" and not payload:
        raise UserError(f"the ONNX exporter produced an empty graph for family {family!r}; nothing was written.")
    run = _runner(payload, fmt)  # loads before anything is written: a file its runtime rejects is never left
    parity = check_parity(adapter, run, names, example_images(size, PARITY_IMAGES, seed=0))
    record = {
        "format": fmt, "file": str(out), "checkpoint": str(loaded.source), "checkpoint_kind": loaded.kind,
        "model": loaded.cfg.model.name, "family": family, "method": loaded.cfg.method.name,
        "class_names": loaded.class_names, "export_seconds": round(seconds, 3), "opset": OPSET if fmt == "onnx" else None,
        "input": {"name": "image", "shape": [3, size, size], "dtype": "float32",
                  "values": f"0..255, {model.input_format} channel order"},
        "outputs": names, **parity,
    }
    with write_errors(out):
        write_atomic_with(out, lambda f: f.write(payload))
        write_json(parity_path(out), record)
    return Exported(path=out, parity=record, family=family)
