"""A1111's ControlNet extension API: the ``controlnet`` block of ``alwayson_scripts`` on txt2img and
img2img, and ``/controlnet/model_list``, ``module_list``, ``detect``, ``version`` and ``settings``.

ControlNets are the files of the folder ``ldm serve --controlnet-dir`` names, listed as the extension
lists them (``name [hash]``); clients pick them by that title or by name, never by a path. Units are
read and checked (model name, images, settings) before the job queues; the ControlNets load on the
worker, beside the model the job runs on, and the last ones used are kept for the next request.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import Body, FastAPI, HTTPException
from PIL import Image

from latent_diffusion.pipelines.control import ControlUnit, load_controlnet_for, unit_settings
from latent_diffusion.pipelines.preprocessors import INPAINT, PREPROCESSORS, get_preprocessor, preprocess
from latent_diffusion.server.generate import BadRequest, ServerLimits, decode_image, encode_png

if TYPE_CHECKING:
    from latent_diffusion.pipelines.common import Pipeline
    from latent_diffusion.server.app import ServerState

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
API_VERSION = 2  # what the extension's /controlnet/version answers
MAX_UNITS = 3  # the extension's default unit count (/controlnet/settings)
# Unit fields (the extension's names and old aliases) -> ControlUnit settings.
_FIELDS = {"weight": "weight", "guidance_start": "guidance_start", "guidance_end": "guidance_end",
           "guidance": "guidance_end", "control_mode": "control_mode", "resize_mode": "resize_mode",
           "module": "module", "processor_res": "processor_res", "threshold_a": "threshold_a",
           "threshold_b": "threshold_b", "pixel_perfect": "pixel_perfect"}


@dataclass(frozen=True)
class ControlNetEntry:
    name: str
    path: Path
    hash: str

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"

    def matches(self, key: str) -> bool:
        key = key.strip()
        return key in (self.title, self.name, self.path.name)


class ControlNetLibrary:
    """The ControlNet folder's files, and the ControlNets loaded for the current model."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and not self.folder.is_dir():
            raise FileNotFoundError(f"ControlNet folder not found: {self.folder}")
        self._loaded: dict[tuple[Path, int], Any] = {}  # (path, id of the pipeline) -> LoadedControlNet
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()

    def entries(self) -> list[ControlNetEntry]:
        from latent_diffusion.checkpoints.controlnet import short_hash

        if self.folder is None:
            return []
        paths = sorted(p for p in self.folder.iterdir()
                       if (p.is_file() and p.suffix.lower() in CONTROLNET_SUFFIXES)
                       or (p.is_dir() and (p / "config.json").is_file()))
        entries = []
        for path in paths:
            stat = path.stat()
            key = (path, stat.st_size, stat.st_mtime_ns)
            with self._lock:
                if key not in self._hashes:
                    self._hashes[key] = short_hash(path)
                entries.append(ControlNetEntry(path.stem if path.is_file() else path.name, path, self._hashes[key]))
        return entries

    def find(self, key: Any) -> ControlNetEntry:
        if not isinstance(key, str) or not key.strip() or key.strip() == "None":
            raise BadRequest("a ControlNet unit needs a model: one of GET /controlnet/model_list")
        entries = self.entries()
        for entry in entries:
            if entry.matches(key):
                return entry
        raise BadRequest(f"unknown ControlNet model {key!r}; choose one of {[e.title for e in entries]}")

    def load(self, entry: ControlNetEntry, pipe: Pipeline):
        """The ControlNet loaded to run beside ``pipe`` (kept until another model or set is used); on the worker."""
        key = (entry.path, id(pipe))
        if key not in self._loaded:
            self._loaded = {k: v for k, v in self._loaded.items() if k[1] == id(pipe)}
            self._loaded[key] = load_controlnet_for(pipe, entry.path)
        return self._loaded[key]

    def keep_only(self, entries: list[ControlNetEntry], pipe: Pipeline) -> None:
        used = {(e.path, id(pipe)) for e in entries}
        self._loaded = {k: v for k, v in self._loaded.items() if k in used}


# ---------------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class RequestedUnit:
    """A unit of a request, checked: its ControlNet by entry, its images decoded."""

    entry: ControlNetEntry
    image: Image.Image | None
    mask: Image.Image | None
    settings: dict[str, Any]
    save_detected_map: bool


def _images(unit: dict[str, Any], index: int, limits: ServerLimits) -> tuple[Image.Image | None, Image.Image | None]:
    """The unit's image and mask from any of the extension's forms: ``image`` (or ``input_image``) as a
    base64 string, ``{"image", "mask"}`` or ``[image, mask]``; ``mask`` (or ``mask_image``) beside it."""
    image = unit.get("image", unit.get("input_image"))
    mask = unit.get("mask", unit.get("mask_image"))
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, (list, tuple)):
        if len(image) != 2:
            raise BadRequest(f"controlnet unit {index}: image as a list must be [image, mask]")
        image, mask = image
    where = f"alwayson_scripts.controlnet.args[{index}]"
    decoded = None if image in (None, "") else decode_image(image, what=f"{where}.image", limits=limits)
    decoded_mask = None if mask in (None, "") else decode_image(mask, what=f"{where}.mask", limits=limits)
    if decoded_mask is not None and decoded is not None and decoded_mask.size != decoded.size:
        raise BadRequest(f"{where}: the mask is {decoded_mask.size[0]}x{decoded_mask.size[1]}, the image "
                         f"{decoded.size[0]}x{decoded.size[1]}")
    return decoded, decoded_mask


def _unit(unit: Any, index: int, library: ControlNetLibrary, limits: ServerLimits,
          has_init_image: bool) -> RequestedUnit | None:
    if not isinstance(unit, dict):
        raise BadRequest(f"alwayson_scripts.controlnet.args[{index}] must be an object (a ControlNet unit)")
    if not unit.get("enabled", True):  # units sent without "enabled" are meant to run
        return None
    entry = library.find(unit.get("model"))
    image, mask = _images(unit, index, limits)
    if image is None and not has_init_image:
        raise BadRequest(f"alwayson_scripts.controlnet.args[{index}] has no image (txt2img has no init image "
                         "to use instead)")
    given = {setting: unit[name] for name, setting in _FIELDS.items() if name in unit and unit[name] is not None}
    for name in ("processor_res", "threshold_a", "threshold_b"):
        if given.get(name) == -1:
            del given[name]  # the extension's "unset"
    try:
        settings = unit_settings(**given)
    except ValueError as error:
        raise BadRequest(f"alwayson_scripts.controlnet.args[{index}]: {error}") from None
    return RequestedUnit(entry, image, mask, settings, bool(unit.get("save_detected_map", True)))


def requested_units(request, library: ControlNetLibrary, limits: ServerLimits,
                    has_init_image: bool) -> list[RequestedUnit]:
    """The enabled ControlNet units of a request's ``alwayson_scripts``, checked before queueing."""
    scripts = request.alwayson_scripts or {}
    block = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    if block is None:
        return []
    args = block.get("args") if isinstance(block, dict) else None
    if not isinstance(args, list):
        raise BadRequest('alwayson_scripts.controlnet must be {"args": [unit, ...]}')
    units = [_unit(unit, i, library, limits, has_init_image) for i, unit in enumerate(args)]
    return [unit for unit in units if unit is not None]


def control_units(requested: list[RequestedUnit], library: ControlNetLibrary, pipe: Pipeline) -> list[ControlUnit]:
    """The units with their ControlNets loaded beside ``pipe``; call on the worker."""
    library.keep_only([r.entry for r in requested], pipe)
    return [ControlUnit(library.load(r.entry, pipe), r.image, mask=r.mask, **r.settings) for r in requested]


def detected_maps(requested: list[RequestedUnit], result) -> list[str]:
    """The control maps the extension appends to the answer's images (unless a unit asks not to)."""
    return [encode_png(image) for unit, image in zip(requested, result.control_maps) if unit.save_detected_map]


# ---------------------------------------------------------------------------------------------- routes
def module_detail(name: str) -> dict[str, Any]:
    preprocessor = PREPROCESSORS[name]
    detail: dict[str, Any] = {"model_free": False, "sliders": [s.api_json() for s in preprocessor.sliders]}
    if preprocessor.detector is not None:
        detail["ready_map_only"] = True  # no learned detector here: the image must already be the map
    return detail


def add_controlnet_routes(app: FastAPI, state: ServerState) -> None:
    """The extension's own endpoints."""
    library: ControlNetLibrary = state.controlnets

    @app.get("/controlnet/version")
    async def version() -> dict[str, int]:
        return {"version": API_VERSION}

    @app.get("/controlnet/settings")
    async def settings() -> dict[str, int]:
        return {"control_net_unit_count": MAX_UNITS}

    @app.get("/controlnet/model_list")
    def model_list(update: bool = True) -> dict[str, list[str]]:
        return {"model_list": [entry.title for entry in library.entries()]}

    @app.get("/controlnet/module_list")
    async def module_list(alias_names: bool = False) -> dict[str, Any]:
        names = list(PREPROCESSORS)
        shown = [PREPROCESSORS[n].label for n in names] if alias_names else names
        return {"module_list": shown, "module_detail": {s: module_detail(n) for s, n in zip(shown, names)}}

    @app.post("/controlnet/detect")
    def detect(controlnet_module: str = Body("none"), controlnet_input_images: list[str] = Body([]),
               controlnet_processor_res: float = Body(-1), controlnet_threshold_a: float = Body(-1),
               controlnet_threshold_b: float = Body(-1), controlnet_masks: list[str] = Body([])) -> dict[str, Any]:
        try:
            preprocessor = get_preprocessor(controlnet_module)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=f"Module not available: {error}") from None
        if not controlnet_input_images:
            raise HTTPException(status_code=422, detail="No image selected (controlnet_input_images is empty)")
        images, warnings = [], []
        for index, data in enumerate(controlnet_input_images):
            image = decode_image(data, what=f"controlnet_input_images[{index}]", limits=state.limits)
            array = np.asarray(image.convert("RGB"))
            if preprocessor.name in INPAINT:
                mask = controlnet_masks[index] if index < len(controlnet_masks) else None
                mask = decode_image(mask, what=f"controlnet_masks[{index}]", limits=state.limits) if mask else None
                array = _inpaint_preview(array, mask)
            else:
                settings = preprocessor.settings(_unset(controlnet_processor_res), _unset(controlnet_threshold_a),
                                                 _unset(controlnet_threshold_b))
                array, warning = preprocess(array, preprocessor, settings)
                if warning and warning not in warnings:
                    warnings.append(warning)
            images.append(encode_png(Image.fromarray(array)))
        return {"images": images, "info": "Success" if not warnings else "Success; " + "; ".join(warnings)}


def _unset(value: float) -> float | None:
    return None if value == -1 else value


def _inpaint_preview(array: np.ndarray, mask: Image.Image | None) -> np.ndarray:
    if mask is None:
        return array
    masked = np.asarray(mask.convert("L").resize((array.shape[1], array.shape[0]), Image.Resampling.NEAREST)) > 127
    return np.where(masked[..., None], 0, array).astype(np.uint8)
