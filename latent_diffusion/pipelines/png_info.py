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
from pathlib import Path
from typing import Any, Mapping

from PIL import Image, PngImagePlugin

from latent_diffusion.checkpoints.io import atomic_write

PARAMETERS_KEY = "parameters"
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
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    with atomic_write(path) as handle:
        image.save(handle, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: str | os.PathLike) -> str | None:
    """The ``parameters`` text of a PNG, or None when it has none."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.info.get(PARAMETERS_KEY) or getattr(image, "text", {}).get(PARAMETERS_KEY)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image file: {path}") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path} is not a readable image ({error})") from None
