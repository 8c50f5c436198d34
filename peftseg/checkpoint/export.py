"""`peftseg export`: a trained model as one ONNX, PyTorch 2 (ExportedProgram) or TorchScript file,
its parity checked.

Formats:
- `pt2`: torch.export's ExportedProgram (`torch.export.export` + `torch.export.save`), the graph
  torch itself serves (`torch.export.load(f).module()`, AOTInductor, ExecuTorch). While exporting,
  detectron2's padding of the input is computed in Python ints (compat.static_image_padding):
  otherwise torch.export meets a data-dependent size. A .pt2 file holds pickled tensors, and
  `torch.export.load` unpickles them with code execution allowed (torch warns: never load one
  from an untrusted source). peftseg loads no .pt2 file a user gives it: the parity check loads
  the bytes this command has just written, in memory;
- `onnx`: torch's dynamo exporter (`torch.onnx.export(dynamo=True)` of the ExportedProgram pt2
  makes, translated by onnxscript, opset ONNX_OPSET). Where torch.export cannot capture the model
  (the Mask R-CNN families: Detectron2's RPN branches in Python on how many proposals survive)
  the TorchScript-based exporter (dynamo=False, opset OPSET) writes it instead; the record's
  `onnx_exporter` says which ran, and why when it is the older one;
- `torchscript`: deprecated by torch (torch.jit warns: switch to torch.export); kept while torch
  ships it, for deployments that load it. Prefer `pt2`.

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
- query-based families (mask2former, maskdino, seem) are traced through their forward, whose
  multi-scale deformable attention is the grid_sample implementation: no custom op, and whose
  boxes around masks are tensor ops (peftseg.models._mask_boxes), not Python loops a tracer
  would freeze into the traced image's boxes. Their masks are what the model returns (binary
  masks at input size).

Checks, in order (nothing is written until the last):
- the output is the format's suffix, not an input or a run's own file, and not another output:
  a file already there is replaced only when it is this command's own earlier export of the
  same checkpoint (path and sha256) to the same format (output_guard.replaceable);
- the model's weights are finite, and so are its PyTorch outputs on the parity images
  (PARITY_IMAGES synthetic ones, or the first MAX_GIVEN_IMAGES of `images=`), which hold at
  least MIN_COMPARED detections: otherwise there is nothing to compare;
- the written bytes, loaded by their runtime (onnxruntime / torch.export.load / torch.jit.load), give the same
  detections within the tolerance (parity_problems). A pass writes `<output>` and
  `<output>.parity.json`; a failure writes the file as `<name>.FAILED-parity<suffix>` (with its
  record) and removes this checkpoint's earlier export at `<output>`, so that no file that failed
  looks deployable. Files are written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from peftseg.errors import UserError
from peftseg.io.atomic import write_atomic_with, write_json
from peftseg.io.output_guard import check_targets, output_file, replaceable, write_errors

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".torchscript.pt"}
DEPRECATED = {"torchscript": "TorchScript is deprecated by torch (torch.jit: \"switch to torch.export\"); "
                             "format=pt2 is its successor"}
OPSET = 17  # the TorchScript-based exporter's: GridSample (deformable attention) needs >= 16
ONNX_OPSET = 18  # the dynamo exporter's (its lowest)
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
# A comparison is a pass only if it compared something: at least this many detections, matched
# image by image, over the parity images. The class check is what catches a graph that computes
# something else entirely; were its classes random among K >= 2, all 10 would agree with chance
# <= 2^-10 (1/1024), while every model that detects anything returns far more than 10 (query
# families their top-k, 50 in the tiny presets; R-CNN up to detections_per_image).
MIN_COMPARED = 10
# Binary masks (logits > 0) cannot differ by a rounding: a pixel whose logit is within rounding of
# 0 flips to the other value. At most this fraction of the compared pixels may (2 of 2457600 seen:
# mask2former + side to ONNX), 25 pixels on 3 x 50 masks of 128 px; a wrong graph differs in whole
# regions (a mask shifted by one pixel flips its whole outline).
BINARY_MASK_PIXELS = 1e-5
FAILED_TAG = ".FAILED-parity"
MAX_GIVEN_IMAGES = 10  # of images=: each one is a run of the exported file and of PyTorch
_FIELDS = {"pred_boxes": "boxes", "pred_classes": "classes", "pred_masks": "masks", "scores": "scores"}


@dataclass
class Exported:
    path: Path  # the file written: `intended` when parity passed, its FAILED-parity name when not
    parity: dict  # what <file>.parity.json holds
    family: str
    intended: Path  # the output asked for (or the default one)
    replaced: bool = False  # `path` was this command's own earlier export of the same checkpoint + format
    removed: list = field(default_factory=list)  # its earlier files that this result made stale

    @property
    def ok(self) -> bool:
        return bool(self.parity["within_tolerance"])

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
    """The exporter's error as one paragraph: the operator it has no form of, by name, or else what
    failed inside it (never an exception's class passed off as an operator)."""
    text = str(e)
    first = text.splitlines()[0][:300] if text else type(e).__name__
    m = re.search(r"operator '?([\w:.]+)'?", text) or re.search(r"(aten::\w+|prim::\w+)", text)
    # torch.export names the detectron2 line whose data-dependent value it cannot capture
    where = re.search(r"Caused by: \(([^)]+)\)", text)
    at = f" at {where.group(1)}" if where else ""
    what = (f"operator {m.group(1)} has no {fmt} form ({first})" if m
            else f"the {fmt} exporter failed inside torch ({type(e).__name__}: {first}{at})")
    return UserError(
        f"model family {family!r} cannot be exported to {fmt}: {what}. Nothing was written; export another "
        "format, or serve this model with PyTorch (`peftseg predict`)."
    )


@contextlib.contextmanager
def _quiet_symbolic_shapes():
    """torch.export logs the whole traced graph (thousands of lines) as a warning before it raises on a
    data-dependent value; the refusal (_unsupported) names the expression and the line instead."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _exported_program(adapter, image: torch.Tensor):
    """torch.export of the model, non-strict: torch.export runs the Python (detectron2's Instances,
    TracingAdapter's flattening) as it is and records the tensor ops, as tracing does, but refuses what
    depends on data instead of freezing it."""
    from peftseg.compat import static_image_padding

    with static_image_padding(), _quiet_symbolic_shapes():
        return torch.export.export(adapter, (image,), strict=False)


# Detectron2's GeneralizedRCNN: its RPN keeps the top proposals with Python branches on how many there
# are, which torch.export refuses (GuardOnDataDependentSymNode, torch 2.14): not tried for ONNX, where
# it would cost half a minute to fail. format=pt2 still tries it, and tests/test_export.py holds that
# refusal, so a torch that captures it shows there.
_NOT_CAPTURED = {"GeneralizedRCNN": "Detectron2's RPN selects proposals with Python branches on how many there are"}


class _NotCaptured(Exception):
    pass


def _onnx(adapter, image: torch.Tensor, names: list[str], buf) -> dict:
    """ONNX by the dynamo exporter from the ExportedProgram, else (torch.export cannot capture the
    model) by the TorchScript-based exporter; returns what ran, for the record."""
    arch = type(adapter.model).__name__
    try:
        if arch in _NOT_CAPTURED:
            raise _NotCaptured(_NOT_CAPTURED[arch])
        program = _exported_program(adapter, image)
    except Exception as e:  # noqa: BLE001 (torch.export's refusal: the older exporter traces instead)
        text = str(e)
        why = text if isinstance(e, _NotCaptured) else f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
        torch.onnx.export(adapter, (image,), buf, dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=names, do_constant_folding=True)
        return {"onnx_exporter": "torchscript", "opset": OPSET,
                "onnx_exporter_why": f"torch.export cannot capture this model ({why})"}
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=ONNX_OPSET, input_names=["image"],
                                     output_names=names, external_data=False)
    buf.write(onnx_program.model_proto.SerializeToString())
    return {"onnx_exporter": "dynamo", "opset": ONNX_OPSET}


def _serialise(adapter, image: torch.Tensor, fmt: str, family: str, names: list[str]) -> tuple[bytes, dict]:
    import warnings

    buf = io.BytesIO()
    how: dict = {}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings on every Python-level shape check
            if fmt == "onnx":
                how = _onnx(adapter, image, names, buf)
            elif fmt == "pt2":
                torch.export.save(_exported_program(adapter, image), buf)
            else:
                traced = torch.jit.trace(adapter, (image,), check_trace=False)
                torch.jit.save(traced, buf)
    except UserError:
        raise
    except Exception as e:  # the exporter's word for an op it has no form of: refused by name
        raise _unsupported(e, family, fmt) from None
    finally:
        adapter.eval()  # torch.onnx.export restores the mode it found; keep eval either way
    return buf.getvalue(), how


def _runner(payload: bytes, fmt: str):
    """The exported file as its own runtime loads it: image tensor -> list of numpy arrays."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
        return lambda image: session.run(None, {"image": image.numpy()})
    if fmt == "pt2":
        # the bytes this command serialised a moment ago, never a file from elsewhere (module docstring)
        loaded = torch.export.load(io.BytesIO(payload)).module()
    else:
        loaded = torch.jit.load(io.BytesIO(payload), map_location="cpu").eval()

    def run(image):
        with torch.no_grad():
            return [o.numpy() for o in loaded(image)]
    return run


def _nonfinite_tensors(model: nn.Module) -> list[str]:
    """Every parameter and buffer holding NaN or ±inf, with how many of its values are."""
    found = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point():
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or inf:
            counts = " and ".join(f"{n} {w}" for n, w in ((nan, "NaN"), (inf, "inf")) if n)
            found.append(f"{name} ({counts} of {t.numel()} values)")
    return found


def refuse_nonfinite_weights(model: nn.Module, source: Path | None) -> None:
    """Invariant 1, before anything is traced: a model with NaN/inf weights is not exported (its
    outputs mean nothing, and a parity check of NaN against NaN would compare nothing)."""
    bad = _nonfinite_tensors(model)
    if bad:
        total = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserError(
            f"{source or 'the model'} holds NaN or infinite values in {len(bad)} of its {total} tensors: {shown}. "
            "A model with non-finite weights computes nothing meaningful, so it was not exported and nothing was "
            "written. Export the checkpoint of a run that did not diverge (its model_final file, or an earlier "
            "model_* checkpoint of it), or merge again from one."
        )


def given_images(paths: list[Path], size: int, image_format: str) -> list[torch.Tensor]:
    """Parity images of the user's (`images=`): read as training reads them (data/images.py),
    resized to the graph's S x S input (bilinear), at most MAX_GIVEN_IMAGES of them."""
    import torch.nn.functional as F

    from peftseg.data.images import read_image_checked

    out = []
    for path in paths[:MAX_GIVEN_IMAGES]:
        try:
            pixels = read_image_checked(str(path), image_format)
        except ValueError as e:
            raise UserError(f"images= {path} cannot be used: {e}. Give image files the model was trained on "
                            "(PNG, JPEG, …), e.g. images=data/val/.") from None
        image = torch.as_tensor(np.array(pixels, dtype=np.float32)).permute(2, 0, 1)[None]  # HWC uint8 -> 1CHW
        out.append(F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0, 255))
    return out


def reference_outputs(adapter, names: list[str], images: list[torch.Tensor], what: str,
                      described: str = "") -> list[dict]:
    """PyTorch's outputs on the parity images, refused when they cannot be compared (invariant 1):
    non-finite values, or fewer than MIN_COMPARED detections in all. `described`: what the images are."""
    described = described or f"the {len(images)} parity images (seeded coloured discs over noise, {images[0].shape[-1]} px)"
    refs = []
    for image in images:
        with torch.no_grad():
            refs.append({n: t.numpy() for n, t in zip(names, adapter(image))})
    bad = [f"{k} on image {i}" for i, ref in enumerate(refs) for k in ULPS
           if ref[k].dtype.kind == "f" and not np.isfinite(ref[k]).all()]
    if bad:
        raise UserError(
            f"{what} gives NaN or infinite outputs in PyTorch itself ({', '.join(bad)}) on {described}, so there is "
            "nothing correct to export; nothing was written. Its weights are finite, so the values overflow inside "
            "the network: export the checkpoint of a run that trained stably."
        )
    found = [len(ref["scores"]) for ref in refs]
    if sum(found) < MIN_COMPARED:
        raise UserError(
            f"{what} finds {sum(found)} detections ({' + '.join(map(str, found))}) on {described}, fewer than the "
            f"{MIN_COMPARED} that the parity check needs to compare the exported file with PyTorch, so the file could "
            "not be verified and nothing was written. A model finds that little when its scores stay under its score "
            "threshold on such images or it predicts nothing: give images=<folder> with a few images of what it was "
            f"trained on (the first {MAX_GIVEN_IMAGES} are resized to the input size and compared), and check it with "
            "`peftseg predict` if it finds nothing there either."
        )
    return refs


def _binary(masks: np.ndarray) -> bool:
    """Masks of 0/1 values (the query families threshold their mask logits), not probabilities."""
    return masks.dtype == bool or bool(np.isin(masks, (0, 1)).all())


def check_parity(refs: list[dict], run, images: list[torch.Tensor]) -> dict:
    """The exported file (`run`) against PyTorch's outputs `refs` on `images`: max abs differences
    per output (for binary masks: how many pixels differ), whether classes and numbers of
    detections agree, and the verdict (parity_problems)."""
    diffs = {k: 0.0 for k in ULPS}
    nonfinite: set[str] = set()
    per_image, same_classes, same_count, compared = [], True, True, 0
    binary, pixels_differing, pixels = False, 0, 0
    for ref_, image in zip(refs, images):
        got = dict(zip(ref_, run(image)))
        n_ref, n_got = len(ref_["scores"]), len(got["scores"])
        per_image.append({"detections_pytorch": n_ref, "detections_exported": n_got})
        if n_ref != n_got:
            same_count = False
            continue
        compared += n_ref
        same_classes &= bool(np.array_equal(ref_["classes"], got["classes"]))
        if not n_ref:
            continue
        for key in ULPS:
            d = np.abs(ref_[key].astype(np.float64) - got[key].astype(np.float64))
            if not np.isfinite(d).all():  # max() would drop a NaN: count it by name instead
                nonfinite.add(key)
                continue
            diffs[key] = max(diffs[key], float(d.max()))
            if key == "masks" and _binary(ref_["masks"]):
                binary = True
                pixels_differing += int(np.count_nonzero(d))
                pixels += d.size
    parity = {
        "max_abs_diff": {k: (None if k in nonfinite else diffs[k]) for k in ULPS} if same_count else {k: None for k in ULPS},
        "nonfinite_exported": sorted(nonfinite),
        "classes_equal": same_classes if same_count else None,
        "same_detection_count": same_count,
        "compared_detections": compared,
        "min_compared_detections": MIN_COMPARED,
        "images": per_image,
        "tolerance": tolerance_for(max(images[0].shape[-2:])),
        "binary_masks": binary,
    }
    if binary:
        parity["mask_pixels"] = {"differing": pixels_differing, "compared": pixels,
                                 "allowed": int(BINARY_MASK_PIXELS * pixels)}
    parity["problems"] = parity_problems(parity)
    parity["within_tolerance"] = not parity["problems"]
    return parity


def parity_problems(parity: dict) -> list[str]:
    """Invariant 1, the one verdict: why the comparison is not a pass ([] when it is). A pass needs
    the same number of detections on every image, at least MIN_COMPARED of them compared, equal
    classes, finite exported values, and every max abs difference within the tolerance (binary
    masks: at most BINARY_MASK_PIXELS of their pixels differing)."""
    if not parity["same_detection_count"]:
        counts = ", ".join(f"{i['detections_pytorch']} vs {i['detections_exported']}" for i in parity["images"])
        return [f"the exported file finds other numbers of detections than PyTorch ({counts})"]
    problems = []
    if parity["compared_detections"] < parity["min_compared_detections"]:
        problems.append(f"only {parity['compared_detections']} detections were compared (at least "
                        f"{parity['min_compared_detections']} are needed)")
    if not parity["classes_equal"]:
        problems.append("the classes differ")
    if parity["nonfinite_exported"]:
        problems.append(f"the exported file gives NaN or inf {', '.join(parity['nonfinite_exported'])} where PyTorch's "
                        "are finite")
    diffs, tol = parity["max_abs_diff"], parity["tolerance"]
    binary = parity.get("binary_masks", False)
    over = [f"{k} {diffs[k]:.3g} > {tol[k]:.3g}" for k in ULPS
            if diffs[k] is not None and diffs[k] > tol[k] and not (k == "masks" and binary)]
    if over:
        problems.append(f"max abs differences over the tolerance: {', '.join(over)}")
    if binary and parity["mask_pixels"]["differing"] > parity["mask_pixels"]["allowed"]:
        m = parity["mask_pixels"]
        problems.append(f"{m['differing']} of the {m['compared']} binary mask pixels differ (at most {m['allowed']} "
                        "may: those whose logit is within rounding of the threshold)")
    return problems


def default_output(source: Path, fmt: str) -> Path:
    """`<checkpoint name without its last suffix><format suffix>` beside it: the whole stem, so that
    v1.2.safetensors and v1.3.safetensors export to v1.2.onnx and v1.3.onnx."""
    return source.with_name(source.name[: len(source.name) - len(source.suffix)] + FORMATS[fmt])


def failed_path(out: Path, fmt: str) -> Path:
    """Where an export that failed parity goes: `<name>.FAILED-parity<suffix>`, a name nobody deploys
    by mistake (model.onnx -> model.FAILED-parity.onnx)."""
    suffix = FORMATS[fmt] if out.name.endswith(FORMATS[fmt]) else out.suffix
    return out.with_name(out.name[: len(out.name) - len(suffix)] + FAILED_TAG + suffix)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_checkpoint(checkpoint: str, fmt: str, output: str | None, overrides: list[str],
                      classes: list[str] | None = None, images: list[Path] | None = None,
                      stage: Callable[[str], None] | None = None) -> Exported:
    """Load (checkpoint.load), check, fold peft layers, trace, check parity, write atomically: the file at
    `output` when parity passes, at failed_path(output) when it does not (Exported.ok says which).
    `images`: image files to check parity on instead of the synthetic ones. `stage`: called with
    each step as it starts (loading, running PyTorch, tracing, the parity check), for progress."""
    from peftseg.checkpoint.load import load_model
    from peftseg.checkpoint.merge import fold_tuner_layers

    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r} is not an export format; choose format=onnx, format=pt2 or "
                        "format=torchscript (deprecated by torch).")
    stage = stage or (lambda text: None)
    stage(f"loading {checkpoint or 'the model'}")
    loaded = load_model(checkpoint, overrides, classes=classes)  # classes: a plain checkpoint's
    family = str(loaded.cfg.model.family)
    source = Path(os.path.realpath(loaded.source))
    out = Path(output) if output else default_output(loaded.source, fmt)
    failed = failed_path(out, fmt)
    # invariant 2 (peftseg.io.output_guard): the format's suffix, never the checkpoint, a run's own
    # file, a link or a device (as root, an atomic write over /dev/null replaced the device) ...
    inputs = [source, *(images or [])]
    output_file(out, ("." + FORMATS[fmt].rsplit(".", 1)[-1],), inputs=inputs, what="output=")
    check_targets([parity_path(out), failed, parity_path(failed)], inputs, what="output=")
    # ... and never another output: what is there already is replaced only when it is this command's
    # own earlier export of the same checkpoint (same file, same bytes) to the same format
    owner = {"format": fmt, "checkpoint": str(source), "checkpoint_sha256": _sha256(source)}
    earlier = [p for p in (out, failed) if replaceable(p, parity_path(p), owner, what="output=")]
    refuse_nonfinite_weights(loaded.model, loaded.source)  # invariant 1: before peft's merge sees NaN
    model = fold_tuner_layers(loaded.model.to("cpu").eval())
    size = int(loaded.cfg.model.image_size)
    (trace_image,) = example_images(size, 1, seed=1234)
    adapter = tracing_adapter(model, trace_image)
    if images:
        parity_images = given_images(images, size, model.input_format)
        described = f"the {len(parity_images)} images of images= (resized to {size} x {size} px)"
    else:
        parity_images, described = example_images(size, PARITY_IMAGES, seed=0), ""
    stage(f"running PyTorch on {len(parity_images)} parity images")
    with torch.no_grad():
        names = _output_names(adapter, adapter(trace_image))
    refs = reference_outputs(adapter, names, parity_images,
                             f"{loaded.cfg.model.name} + {loaded.cfg.method.name} from {loaded.source}", described)
    stage({"onnx": "exporting the model and writing it as ONNX",
           "pt2": "exporting the model with torch.export and writing it as an ExportedProgram",
           "torchscript": "tracing the model and writing it as TorchScript (deprecated by torch)"}[fmt])
    start = time.perf_counter()
    payload, how = _serialise(adapter, trace_image, fmt, family, names)
    seconds = time.perf_counter() - start
    if fmt == "onnx" and not payload:
        raise UserError(f"the ONNX exporter produced an empty graph for family {family!r}; nothing was written.")
    runtime = {"onnx": "onnxruntime", "pt2": "torch.export.load", "torchscript": "torch.jit.load"}[fmt]
    stage(f"parity check: the file in {runtime} vs PyTorch on "
          f"{len(parity_images)} images")
    run = _runner(payload, fmt)  # loads before anything is written: a file its runtime rejects is never left
    parity = check_parity(refs, run, parity_images)
    ok = parity["within_tolerance"]
    path = out if ok else failed
    record = {
        "status": "ok" if ok else "failed", **owner, "file": str(path), "checkpoint_kind": loaded.kind,
        "model": loaded.cfg.model.name, "family": family, "method": loaded.cfg.method.name,
        "class_names": loaded.class_names, "export_seconds": round(seconds, 3), "opset": None, "onnx_exporter": None, **how,
        "deprecated": DEPRECATED.get(fmt),
        "input": {"name": "image", "shape": [3, size, size], "dtype": "float32",
                  "values": f"0..255, {model.input_format} channel order"},
        "outputs": names,
        "parity_images": [str(p) for p in images[:MAX_GIVEN_IMAGES]] if images else "synthetic: seeded coloured discs over noise",
        **parity,
    }
    with write_errors(path):
        write_atomic_with(path, lambda f: f.write(payload))
        write_json(parity_path(path), record)
        # invariant 1: a failed export never leaves a file that looks deployable, not even this
        # checkpoint's earlier one at `out`; a pass clears an earlier failure of the same export
        stale = [p for p in earlier if p != path]
        for p in stale:
            p.unlink(missing_ok=True)
            parity_path(p).unlink(missing_ok=True)
    return Exported(path=path, parity=record, family=family, intended=out, replaced=path in earlier,
                    removed=stale)
