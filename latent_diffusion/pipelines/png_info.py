"""Generation parameters in PNG files, in the AUTOMATIC1111 ``parameters`` text-chunk format.

The format other tools read (A1111, ComfyUI importers, civitai, image browsers)::

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, Model hash: 0123456789, Model: shapes

The prompt may span several lines; values containing commas or quotes are written JSON-quoted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
# No tool writes parameters this long; the bound keeps a crafted chunk from asking for gigabytes
# (Pillow bounds its text chunks alike).
MAX_TEXT_BYTES = 2**20
_NEGATIVE_PREFIX = "Negative prompt:"
# "Key: value" pairs of the last line; a value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/+.()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _format_value(value: Any) -> str:
    text = str(value)
    if any(ch in text for ch in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_parameters(prompt: str, negative_prompt: str, settings: Mapping[str, Any]) -> str:
    """Render prompt, negative prompt and settings (in order) as an A1111 parameters text."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{_NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_format_value(value)}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of :func:`format_parameters`: (prompt, negative prompt, settings as strings)."""
    *text_lines, last = text.strip("\n").split("\n")
    pairs = _PAIR.findall(last)
    if len(pairs) < 3:  # Not a settings line (A1111 requires a few pairs): it is prompt text.
        text_lines.append(last)
        pairs = []
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in text_lines:
        if line.startswith(_NEGATIVE_PREFIX):
            target = negative_lines
            line = line[len(_NEGATIVE_PREFIX):].lstrip()
        target.append(line)
    settings = {}
    for key, value in pairs:
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = json.loads(value)
        settings[key.strip()] = value
    return "\n".join(prompt_lines), "\n".join(negative_lines), settings


def model_hash(path: str | os.PathLike) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> Path:
    """Write a PNG with a ``parameters`` text chunk; atomically, so no half-written file remains."""
    from latent_diffusion.checkpoints.io import atomic_write

    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    with atomic_write(path) as handle:
        image.save(handle, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: str | os.PathLike) -> str | None:
    """The ``parameters`` text of a PNG, or None when it has none.

    Only the PNG's chunks are walked; its pixels are never decoded, so a huge image (a decompression
    bomb) costs nothing.
    """
    try:
        with open(path, "rb") as handle:
            if handle.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
                return _parameters_of_other_image(path)
            return _find_parameters(handle, path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image file: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not an image") from None


def _find_parameters(handle: BinaryIO, path: str | os.PathLike) -> str | None:
    while True:
        header = handle.read(8)
        if len(header) < 8:
            raise ValueError(f"{path} is not a readable image (the PNG ends without its IEND chunk)")
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            return None
        if kind in _TEXT_CHUNKS and length <= MAX_TEXT_BYTES:
            text = _parameters_text(kind, handle.read(length), path)
            if text is not None:
                return text
            length = 0
        handle.seek(length + 4, os.SEEK_CUR)  # the data, then the CRC


def _parameters_text(kind: bytes, data: bytes, path: str | os.PathLike) -> str | None:
    """The text of a tEXt / zTXt / iTXt chunk whose keyword is ``parameters`` (None for other keywords)."""
    keyword, _, rest = data.partition(b"\0")
    if keyword != PARAMETERS_KEY.encode():
        return None
    if kind == b"tEXt":
        return rest.decode("latin-1")
    if kind == b"zTXt":
        return _inflate(rest[1:], path).decode("latin-1")
    compressed, rest = rest[:1] == b"\1", rest[2:]
    _language, _, rest = rest.partition(b"\0")
    _translated_keyword, _, rest = rest.partition(b"\0")
    return (_inflate(rest, path) if compressed else rest).decode("utf-8", errors="replace")


def _inflate(data: bytes, path: str | os.PathLike) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_TEXT_BYTES)
    except zlib.error as error:
        raise ValueError(f"{path}: corrupt compressed parameters text ({error})") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"{path}: the parameters text is longer than {MAX_TEXT_BYTES} bytes")
    return text


def _parameters_of_other_image(path: str | os.PathLike) -> str | None:
    """Images other than PNG: what Pillow reads from the header (the pixels stay undecoded)."""
    try:
        with Image.open(path) as image:
            return image.info.get(PARAMETERS_KEY)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path} is not a readable image ({error})") from None
