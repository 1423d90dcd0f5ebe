"""``<lora:name:weight>`` in prompts, as A1111 reads it.

``<lora:name>`` is weight 1; ``<lora:name:w>`` sets both the text encoders' and the UNet's weight;
``<lora:name:w_te:w_unet>`` sets them apart (A1111's order: the text encoder's first), as do the
named forms ``te=w`` and ``unet=w``. ``<lyco:...>`` (the LyCORIS extension's spelling) is the same.
The tags are taken out of the prompt before it is encoded; the text around them stays as written.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` of a prompt."""

    name: str
    text: float = 1.0
    unet: float = 1.0
    written: str = ""  # the tag as the prompt has it, for messages


def _number(value: str, tag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"prompt tag {tag}: the weight {value.strip()!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"prompt tag {tag}: the weight must be a finite number, got {value.strip()!r}")
    return number


def _read_tag(body: str, written: str) -> LoraTag:
    name, *arguments = body.split(":")
    if not name.strip():
        raise ValueError(f"prompt tag {written}: no LoRA name (write <lora:NAME:WEIGHT>)")
    positional, named = [], {}
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if equals:
            if key.strip() not in ("te", "unet"):
                raise ValueError(f"prompt tag {written}: unknown setting {key.strip()!r} (te= and unet= are known)")
            named[key.strip()] = _number(value, written)
        else:
            positional.append(_number(argument, written))
    if len(positional) > 2:
        raise ValueError(f"prompt tag {written}: at most two weights (text encoder, UNet), got {len(positional)}")
    text = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else text)
    return LoraTag(name.strip(), text, unet, written)


def lora_tags(prompt: str) -> list[LoraTag]:
    """The ``<lora:...>`` tags of a prompt, in order; a malformed one is a ValueError naming it."""
    return [_read_tag(match.group(1), match.group(0)) for match in _TAG.finditer(prompt)]


def without_lora_tags(prompt: str) -> str:
    """The prompt as encoded: its ``<lora:...>`` tags taken out."""
    return _TAG.sub("", prompt)
