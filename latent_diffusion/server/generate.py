"""From API requests to pipeline calls and back: base64 images, limits, per-batch runs, A1111's ``info``.

Everything that can be checked without the model is checked here before a job is queued, so bad
input is answered at once with a 4xx and never occupies the worker.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from latent_diffusion.diffusion.registry import resolve_sampler
from latent_diffusion.diffusion.samplers import Step
from latent_diffusion.pipelines.common import GenerationResult, Pipeline, resolve_seed
from latent_diffusion.pipelines.hires import (
    DEFAULT_UPSCALER, HiresFix, check_upscaler_name, checked_target_sizes, is_same_choice,
)
from latent_diffusion.pipelines.png_info import PARAMETERS_KEY, parse_parameters
from latent_diffusion.server.jobs import Job, JobInterrupted
from latent_diffusion.server.models import ModelManager
from latent_diffusion.server.schemas import ExtrasSingleImageRequest, GenerationRequest, Img2ImgRequest, Txt2ImgRequest

DEFAULT_SAMPLER = "Euler a"
UPSCALERS = ("None", "Lanczos", "Nearest")
UPSCALE_TILE_OVERLAP = 16  # input pixels shared by neighbouring tiles of a super-resolution model
HIRES_DENOISING_STRENGTH = 0.75  # A1111's txt2img API default


class BadRequest(ValueError):
    """Input the server refuses before queueing (HTTP 400)."""


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; configurable from ``ldm serve``."""

    max_size: int = 1024  # pixels per side of generated images
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter
    max_upscaled_size: int | None = None  # pixels per side of an upscaler's output; default 4 * max_size
    max_input_pixels: int = 4096 * 4096  # decoded input images (guards against decompression bombs)
    max_body_bytes: int = 64 * 1024 * 1024  # a request body (base64 images included)
    # Super-resolution models: inputs up to max_upscale_input pixels per side, run in tiles of at most
    # upscale_tile pixels per side so that memory stays bounded whatever the input (the work grows with
    # the input's area; the limit bounds it).
    max_upscale_input: int = 512
    upscale_tile: int = 128

    @property
    def upscaled_limit(self) -> int:
        return self.max_upscaled_size or 4 * self.max_size


# ---------------------------------------------------------------------------------------------- images
def decode_image(data: str, *, what: str, limits: ServerLimits) -> Image.Image:
    """A base64 image (a ``data:image/...;base64,`` prefix is allowed, as A1111 allows it), fully loaded."""
    if not isinstance(data, str) or not data.strip():
        raise BadRequest(f"{what} is empty; send a base64-encoded PNG or JPEG")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > limits.max_input_pixels:
                raise BadRequest(f"{what} is {image.width}x{image.height}, more than the "
                                 f"{limits.max_input_pixels} pixels this server accepts")
            image.load()
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise BadRequest(f"{what} is not a readable image ({type(error).__name__})") from None
    return image


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Base64 PNG with the A1111 ``parameters`` text chunk."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text(PARAMETERS_KEY, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_info(image: Image.Image) -> dict[str, Any]:
    """``/sdapi/v1/png-info``: the parameters text, other text chunks, and the parsed parameters (A1111 keys)."""
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = items.pop(PARAMETERS_KEY, "")
    parameters: dict[str, Any] = {}
    if text:
        prompt, negative, settings = parse_parameters(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **settings}
        for key in ("Size", "Hires resize"):  # split as A1111 does: "Size-1", "Size-2"
            width, _, height = settings.get(key, "").partition("x")
            if width.isdigit() and height.isdigit():
                parameters[f"{key}-1"], parameters[f"{key}-2"] = width, height
    return {"info": text, "items": items, "parameters": parameters}


# ---------------------------------------------------------------------------------------------- checks
def sampler_and_scheduler(request: GenerationRequest) -> tuple[str, str]:
    """A1111 labels of the requested sampler and scheduler (400 for an unknown or contradictory one)."""
    name = request.sampler_name or request.sampler_index or DEFAULT_SAMPLER
    try:
        sampler, scheduler = resolve_sampler(name, request.scheduler)
    except ValueError as error:
        raise BadRequest(str(error)) from None
    return sampler.label, scheduler.label


def check_generation(request: GenerationRequest, limits: ServerLimits) -> None:
    """Size, steps and image count against the server's limits."""
    for name in ("width", "height"):
        value = getattr(request, name)
        if value > limits.max_size:
            raise BadRequest(f"{name} {value} exceeds this server's limit of {limits.max_size} pixels")
        if value % 8:
            raise BadRequest(f"{name} {value} is not a multiple of 8")
    if request.steps > limits.max_steps:
        raise BadRequest(f"steps {request.steps} exceeds this server's limit of {limits.max_steps}")
    if request.batch_size * request.n_iter > limits.max_images:
        raise BadRequest(f"batch_size * n_iter = {request.batch_size * request.n_iter} images exceeds this "
                         f"server's limit of {limits.max_images} per request")
    sampler_and_scheduler(request)


# ---------------------------------------------------------------------------------------------- running
class StepReporter:
    """The pipeline's per-step hook for one job: progress, interruption and live previews.

    A preview is a full VAE decode of the current estimate, which costs seconds for a large model on
    a CPU; previews are therefore also spaced so that decoding takes at most about a fifth of the time.
    """

    def __init__(self, job: Job, pipe: Pipeline, preview_every: int) -> None:
        self.job, self.pipe, self.preview_every = job, pipe, preview_every
        self.preview_cost = 0.0
        self.last_preview = 0.0

    def __call__(self, step: Step, total: int) -> None:
        job = self.job
        job.check_interrupted()
        job.step, job.steps = step.index + 1, total
        due = self.preview_every > 0 and (job.step % self.preview_every == 0 or job.step == total)
        if due and time.monotonic() - self.last_preview >= 4 * self.preview_cost:
            started = time.monotonic()
            # Decoded on the worker, between steps, so the weights are never used by two threads.
            job.preview = self.pipe.to_images(step.denoised[:1], [])[0]
            self.last_preview = time.monotonic()
            self.preview_cost = self.last_preview - started
        job.check_interrupted()


def run_batches(job: Job, pipe: Pipeline, request: GenerationRequest, preview_every: int, task) -> tuple[
        GenerationResult, int, bool]:
    """Run ``task(seed=..., step_callback=...)`` once per batch (``n_iter``), keeping the finished batches if interrupted."""
    seed = resolve_seed(request.seed)
    result = GenerationResult()
    job.batch_count = request.n_iter
    reporter = StepReporter(job, pipe, preview_every)
    interrupted = False
    try:
        for index in range(request.n_iter):
            job.batch_no, job.step = index, 0
            job.check_interrupted()
            result.extend(task(seed=seed + index * request.batch_size, step_callback=reporter))
    except JobInterrupted:
        interrupted = True
    return result, seed, interrupted


def common_options(request: GenerationRequest) -> dict[str, Any]:
    """Pipeline keyword arguments that txt2img, img2img and inpaint share."""
    sampler, scheduler = sampler_and_scheduler(request)
    return dict(negative_prompt=request.negative_prompt, steps=request.steps, sampler=sampler, scheduler=scheduler,
                guidance_scale=request.cfg_scale, batch_size=request.batch_size)


def check_hires(request: Txt2ImgRequest, limits: ServerLimits,
                model_upscalers: Sequence[str]) -> dict[str, Any] | None:
    """The hires fix a txt2img request asks for, checked before queueing: HiresFix's arguments, the
    upscaler by name (a super-resolution model is loaded on the worker). None without ``enable_hr``."""
    if not request.enable_hr:
        return None
    options = dict(
        scale=request.hr_scale, steps=request.hr_second_pass_steps, resize_x=request.hr_resize_x,
        resize_y=request.hr_resize_y, prompt=request.hr_prompt, negative_prompt=request.hr_negative_prompt,
        denoising_strength=(HIRES_DENOISING_STRENGTH if request.denoising_strength is None
                            else request.denoising_strength),
        sampler=None if is_same_choice(request.hr_sampler_name) else request.hr_sampler_name,
        scheduler=None if is_same_choice(request.hr_scheduler) else request.hr_scheduler)
    upscaler = request.hr_upscaler or DEFAULT_UPSCALER
    try:
        check_upscaler_name(upscaler, model_upscalers, others=None)
        enlarged, _ = checked_target_sizes(HiresFix(**options), request.width, request.height)
    except ValueError as error:
        raise BadRequest(str(error)) from None
    if max(enlarged) > limits.max_size:
        raise BadRequest(f"the hires fix makes {enlarged[0]}x{enlarged[1]}, beyond this server's limit of "
                         f"{limits.max_size} pixels")
    if request.hr_second_pass_steps > limits.max_steps:
        raise BadRequest(f"hr_second_pass_steps {request.hr_second_pass_steps} exceeds this server's limit of "
                         f"{limits.max_steps}")
    return {**options, "upscaler": upscaler}


def hires_fix(options: dict[str, Any] | None, models: ModelManager) -> HiresFix | None:
    """Checked hires options (:func:`check_hires`) with their upscaler; call on the worker, which loads
    a super-resolution model."""
    if options is None:
        return None
    name = options["upscaler"]
    upscaler = models.upscaler(name) if name in models.upscaler_paths else name
    return HiresFix(**{**options, "upscaler": upscaler})


def run_txt2img(job: Job, pipe: Pipeline, request: GenerationRequest, preview_every: int,
                hires: HiresFix | None = None, refiner=None, control=None):
    """The txt2img job, with the hires fix when ``hires`` is given, a refiner (a
    :class:`~latent_diffusion.pipelines.refiner.Refiner`) when ``refiner`` is, and ControlNet units."""
    return run_batches(job, pipe, request, preview_every, lambda **run: pipe.txt2img(
        request.prompt, width=request.width, height=request.height, hires=hires, refiner=refiner, control=control,
        **run, **common_options(request)))


def prepare_img2img(request: Img2ImgRequest, limits: ServerLimits) -> tuple[Image.Image, Image.Image | None]:
    """Decoded init image and mask at the requested size (A1111's "just resize"), before queueing."""
    image = decode_image(request.init_images[0], what="init_images[0]", limits=limits)
    image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    size = (request.width, request.height)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    mask = None
    if request.mask:
        mask = decode_image(request.mask, what="mask", limits=limits)
        if mask.mode in ("RGBA", "LA") and mask.getchannel("A").getextrema() != (255, 255):
            mask = mask.getchannel("A")  # strokes on a transparent layer, as the web page draws them
        mask = mask.convert("L").resize(size, Image.Resampling.NEAREST)
        if request.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
    return image, mask


def run_img2img(job: Job, pipe: Pipeline, request: Img2ImgRequest, image: Image.Image, mask: Image.Image | None,
                preview_every: int, refiner=None, control=None):
    """The img2img job, or inpainting when a mask was sent (original pixels kept outside it, as A1111)."""
    options = {**common_options(request), "control": control}
    if mask is None:
        return run_batches(job, pipe, request, preview_every, lambda **run: pipe.img2img(
            request.prompt, image, strength=request.denoising_strength, refiner=refiner, **run, **options))
    return run_batches(job, pipe, request, preview_every, lambda **run: pipe.inpaint(
        request.prompt, image, mask, strength=request.denoising_strength, mask_blur=request.mask_blur,
        mask_padding=request.inpaint_full_res_padding, keep_unmasked=True, **run, **options))


def upscale_target(request: ExtrasSingleImageRequest, image: Image.Image, limits: ServerLimits) -> tuple[int, int]:
    """The output size an upscale request asks for (by factor or by width/height), within the limits."""
    if request.resize_mode == 1:
        size = (request.upscaling_resize_w, request.upscaling_resize_h)
    else:
        size = (round(image.width * request.upscaling_resize), round(image.height * request.upscaling_resize))
    if max(size) > limits.upscaled_limit or min(size) < 1:
        raise BadRequest(f"upscaled size {size[0]}x{size[1]} is outside this server's limit of "
                         f"{limits.upscaled_limit} pixels per side")
    return size


def check_model_upscale(name: str, image: Image.Image, trained_size: int | None, limits: ServerLimits) -> None:
    """Refuse an input a super-resolution model should not be given (before queueing)."""
    width, height = image.size
    if trained_size is not None and max(width, height) > trained_size:
        raise BadRequest(f"upscaler {name!r} was trained on inputs of {trained_size}x{trained_size} pixels; a "
                         f"{width}x{height} input is outside that range and comes out recoloured (whole or in "
                         f"tiles), so it is refused: reduce it to {trained_size}x{trained_size} first, or use Lanczos")
    if max(width, height) > limits.max_upscale_input:
        raise BadRequest(f"input {width}x{height} exceeds this server's limit of {limits.max_upscale_input} pixels "
                         f"per side for super-resolution models; use Lanczos, or upscale a smaller image")


def run_upscale(job: Job, pipe: Pipeline | None, request: ExtrasSingleImageRequest, image: Image.Image,
                size: tuple[int, int], limits: ServerLimits) -> tuple[Image.Image, str]:
    """The upscaled image and its A1111 description: a resampling filter, or the super-resolution model
    ``pipe`` (in tiles, then resized to ``size``); an interrupted model upscale falls back to Lanczos."""
    name, note = request.upscaler_1, ""
    if name == "None":
        upscaled = image
    elif pipe is None:
        upscaled = resample(image, size, name)
    else:
        factor = pipe.latent_factor
        if max(image.size) * factor > limits.upscaled_limit:
            raise BadRequest(f"upscaler {name!r} makes a {image.width * factor}x{image.height * factor} image from "
                             f"this input, more than this server's limit of {limits.upscaled_limit} pixels per side")
        tile, overlap = upscale_tiles(pipe, image, limits.upscale_tile)
        try:
            upscaled = pipe.upscale(image.convert("RGB"), seed=0, tile_size=tile, tile_overlap=overlap,
                                    step_callback=StepReporter(job, pipe, 0)).images[0]
            if upscaled.size != size:
                upscaled = upscaled.resize(size, Image.Resampling.LANCZOS)
        except JobInterrupted:
            # As an interrupted generation answers with what it has: here the input, resampled to the size asked.
            upscaled, note = resample(image, size, "Lanczos"), " (interrupted: resampled with Lanczos instead)"
    return upscaled, f"Postprocess upscale to: {upscaled.width}x{upscaled.height}, Postprocess upscaler: {name}{note}"


def resample(image: Image.Image, size: tuple[int, int], name: str) -> Image.Image:
    """``image`` resized with a resampling filter of :data:`UPSCALERS`."""
    method = Image.Resampling.NEAREST if name == "Nearest" else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, method)


def upscale_tiles(pipe: Pipeline, image: Image.Image, largest: int) -> tuple[int, int]:
    """Tile side and overlap (input pixels) for ``pipe``: at most ``largest``, a multiple of what its UNet
    divides; an input smaller than two of those is refused (the UNet's lowest level would be one pixel)."""
    multiple = 2 ** (len(pipe.spec.unet.channel_mult) - 1)
    if min(image.size) < 2 * multiple:
        raise BadRequest(f"input {image.width}x{image.height} is too small for this super-resolution model: it "
                         f"needs at least {2 * multiple} pixels per side")
    tile = max(largest - largest % multiple, 2 * multiple)
    return tile, min(UPSCALE_TILE_OVERLAP, tile // 4)


def info_json(request: GenerationRequest, result: GenerationResult, seed: int, pipe: Pipeline,
              interrupted: bool, extra: dict[str, Any] | None = None) -> str:
    """A1111's ``info`` string (a JSON text) describing the images of one request."""
    count = len(result.images)
    sampler, scheduler = sampler_and_scheduler(request)
    info = {
        "prompt": request.prompt, "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * count,
        "seed": seed, "all_seeds": result.seeds, "subseed": -1, "all_subseeds": [-1] * count,
        "subseed_strength": 0, "width": request.width, "height": request.height,
        "sampler_name": sampler, "scheduler": scheduler, "cfg_scale": request.cfg_scale, "steps": request.steps,
        "batch_size": request.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": pipe.name, "sd_model_hash": pipe.hash, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": getattr(request, "denoising_strength", None),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": result.parameters,
        "styles": request.styles or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "latent-diffusion",
        "interrupted": interrupted, "warnings": result.warnings,
    }
    info.update(extra or {})
    return json.dumps(info, ensure_ascii=False)
