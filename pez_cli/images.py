"""Images in and out: files, folders and path lists on stdin, decoding, and PNGs with prompts."""

from __future__ import annotations

import io
import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TextIO

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from pez_cli.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Transparent pixels are shown on white, as image viewers and browsers do.
BACKGROUND = (255, 255, 255)
# Images wider than this many times their height (or the reverse) are refused: CLIP sees a
# centre square, and resizing a 1 x 6,000,000 strip's short side to 224 px needs terabytes.
MAX_ASPECT = 50


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def folder_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The regular image files in a folder, sorted by path; hidden files and folders, and
    anything that is not a regular file (a FIFO named x.png would block), are skipped."""
    found: list[Path] = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(Path(root) / f for f in files if is_image_name(Path(f)))
    else:
        found = [p for p in folder.iterdir() if is_image_name(p)]
    return sorted(p for p in found if os.path.isfile(p))


def collect_paths(
    inputs: Sequence[str], stdin: TextIO | None = None, recursive: bool = False, missing_ok: bool = False,
    null: bool = False,
) -> list[Path]:
    """Expand files, folders and '-' (paths on stdin, one per line, or NUL-separated with
    null=True, as `find -print0` writes them) into image paths.

    missing_ok keeps paths that do not exist (batch jobs turn them into error rows)."""
    return list(iter_paths(inputs, stdin, recursive, missing_ok, null))


def iter_paths(
    inputs: Sequence[str], stdin: TextIO | None = None, recursive: bool = False, missing_ok: bool = False,
    null: bool = False,
) -> Iterator[Path]:
    """collect_paths as it goes: stdin is read a block at a time, so a listing of millions of
    paths is never held whole. The first path is looked for at once (an InputError when there
    is none); later inputs are checked as they are reached."""
    found = _iter_paths(inputs, stdin, recursive, missing_ok, null)
    first = next(found, None)
    if first is None:
        raise InputError("no images given")
    return itertools.chain([first], found)


def _iter_paths(inputs: Sequence[str], stdin: TextIO | None, recursive: bool, missing_ok: bool,
                null: bool) -> Iterator[Path]:
    for item in _expand_stdin(inputs, stdin, null):
        path = Path(item).expanduser()
        if path.is_dir():
            images = folder_images(path, recursive)
            if not images:
                kinds = ", ".join(IMAGE_SUFFIXES)
                raise InputError(f"folder {item} has no images ({kinds})")
            yield from images
        elif path.is_file():
            yield path
        elif path.exists():
            raise InputError(f"not a regular file or folder: {item}")
        elif missing_ok:
            yield path
        else:
            raise InputError(f"no such file or folder: {item}")


def _expand_stdin(inputs: Sequence[str], stdin: TextIO | None, null: bool) -> Iterable[str]:
    read_stdin = False
    for item in inputs:
        if item == "-":
            if read_stdin:
                raise InputError("'-' (read paths from stdin) may be given only once")
            read_stdin = True
            if stdin is None:
                raise InputError("'-' was given but there is no stdin to read paths from")
            yield from stdin_paths(stdin, null)
        else:
            yield item


# Bytes of stdin read at a time when it lists paths.
STDIN_BLOCK = 1 << 20


def stdin_paths(stdin: TextIO, null: bool = False) -> Iterator[str]:
    """Paths listed on stdin, exactly as named, as they are read: one per line (a CRLF ending
    is removed, other spaces kept) or NUL-separated; bytes that are not UTF-8 are kept the way
    os.fsdecode keeps them, so the file opens."""
    buffer = getattr(stdin, "buffer", None)
    if buffer is not None:
        read = buffer.read
    else:
        def read(n: int) -> bytes:
            return stdin.read(n).encode("utf-8", "surrogateescape")
    separator = b"\0" if null else b"\n"
    tail = b""
    while True:
        block = read(STDIN_BLOCK)
        if not block:
            break
        if not null and b"\0" in block:  # no path holds a NUL byte: this is `find -print0` output read as lines
            raise InputError("the paths on stdin are separated by NUL bytes (find -print0); add -0 / --null to read them")
        *names, tail = (tail + block).split(separator)
        for raw in names:
            if name := _stdin_name(raw, null):
                yield name
    if name := _stdin_name(tail, null):
        yield name


def _stdin_name(raw: bytes, null: bool) -> str:
    return os.fsdecode(raw if null or not raw.endswith(b"\r") else raw[:-1])


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: EXIF rotation applied, alpha over white, 16-bit scaled."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale, either byte order: map 0..65535 onto 0..255 instead of clipping.
        import numpy as np

        values = np.asarray(image).astype(np.float64)
        scale = 1 / 257 if (mode.startswith("I;16") or values.max(initial=0) > 255) else 1.0
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")
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


def load_image(path: Path | str, data: bytes | None = None) -> Image.Image:
    """Open, fully decode and normalise an image (from `data`, its bytes already read, when
    given); problems become an InputError naming it."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path) as im:
                width, height = im.size
                if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
                    raise InputError(f"image {path} is {width} x {height} pixels: more than {MAX_ASPECT} times "
                                     "wider than high (or higher than wide)")
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
