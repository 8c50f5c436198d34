"""`peftseg export`: a trained model as an ONNX, PyTorch 2 (.pt2) or TorchScript file, its parity with
PyTorch checked."""

from __future__ import annotations

from peftseg.cli.common import Stages, console, err_console, print_text, split_args, wants_help

EXPORT_HELP = """\
usage: peftseg export checkpoint=<run dir, model_* file or merged file> format=onnx|pt2|torchscript [output=<file>]
                      [images=<image, folder or glob>]
       (a plain detectron2 checkpoint also needs model=<preset> classes=[a,b])

Writes the model as one file whose graph maps an image tensor (float32, 3 x S x S with S the
model's image_size, values 0..255 in the model's channel order) to boxes, classes, masks and
scores. LoRA-family updates are folded into the weights (peft's merge); adapters and side
paths are exported as part of the graph. Default output: the checkpoint's name with .onnx, .pt2
or .torchscript.pt for its last suffix, beside it (v1.2.safetensors -> v1.2.onnx); output= must
end in .onnx (format=onnx), .pt2 (format=pt2) or .pt (format=torchscript). An existing file is
replaced only when it is this command's own earlier export of the same checkpoint to the same format.

format=pt2 writes torch.export's ExportedProgram (load it with torch.export.load(f).module()).
A .pt2 file holds pickled tensors that torch.export.load unpickles with code execution allowed:
load only files you made or trust. format=torchscript is deprecated by torch (torch.jit warns to
switch to torch.export): it stays while torch ships TorchScript; prefer format=pt2.

A model with NaN or infinite weights is refused (exit 2), and so is one that finds fewer than
{min} detections on the parity images: there would be nothing to compare. Those are {n} seeded
synthetic images (coloured discs over noise), or the first {max_given} of images=, resized to S x S.
The file is run by its runtime (onnxruntime / torch.export.load / torch.jit.load) on them next to PyTorch; the max abs
differences of scores, boxes and mask probabilities are printed and saved in <file>.parity.json.
When the detections differ in number or class, or a difference exceeds the tolerance, the file
is kept only as <name>.FAILED-parity<suffix> and the exit status is 1. The tolerance is counted
in float32 roundings of the size compared: {tol}; of binary masks (the query families'), at most
a fraction {flip:g} of the pixels may differ (those whose logit is within rounding of 0).
"""


def say(text: str) -> None:
    console.print(text, highlight=False, markup=False, soft_wrap=True)  # no markup: paths may hold [ ]


def main(argv: list[str]) -> int:
    from peftseg.checkpoint import export as ex

    if wants_help(argv):
        print_text(EXPORT_HELP.format(n=ex.PARITY_IMAGES, min=ex.MIN_COMPARED, max_given=ex.MAX_GIVEN_IMAGES, flip=ex.BINARY_MASK_PIXELS, tol=", ".join(f"{k} {n} ulps" + (" of the image side" if k == "boxes" else "") for k, n in ex.ULPS.items())))
        return 0
    from rich.markup import escape

    from peftseg.report.tables import fmt_bytes

    from peftseg.cli.predict import _classes, find_images

    options, overrides, _ = split_args(argv, "export", ("checkpoint", "format", "output", "classes", "images"),
                                       required=("checkpoint", "format"),
                                       example="checkpoint=outputs/<date>/<time> format=onnx")
    images = find_images(options["images"], "images", console) if options.get("images") else None
    with Stages(err_console, "export") as stage:  # minutes for a large model: each step said as it starts
        result = ex.export_checkpoint(options["checkpoint"], options["format"], options.get("output"), overrides,
                                      classes=_classes(options.get("classes")), images=images, stage=stage)
    p = result.parity
    if result.replaced:
        say(f"replacing this command's own earlier {p['format']} export of {p['checkpoint']}: {result.path}")
    for stale in result.removed:
        say(f"removed this checkpoint's earlier failed {p['format']} export {stale} and its record: superseded by a "
            "verified one" if result.ok else
            f"removed this checkpoint's earlier {p['format']} export {stale} and its record: the same export fails "
            "parity now, so that file's verification does not hold here either")
    say(f"exported {p['model']} + {p['method']} ({p['family']}) to {result.path} "
        f"({fmt_bytes(result.path.stat().st_size)}) in {p['export_seconds']:.1f} s")
    diffs = p["max_abs_diff"]
    if p["same_detection_count"]:
        say(f"parity on {len(p['images'])} images ({p['compared_detections']} detections compared), "
            "max abs diff vs PyTorch: "
            + ", ".join(f"{k} {'NaN/inf' if diffs[k] is None else format(diffs[k], '.2e')}" for k in ex.ULPS
                        if not (k == "masks" and p["binary_masks"]))
            + (f"; binary masks: {p['mask_pixels']['differing']} of {p['mask_pixels']['compared']} pixels differ"
               if p["binary_masks"] else "")
            + f"; classes {'equal' if p['classes_equal'] else 'DIFFER'}")
    if p.get("deprecated"):
        say(f"note: format={p['format']} is deprecated: {p['deprecated']}")
    say(f"record: {result.parity_path}")
    if not result.ok:
        text = (f"the exported file does not match PyTorch: {'; '.join(p['problems'])} (tolerance "
                + ", ".join(f"{k} {v:.3g}" for k, v in p["tolerance"].items())
                + f"). It was written as {result.path}, not as {result.intended}, so that it is not deployed by "
                "mistake; keep it to inspect the graph, and serve this model with PyTorch (`peftseg predict`) meanwhile.")
        err_console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True, highlight=False)
        return 1
    return 0
