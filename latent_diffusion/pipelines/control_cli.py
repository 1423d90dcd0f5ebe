"""The ControlNet options of ``ldm txt2img``, ``img2img`` and ``inpaint`` (importable without PyTorch).

``--control FILE[:IMAGE[:WEIGHT]]`` adds a unit (repeatable); each ``--control-*`` setting is given
once for every unit or once per unit, in order. Everything is checked before the model loads.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Option name -> (ControlUnit setting, how to read the text).
_PER_UNIT = {
    "control_preprocess": ("module", str), "control_start": ("guidance_start", float),
    "control_end": ("guidance_end", float), "control_mode": ("control_mode", str),
    "control_resize": ("resize_mode", str), "control_res": ("processor_res", float),
    "control_threshold_a": ("threshold_a", float), "control_threshold_b": ("threshold_b", float),
}


def add_control_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "ControlNet", "steer the composition with control images (each --control-* option: once for all units, "
        "or once per --control, in order)")
    group.add_argument("--control", action="append", default=None, metavar="FILE[:IMAGE[:WEIGHT]]",
                       help="a ControlNet (.safetensors/.pth file or diffusers folder), its control image and weight "
                            "(default 1); without an image img2img and inpaint use their input (FILE::WEIGHT)")
    group.add_argument("--control-preprocess", action="append", metavar="NAME",
                       help="make the control map from the image: canny, threshold, scribble_xdog, invert, "
                            "tile_resample, shuffle, inpaint, none (default: the image is the map)")
    group.add_argument("--control-start", action="append", metavar="FRACTION",
                       help="first fraction of the steps the ControlNet acts on (default 0)")
    group.add_argument("--control-end", action="append", metavar="FRACTION",
                       help="fraction of the steps after which it stops (default 1)")
    group.add_argument("--control-mode", action="append", metavar="MODE",
                       help="balanced, prompt (my prompt is more important) or control (ControlNet is more important)")
    group.add_argument("--control-resize", action="append", metavar="MODE",
                       help="fit the map to the image size: resize (stretch), crop (cover, the default) or fill")
    group.add_argument("--control-res", action="append", metavar="PX",
                       help="preprocessor resolution (the image's short side; default 512)")
    group.add_argument("--control-threshold-a", action="append", metavar="VALUE",
                       help="the preprocessor's first setting (canny: low threshold 100; threshold: level 127)")
    group.add_argument("--control-threshold-b", action="append", metavar="VALUE",
                       help="the preprocessor's second setting (canny: high threshold 200)")
    group.add_argument("--control-pixel-perfect", action="store_true",
                       help="run the preprocessors at the output's resolution (A1111's pixel perfect)")


@dataclass(frozen=True)
class ControlRequest:
    """One ``--control`` with its settings, checked; the ControlNet is loaded beside the model."""

    path: Path
    image: Any  # PIL image or None
    settings: dict[str, Any]


def _parse_spec(text: str) -> tuple[Path, str | None, Any]:
    file, _, rest = text.partition(":")
    image, _, weight = rest.partition(":")
    if weight:
        try:
            return Path(file), image or None, float(weight)
        except ValueError:
            raise ValueError(f"--control {text}: the weight must be a number, got {weight!r}") from None
    return Path(file), image or None, 1.0


def _per_unit_values(args: argparse.Namespace, option: str, count: int, read) -> list[Any]:
    values = getattr(args, option) or []
    flag = "--" + option.replace("_", "-")
    if values and len(values) not in (1, count):
        raise ValueError(f"{flag} given {len(values)} times for {count} --control units: give it once for all, "
                         "or once per unit")
    parsed = []
    for value in values:
        try:
            parsed.append(read(value))
        except ValueError:
            raise ValueError(f"{flag} {value}: not a number") from None
    return parsed * count if len(parsed) == 1 else parsed or [None] * count


def check_control_args(args: argparse.Namespace) -> list[ControlRequest]:
    """The ``--control`` units with their images read and settings checked (before any model loads)."""
    from latent_diffusion.pipelines.control import unit_settings
    from latent_diffusion.pipelines.images import load_image

    specs = args.control or []
    stray = [o for o in _PER_UNIT if getattr(args, o)] + (["control_pixel_perfect"] if args.control_pixel_perfect else [])
    if stray and not specs:
        raise ValueError(f"--{stray[0].replace('_', '-')} needs --control FILE[:IMAGE[:WEIGHT]]")
    columns = {setting: _per_unit_values(args, option, len(specs), read) for option, (setting, read) in _PER_UNIT.items()}
    requests = []
    for index, text in enumerate(specs):
        path, image, weight = _parse_spec(text)
        if not path.exists():
            raise FileNotFoundError(f"--control {text}: ControlNet not found: {path}")
        given = {name: column[index] for name, column in columns.items() if column[index] is not None}
        settings = unit_settings(weight=weight, pixel_perfect=args.control_pixel_perfect, **given)
        requests.append(ControlRequest(path, load_image(image, what="control image") if image else None, settings))
    return requests


def control_units(requests: list[ControlRequest], pipe) -> list:
    """The units (ControlUnit), their ControlNets loaded to run beside ``pipe``'s model."""
    from latent_diffusion.pipelines.control import ControlUnit, load_controlnet_for

    return [ControlUnit(load_controlnet_for(pipe, r.path), r.image, **r.settings) for r in requests]
