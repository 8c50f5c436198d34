"""`peftseg export`: a trained model as an ONNX or TorchScript file, its parity with PyTorch checked."""

from __future__ import annotations

from peftseg.cli.common import console, err_console, print_text, split_args, wants_help

EXPORT_HELP = """\
usage: peftseg export checkpoint=<run dir, model_* file or merged file> format=onnx|torchscript [output=<file>]
       (a plain detectron2 checkpoint also needs model=<preset> classes=[a,b])

Writes the model as one file whose graph maps an image tensor (float32, 3 x S x S with S the
model's image_size, values 0..255 in the model's channel order) to boxes, classes, masks and
scores. LoRA-family updates are folded into the weights (peft's merge); adapters and side
paths are exported as part of the graph. Default output: <checkpoint name>.onnx or
<checkpoint name>.torchscript.pt beside the checkpoint.

The written file is then run by its runtime (onnxruntime / torch.jit.load) on {n} images next
to PyTorch; the max abs differences of scores, boxes and mask probabilities are printed and
saved in <file>.parity.json. Exit status 1 when they exceed the tolerance, counted in float32
roundings of the size compared ({tol}).
"""


def main(argv: list[str]) -> int:
    from peftseg.checkpoint import export as ex

    if wants_help(argv):
        print_text(EXPORT_HELP.format(n=ex.PARITY_IMAGES, tol=", ".join(f"{k} {n} ulps" + (" of the image side" if k == "boxes" else "") for k, n in ex.ULPS.items())))
        return 0
    from peftseg.report.tables import fmt_bytes

    from peftseg.cli.predict import _classes

    options, overrides, _ = split_args(argv, "export", ("checkpoint", "format", "output", "classes"),
                                       required=("checkpoint", "format"),
                                       example="checkpoint=outputs/<date>/<time> format=onnx")
    result = ex.export_checkpoint(options["checkpoint"], options["format"], options.get("output"), overrides,
                                  classes=_classes(options.get("classes")))
    p = result.parity
    console.print(f"exported {p['model']} + {p['method']} ({p['family']}) to {result.path} "
                  f"({fmt_bytes(result.path.stat().st_size)}) in {p['export_seconds']:.1f} s", highlight=False)
    diffs = p["max_abs_diff"]
    if p["same_detection_count"]:
        console.print(f"parity on {len(p['images'])} images, max abs diff vs PyTorch: "
                      + ", ".join(f"{k} {diffs[k]:.2e}" for k in ex.ULPS)
                      + f"; classes {'equal' if p['classes_equal'] else 'DIFFER'}", highlight=False)
    else:
        counts = ", ".join(f"{i['detections_pytorch']} vs {i['detections_exported']}" for i in p["images"])
        console.print(f"parity: the exported file finds other numbers of detections than PyTorch ({counts})",
                      highlight=False)
    console.print(f"record: {result.parity_path}", highlight=False)
    if not p["within_tolerance"]:
        err_console.print(f"[bold red]error:[/] the exported file does not match PyTorch within the tolerance "
                          f"({p['tolerance']}); see {result.parity_path} — do not deploy it as is.", highlight=False)
        return 1
    return 0
