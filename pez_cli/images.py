"""Images in and out: files, folders and path lists on stdin, decoding, and PNGs with prompts."""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from pez_cli.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Transparent pixels are shown on white, as image viewers and browsers do.
BACKGROUND = (255, 255, 255)


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def folder_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The images in a folder, sorted by path; hidden files and folders are skipped."""
    found: list[Path] = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(Path(root) / f for f in files if is_image_name(Path(f)))
    else:
        found = [p for p in folder.iterdir() if p.is_file() and is_image_name(p)]
    return sorted(found)


def collect_paths(
    inputs: Sequence[str], stdin: TextIO | None = None, recursive: bool = False, missing_ok: bool = False
) -> list[Path]:
    """Expand files, folders and '-' (paths on stdin, one per line) into image paths.

    missing_ok keeps paths that do not exist (batch jobs turn them into error rows)."""
    paths: list[Path] = []
    for item in _expand_stdin(inputs, stdin):
        path = Path(item).expanduser()
        if path.is_dir():
            images = folder_images(path, recursive)
            if not images:
                kinds = ", ".join(IMAGE_SUFFIXES)
                raise InputError(f"folder {item} has no images ({kinds})")
            paths.extend(images)
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise InputError(f"not a file or folder: {item}")
        elif missing_ok:
            paths.append(path)
        else:
            raise InputError(f"no such file or folder: {item}")
    if not paths:
        raise InputError("no images given")
    return paths


def _expand_stdin(inputs: Sequence[str], stdin: TextIO | None) -> Iterable[str]:
    read_stdin = False
    for item in inputs:
        if item == "-":
            if read_stdin:
                raise InputError("'-' (read paths from stdin) may be given only once")
            read_stdin = True
            if stdin is None:
                raise InputError("'-' was given but there is no stdin to read paths from")
            for line in stdin:
                line = line.strip()
                if line:
                    yield line
        else:
            yield item


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: EXIF rotation applied, alpha over white, 16-bit scaled."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: map 0..65535 onto 0..255 instead of clipping at 255.
        extrema = image.getextrema()
        high = extrema[1] if isinstance(extrema, tuple) else 255
        scale = 1 / 257 if (mode.startswith("I;16") or high > 255) else 1.0
        image = image.convert("I").point(lambda v: v * scale).convert("L")
        mode = "L"
    if mode == "F":
        high = image.getextrema()[1]
        scale = 255.0 if high <= 1.0 else 1.0
        image = image.point(lambda v: v * scale).convert("L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB") if mode != "RGB" else image


def load_image(path: Path | str) -> Image.Image:
    """Open, fully decode and normalise an image; problems become an InputError naming it."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise InputError(f"is a folder, not an image: {path}") from None
    except UnidentifiedImageError:
        raise InputError(f"not an image (or a format Pillow cannot read): {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"image is too large to decode safely: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt or unreadable"
        raise InputError(f"cannot read image {path}: {reason} ({e})") from None


def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    return [load_image(p) for p in paths]


def png_bytes(image: Image.Image, parameters: str, details: dict[str, Any]) -> bytes:
    """A PNG of `image` carrying the prompt the way Stable Diffusion UIs read it back (text key
    `parameters`) and pez's own details as JSON (text key `pez`)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("pez", json.dumps(details, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
