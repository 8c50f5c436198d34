"""`peftseg predict`: masks on new images, as overlay PNGs and COCO results JSON.

    peftseg predict checkpoint=<run dir or .pth> input=<image, folder or glob> output=<dir>
                    [score_thresh=0.5] [max_size=<px>] [classes=[a,b]] [model=… model.weights=…]
    peftseg predict checkpoint=[runA,runB,…] input=… output=<dir>

Several run checkpoints of one base model (task variants) share one copy of the base: it is
built once and each variant's method switched in (peft's set_adapter for the LoRA family),
and predicts as its checkpoint alone does (its own class names, the same output checks);
each variant's outputs go to <output>/<run dir name>/ (with as many parent folders in the
name as it takes to be unique), and the tensor memory of the shared base + each variant is
printed next to what separate models would take.

Each readable image gets `<output>/<stem>.png` at the image's own size, drawn by detectron2's
Visualizer (class, score, mask, box; labels white on a dark box), and every detection goes
into `<output>/predictions.json` in the COCO results format (RLE masks, xywh boxes) that
pycocotools' `loadRes` reads. The files of a folder that are not images (by their suffix) are
named in one line and skipped; an image that cannot be decoded is listed and skipped; the
others still run. Loading and the progress over the images are shown on stderr.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from peftseg.cli.common import ItemProgress, Stages, console as default_console, err_console, print_text
from peftseg.cli.common import split_args, wants_help
from peftseg.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
PREDICTIONS = "predictions.json"
RECORD = "predict.json"  # beside predictions.json: which checkpoint and images made them
OPTIONS = ("checkpoint", "input", "output", "score_thresh", "max_size", "classes")
# An image this many times larger than the size the model was trained at loses small
# objects when shrunk to it (mask AP 12.8 -> 1.7 on shapes at 4x): worth a warning.
OVERSIZE_FACTOR = 2.0


@dataclass
class PredictOutcome:
    written: list[Path] = field(default_factory=list)  # overlay PNGs
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (image, why)
    detections: int = 0
    predictions: Path | None = None


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Own options (OPTIONS) and Hydra-style config overrides (everything else)."""
    options, overrides, _ = split_args(argv, "predict", OPTIONS, required=("input", "output"),
                                       example="checkpoint=outputs/<run> input=images/ output=predictions/")
    return options, overrides


def _number(options: dict, key: str, default, kind, low, high):
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise UserError(f"{key}={raw!r} is not a number; give e.g. {key}={default or 1333}.") from None
    if not low <= value <= high:
        raise UserError(f"{key}={raw} is out of range; it must lie in [{low}, {high}].")
    return value


def _classes(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    names = [n.strip() for n in raw.strip().strip("[]").split(",") if n.strip()]
    if not names:
        raise UserError("classes= is empty; list the model's classes in order, e.g. classes=[cat,dog].")
    return names


def find_images(spec: str, key: str = "input", console: Console | None = None) -> list[Path]:
    """An image file, every image file of a folder, or the matches of a glob pattern (`key`: the
    option that gave it, for the message). The other files of a folder are skipped, named in
    one line on `console` (hidden files such as .DS_Store silently)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    others: list[Path] = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        found = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    else:
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    suffixes = "/".join(sorted(IMAGE_SUFFIXES))
    if not found:
        held = f"; it holds {_names(others)}, none of them an image" if others else ""
        raise UserError(
            f"{key}={spec} names no image{held}: give an image file, a folder holding "
            f"{suffixes} files, or a quoted glob such as {key}='photos/*.jpg'."
        )
    if others and console is not None:
        console.print(f"skipped {_names(others)} in {spec}: not {'an image' if len(others) == 1 else 'images'} "
                      f"(by the suffix; images are {suffixes} files)", markup=False, highlight=False, soft_wrap=True)
    return found


def _names(paths: list[Path], shown: int = 5) -> str:
    """`a.txt`, `2 files (a.txt, b.json)`, `9 files (a.txt, b.json, c.csv, d.csv, e.csv and 4 more)`."""
    if len(paths) == 1:
        return paths[0].name
    listed = ", ".join(p.name for p in paths[:shown])
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f"{len(paths)} files ({listed}{more})"


def owner(checkpoint: Path | None, weights: str, images: list[Path]) -> dict:
    """What a predict output records of its making (RECORD), so that a rerun replaces only its own
    predictions: the checkpoint (or weights) and the images, by their resolved paths."""
    listed = "\n".join(sorted(str(Path(p).resolve()) for p in images))
    return {"checkpoint_path": str(Path(checkpoint).resolve()) if checkpoint else weights,
            "images_sha256": hashlib.sha256(listed.encode()).hexdigest(), "images": len(images)}


def check_output(output: Path, images: list[Path], sources: list[Path], input_folder: Path | None,
                 made_by: dict) -> dict[Path, str]:
    """Where one checkpoint's predictions may go (invariant 2, peftseg.io.output_guard): never over
    an input image or folder, a checkpoint, a run's own files, a link or the predictions of other
    inputs (`made_by`: owner()); one distinct overlay name per image (returned)."""
    from peftseg.io.output_guard import check_targets, distinct_names, output_dir, replaceable

    names = distinct_names(images, ".png")
    output_dir(output, inputs=[folder for folder in (input_folder,) if folder], what="output=")
    check_targets([output / name for name in names.values()] + [output / PREDICTIONS, output / RECORD],
                  [*images, *sources], what="output=")
    replaceable(output / PREDICTIONS, output / RECORD, made_by)
    return names


def predict(loaded, images: list[Path], output: Path, *, score_thresh: float = 0.5, max_size: int | None = None,
            console: Console | None = None, input_folder: Path | None = None,
            progress: Console | None = None) -> PredictOutcome:
    """Run `loaded.model` on `images` (from `input_folder`, when a folder was given); write
    overlays and predictions.json under `output`. Messages go to `console`, the progress over
    the images to `progress` (stderr by default)."""
    import numpy as np
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.data import transforms as T
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from PIL import Image

    from peftseg.data.images import read_image_checked
    from peftseg.build import resolve_device
    from peftseg.io.atomic import write_atomic_with, write_json

    console = console or default_console
    model, cfg = loaded.model, loaded.cfg
    device = resolve_device(cfg.train.device)
    model.to(device)
    image_size = int(cfg.model.image_size)
    # The same resize as evaluation (data/loaders.py); max_size=<px> runs the model at that long
    # side instead (short side scaled up to it, then capped), so it really raises the resolution.
    resize = T.ResizeShortestEdge(max_size, max_size=max_size) if max_size else T.ResizeShortestEdge(
        image_size, max_size=image_size)
    # Metadata under a name of its own: the Visualizer only needs the class names.
    meta_name = f"peftseg_predict_{'_'.join(loaded.class_names)}"[:200]
    if meta_name in MetadataCatalog.list():
        MetadataCatalog.remove(meta_name)
    metadata = MetadataCatalog.get(meta_name).set(thing_classes=list(loaded.class_names))

    made_by = owner(loaded.source, str(cfg.model.weights), images)
    names = check_output(output, images, [loaded.source] if loaded.source else [], input_folder, made_by)
    outcome = PredictOutcome()
    results: list[dict] = []
    warned_size = False
    with ItemProgress(progress or err_console, "predict", len(images)) as bar, torch.no_grad():
        for image_id, path in enumerate(images, start=1):
            bar.start(path.name)
            try:
                image = read_image_checked(path, model.input_format)  # training's checks (data/images.py)
            except ValueError as e:
                outcome.unreadable.append((path, str(e)))
                bar.advance()
                continue
            h, w = image.shape[:2]
            if not warned_size and max(h, w) > OVERSIZE_FACTOR * image_size and not max_size:
                warned_size = True
                console.print(
                    f"[yellow]warning:[/] {path.name} is {w}x{h} px but the model runs at "
                    f"model.image_size={image_size}; images are shrunk to that and small objects get lost. "
                    "Pass max_size=<px> (and train with a larger model.image_size) to keep more detail.",
                    highlight=False,
                )
            resized = resize.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            instances = model([{"image": tensor.to(device), "height": h, "width": w}])[0]["instances"].to("cpu")
            instances = instances[instances.scores >= score_thresh]
            rgb = image[:, :, ::-1] if model.input_format == "BGR" else image
            drawn = draw_overlay(rgb, instances, metadata)
            target = output / names[path]
            write_atomic_with(target, lambda f: Image.fromarray(drawn).save(f, format="PNG"))
            outcome.written.append(target)
            for det in instances_to_coco_json(instances, image_id):
                det["category_id"] += 1  # COCO ids start at 1; contiguous index + 1
                det["category_name"] = loaded.class_names[det["category_id"] - 1]
                det["file_name"] = str(path)
                det["height"], det["width"] = h, w
                results.append(det)
            bar.advance()
    if outcome.unreadable and not outcome.written:  # nothing predicted: not a success
        listed = "; ".join(f"{p}: {why}" for p, why in outcome.unreadable[:5])
        raise UserError(f"none of the {len(images)} input image(s) could be given to the model ({listed}). "
                        "Give 8-bit RGB/greyscale images of normal proportions (the checks training applies).")
    outcome.detections = len(results)
    outcome.predictions = write_json(output / PREDICTIONS, results)
    write_json(output / RECORD, made_by)  # a rerun of this same command may replace both
    return outcome


@functools.cache
def _visualizer():
    """detectron2's Visualizer, its labels white on their dark box: it draws them in the mask's
    colour, brightened, which on a dark image can be a blue that is hard to read on black."""
    from detectron2.utils.visualizer import Visualizer

    class ReadableLabels(Visualizer):
        def draw_text(self, text, position, *, color="w", **kwargs):
            return super().draw_text(text, position, color="white", **kwargs)

    return ReadableLabels


def draw_overlay(rgb, instances, metadata):
    """`instances` (class, score, mask, box) drawn over the RGB image, at the image's own size."""
    from detectron2.utils.visualizer import ColorMode

    return _visualizer()(rgb, metadata, scale=1.0, instance_mode=ColorMode.IMAGE).draw_instance_predictions(
        instances).get_image()


def main(argv: list[str], console: Console | None = None) -> int:
    if wants_help(argv):
        print_text(__doc__.strip())
        return 0
    from peftseg.checkpoint.load import load_model
    from peftseg.cli.many import checkpoint_list

    console = console or default_console
    options, overrides = parse_args(argv)
    score_thresh = _number(options, "score_thresh", 0.5, float, 0.0, 1.0)
    max_size = _number(options, "max_size", None, int, 32, 16384)
    images = find_images(options["input"], console=console)
    spec = Path(options["input"]).expanduser()
    input_folder = spec if spec.is_dir() else None
    output = Path(options["output"])
    classes = _classes(options.get("classes"))
    many = checkpoint_list(options.get("checkpoint"))
    if many is not None:
        return _predict_variants(many, overrides, classes, images, input_folder, output, score_thresh, max_size,
                                 console)
    with Stages(err_console, "predict") as stage:
        stage(f"loading {options.get('checkpoint') or 'the model'}")
        loaded = load_model(options.get("checkpoint"), overrides, classes=classes)
    _predict_one(loaded, images, output, input_folder, score_thresh, max_size, console)
    return 0


def _predict_one(loaded, images: list[Path], output: Path, input_folder: Path | None, score_thresh: float,
                 max_size: int | None, console: Console) -> PredictOutcome:
    """One loaded checkpoint's predictions into `output`, and what was done: the single
    checkpoint and each variant of checkpoint=[…] go through here alike."""
    from peftseg.io.output_guard import write_errors

    with write_errors(output):
        outcome = predict(loaded, images, output, score_thresh=score_thresh, max_size=max_size, console=console,
                          input_folder=input_folder)
    what = loaded.cfg.model.name + ("" if loaded.kind == "plain" else f" + {loaded.cfg.method.name}")
    console.print(
        f"predicted {len(outcome.written)} of {len(images)} images with {what} ({loaded.kind} checkpoint): "
        f"{outcome.detections} detections with score >= {score_thresh}; overlays and {PREDICTIONS} in {output}",
        highlight=False,
    )
    if outcome.unreadable:
        console.print(f"[yellow]skipped {len(outcome.unreadable)} unreadable image(s):[/]", highlight=False)
        for path, why in outcome.unreadable:
            console.print(f"  {path}: {why}", highlight=False, soft_wrap=True)
    return outcome


def _predict_variants(checkpoints: list[str], overrides: list[str], classes: list[str] | None, images: list[Path],
                      input_folder: Path | None, output: Path, score_thresh: float, max_size: int | None,
                      console: Console) -> int:
    """checkpoint=[a,b,…]: `peftseg predict` of each checkpoint, on one shared base (each variant
    switched in); outputs in output/<variant>/."""
    from peftseg.checkpoint.variants import load_variants
    from peftseg.cli.many import print_memory
    from peftseg.build import resolve_device
    from peftseg.io.output_guard import output_dir

    with Stages(err_console, "predict") as stage:
        stage(f"loading {len(checkpoints)} variants of one base")
        vset = load_variants(checkpoints, overrides, classes=classes)
    sources = [v.source for v in vset]
    # every folder checked before any variant predicts: a bad output= stops the command whole
    output_dir(output, inputs=[folder for folder in (input_folder,) if folder], what="output=")
    for v in vset:
        check_output(output / v.name, images, sources, input_folder, owner(v.source, "", images))
    vset.to(resolve_device(vset.variants[0].cfg.train.device))
    for v in vset:
        console.print(f"[bold]{v.name}[/] ({v.cfg.method.name})", highlight=False)
        _predict_one(vset.loaded(v), images, output / v.name, input_folder, score_thresh, max_size, console)
    print_memory(console, vset)
    return 0
