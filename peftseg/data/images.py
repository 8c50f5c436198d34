"""The one image reader (invariant 4): the checks every image passes before a model sees it,
whether it is a training/val image (data/validate.py checks every header before training),
an image given to `peftseg predict`, or one drawn by `peftseg visualize`.

Pixels are decoded by detectron2's `read_image` (EXIF orientation applied, converted to the
model's RGB/BGR) — the reader training's DatasetMapper uses — so this module only decides
which images it may be given: one whose conversion to 8-bit RGB would clip (16-bit, 32-bit
integer or float pixels: a 16-bit PNG becomes all white), one past PIL's decompression-bomb
limit, and degenerate sizes (a 1000x2 strip, resized to the model's short side, becomes a
huge and meaningless image) are refused with the reason; palette, CMYK, greyscale and alpha
convert faithfully.
"""

from __future__ import annotations

from dataclasses import dataclass

# PIL modes that convert to RGB faithfully (alpha is dropped: noted); anything else (16-bit,
# 32-bit integer or float pixels) would be clipped to 8 bits by the conversion detectron2 does
RGB_SAFE = {"1", "L", "P", "RGB", "YCbCr", "CMYK", "LAB", "HSV"}
ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
MIN_SIDE = 8  # px: below this a detector's stride-32 features have no cell
MAX_ASPECT = 20.0  # long side / short side; COCO's widest images are about 6:1
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS), stated here


@dataclass(frozen=True)
class Header:
    width: int  # after EXIF orientation, as the model sees it
    height: int
    mode: str
    orientation: int


def read_header(path: str) -> Header | str:
    """The image's header (no pixels decoded), or why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:  # a damaged EXIF block: detectron2 ignores it too
                orientation = 1
            w, h = im.size
    except Image.DecompressionBombError as e:
        return f"DecompressionBombError: {e}"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"{type(e).__name__}: {e}"
    if orientation in ROTATED:
        w, h = h, w  # detectron2's read_image applies the EXIF rotation
    return Header(w, h, im.mode, orientation)


def pixel_problem(header: Header) -> str | None:
    """Why an image with this header may not be given to a model (None: it may)."""
    w, h = header.width, header.height
    if header.mode not in RGB_SAFE and header.mode not in ALPHA:
        return (f"has pixel mode {header.mode!r} (e.g. 16-bit or float), which converting to 8-bit RGB would "
                "clip; convert it to 8-bit (scale the values to 0-255) and save it again")
    if w * h > MAX_PIXELS:
        return (f"is {w}x{h} = {w * h / 1e6:.0f} Mpx, past the decompression-bomb limit of "
                f"{MAX_PIXELS / 1e6:.0f} Mpx; downscale or tile it")
    if min(w, h) < MIN_SIDE or max(w, h) / max(min(w, h), 1) > MAX_ASPECT:
        return (f"is {w}x{h} px, a degenerate size (a side under {MIN_SIDE} px or sides more than "
                f"{MAX_ASPECT:g}:1); crop or pad it to a normal picture")
    return None


def read_image_checked(path: str, image_format: str):
    """The image's pixels (HxWx3 uint8, `image_format` RGB/BGR, EXIF applied); ValueError with
    the reason if it is unreadable or one a model must not be given."""
    from detectron2.data.detection_utils import read_image

    header = read_header(str(path))
    if isinstance(header, str):
        raise ValueError(f"not a readable image ({header})")
    problem = pixel_problem(header)
    if problem:
        raise ValueError(problem)
    try:
        return read_image(str(path), format=image_format)
    except Exception as e:  # PIL raises several types for truncated/foreign files
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from e
