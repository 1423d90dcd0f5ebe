"""The hires fix (A1111's "Hires. fix"): sample at the model's size, enlarge, then redraw at the large size.

A model trained at 512 px that samples 1024 px from noise draws its subject twice over. The hires
fix samples at the model's own size first, enlarges that (its latents, or its pixels with a
resampling filter or a super-resolution model), and runs img2img on it at the large size, which
keeps the composition and adds the detail. A1111's rules, followed here:

- size: the first pass's size times ``scale`` (rounded down to whole latents), or ``resize_x`` x
  ``resize_y``: one of them alone keeps the aspect ratio; both enlarge until the image covers that
  size, then the centre of the latents is cut out;
- steps: the second pass runs exactly ``steps`` steps (0: the first pass's number), the tail of a
  schedule of ``int(steps / min(denoising_strength, 0.999))`` steps;
- seeds: the second pass draws from fresh generators seeded as the first (image k: seed + k), as
  A1111 reseeds its second pass's noise from each image's seed. For a pixel upscaler the VAE
  posterior sample is drawn first and then the noise, as our and diffusers' img2img draw them;
- a refiner (e.g. SDXL's) keeps its rule in both passes: it denoises every noise level below its
  switch point, so the second pass starts on the base model when it starts above that point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from latent_diffusion.diffusion.registry import resolve_sampler
from latent_diffusion.diffusion.sampling import BatchNoise, make_generators
from latent_diffusion.diffusion.schedulers import get_scheduler
from latent_diffusion.pipelines.common import Pipeline, SamplingSettings
from latent_diffusion.pipelines.images import image_to_tensor, tensor_to_images
from latent_diffusion.pipelines.memory import decoder_need
from latent_diffusion.pipelines.refiner import Refiner, prepare_refiner
from latent_diffusion.pipelines.upscale import input_multiple, is_upscaler

if TYPE_CHECKING:
    from latent_diffusion.pipelines.text_conditioning import MicroConditioning

# A1111's latent upscale modes: torch interpolation of the latents (mode, antialias).
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Resampling filters on the decoded image; A1111's "None" is a plain Lanczos resize.
PIXEL_UPSCALERS = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
DEFAULT_UPSCALER = "Latent"
DEFAULT_DENOISING_STRENGTH = 0.7  # A1111's
# A1111's slider range. Beyond it a 512 px model's second pass is larger than any UNet pass it was made for.
MAX_SCALE = 4.0
MAX_SCHEDULE_STEPS = 1000
# The large image is decoded (and, for pixel upscalers, encoded) in bands of rows, which gives the
# same image in bounded memory, when the untiled decoder's largest activation would pass this:
# Stable Diffusion's VAE above 1024x1024 pixels, where one such float32 tensor is 1 GiB and an
# untiled decode holds a few of them at once.
AUTO_TILED_VAE_BYTES = 2**30

UpscalerChoice = Union[str, Pipeline]


def upscaler_names() -> list[str]:
    """The upscalers that need no model, in A1111's spelling."""
    return [*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS]


ANY_MODEL = "a super-resolution model"


def unknown_upscaler(name: str, models: Sequence[str] = (), others: str | None = ANY_MODEL) -> ValueError:
    """The error for an upscaler name that is neither built in nor one of ``models`` (super-resolution
    models); ``others`` says what else may be given."""
    known = ", ".join(repr(n) for n in [*upscaler_names(), *models])
    return ValueError(f"unknown hires upscaler {name!r}; choose one of {known}" + (f", or {others}" if others else ""))


def check_upscaler_name(name: str, models: Sequence[str] = (), others: str | None = ANY_MODEL) -> None:
    if name not in LATENT_UPSCALE_MODES and name not in PIXEL_UPSCALERS and name not in models:
        raise unknown_upscaler(name, models, others)


def is_same_choice(value: str | None) -> bool:
    """A1111's "use the first pass's" spellings of the second pass's sampler and scheduler."""
    return value is None or value.strip() in ("", "Use same sampler", "Use same scheduler")


@dataclass(frozen=True)
class HiresFix:
    """What a txt2img call asks of the hires fix (A1111's hires fields; see the module docstring).

    ``upscaler`` is a latent mode or resampling filter by name (:func:`upscaler_names`), or a loaded
    super-resolution Pipeline (SD x4 upscaler, LDM SR). ``sampler``, ``scheduler``, ``prompt`` and
    ``negative_prompt`` default to the first pass's (None or "").
    """

    scale: float = 2.0
    upscaler: UpscalerChoice = DEFAULT_UPSCALER
    steps: int = 0
    denoising_strength: float = DEFAULT_DENOISING_STRENGTH
    resize_x: int = 0
    resize_y: int = 0
    sampler: str | None = None
    scheduler: str | None = None
    prompt: str = ""
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if not self.resized:
            if not isinstance(self.scale, (int, float)) or not 1.0 < self.scale <= MAX_SCALE:
                raise ValueError(f"hires scale must be a number above 1 and at most {MAX_SCALE:g}, got {self.scale!r}")
        for name, side in (("resize_x", "width"), ("resize_y", "height")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value % 8:
                raise ValueError(f"hires {side} ({name}) must be 0 (unset) or a multiple of 8 pixels, got {value!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 0 <= self.steps <= MAX_SCHEDULE_STEPS:
            raise ValueError(f"hires steps must be a whole number in [0, {MAX_SCHEDULE_STEPS}] "
                             f"(0: as many as the first pass), got {self.steps!r}")
        strength = self.denoising_strength
        if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"hires denoising strength must be in [0, 1], got {strength!r}")
        if isinstance(self.upscaler, str):
            check_upscaler_name(self.upscaler)
        elif not isinstance(self.upscaler, Pipeline) or not is_upscaler(self.upscaler):
            raise ValueError(f"a hires upscaler model must be a super-resolution Pipeline (SD x4 upscaler or "
                             f"LDM SR), got {_describe(self.upscaler)}")
        try:
            if not is_same_choice(self.sampler):
                resolve_sampler(self.sampler, None if is_same_choice(self.scheduler) else self.scheduler)
            elif not is_same_choice(self.scheduler):
                get_scheduler(self.scheduler)
        except ValueError as error:
            raise ValueError(f"hires sampler/scheduler: {error}") from None

    @property
    def resized(self) -> bool:
        """Whether the target is an explicit size (``resize_x``/``resize_y``) rather than ``scale``."""
        return bool(self.resize_x or self.resize_y)

    @property
    def upscaler_name(self) -> str:
        return self.upscaler if isinstance(self.upscaler, str) else self.upscaler.name


def _describe(value: object) -> str:
    if isinstance(value, Pipeline):
        return f"{value.name!r}, a {value.spec.family!r} model"
    return type(value).__name__


def target_sizes(hires: HiresFix, width: int, height: int, multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the size the first pass is enlarged to, the final size after the centre cut), as A1111 computes them."""
    def floor(value: float) -> int:
        return int(value) // multiple * multiple

    rx, ry = hires.resize_x, hires.resize_y
    if not hires.resized:
        enlarged = (floor(width * hires.scale), floor(height * hires.scale))
        return enlarged, enlarged
    if not ry:
        enlarged = (rx, floor(rx * height // width))
        return enlarged, enlarged
    if not rx:
        enlarged = (floor(ry * width // height), ry)
        return enlarged, enlarged
    # Both: keep the aspect ratio and cover rx x ry; the overhang is cut off later.
    if width * ry < rx * height:
        return (rx, floor(rx * height // width)), (rx, ry)
    return (floor(ry * width // height), ry), (rx, ry)


@dataclass(frozen=True)
class HiresPlan:
    """A hires fix resolved against one txt2img call: sizes, the second pass's schedule, prompts."""

    hires: HiresFix
    first: SamplingSettings
    first_prompts: tuple[str, str]
    enlarged: tuple[int, int]
    size: tuple[int, int]
    settings: SamplingSettings  # the second pass's sampler over its whole schedule
    strength: float  # the share of that schedule it runs: exactly ``run_steps`` steps
    run_steps: int
    tiled_vae: bool

    @property
    def prompts(self) -> tuple[str, str]:
        """The second pass's prompt and negative prompt."""
        prompt, negative = self.first_prompts
        return self.hires.prompt or prompt, self.hires.negative_prompt or negative

    def parameters(self) -> dict[str, str | int | None]:
        """The A1111 ``parameters`` entries of a hires-fixed image (the settings that differ from the first pass's)."""
        hires, settings = self.hires, self.settings
        prompt, negative = self.prompts
        return {
            "Denoising strength": _exact(hires.denoising_strength),
            "Hires sampler": settings.sampler.label if settings.sampler != self.first.sampler else None,
            "Hires schedule type": settings.scheduler.label if settings.scheduler != self.first.scheduler else None,
            "Hires prompt": prompt if prompt != self.first_prompts[0] else None,
            "Hires negative prompt": negative if negative != self.first_prompts[1] else None,
            "Hires upscale": None if hires.resized else _exact(hires.scale),
            "Hires resize": f"{hires.resize_x}x{hires.resize_y}" if hires.resized else None,
            "Hires steps": hires.steps or None,
            "Hires upscaler": hires.upscaler_name,
        }


def checked_target_sizes(hires: HiresFix, width: int, height: int,
                         multiple: int = 8) -> tuple[tuple[int, int], tuple[int, int]]:
    """:func:`target_sizes`, refusing targets that do not enlarge or enlarge more than ``MAX_SCALE``."""
    enlarged, size = target_sizes(hires, width, height, multiple)
    if enlarged[0] < width or enlarged[1] < height or enlarged == (width, height):
        raise ValueError(f"the hires fix must enlarge the first pass's {width}x{height} image; "
                         f"{_asked(hires)} gives {enlarged[0]}x{enlarged[1]}")
    if max(enlarged[0] / width, enlarged[1] / height) > MAX_SCALE:
        raise ValueError(f"the hires fix enlarges by at most {MAX_SCALE:g}x; {_asked(hires)} makes "
                         f"{enlarged[0]}x{enlarged[1]} from {width}x{height}")
    return enlarged, size


def _exact(value: float) -> str:
    """2.0 -> "2", 0.35 -> "0.35", 1/3 -> "0.3333333333333333": --from-png gets the very number back."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def plan_hires(hires: HiresFix, pipe: Pipeline, width: int, height: int, first: SamplingSettings,
               prompt: str, negative_prompt: str) -> HiresPlan:
    """Check ``hires`` against the first pass (before any work) and work out the second pass."""
    enlarged, size = checked_target_sizes(hires, width, height, max(8, pipe.latent_factor))
    if not isinstance(hires.upscaler, str):
        _check_upscaler_model(hires.upscaler, width, height, enlarged)
    run_steps = hires.steps or first.steps
    strength = hires.denoising_strength
    schedule_steps = int(run_steps / min(strength, 0.999)) if strength > 0 else run_steps
    if schedule_steps > MAX_SCHEDULE_STEPS:
        raise ValueError(f"{run_steps} hires steps at denoising strength {strength:g} make a schedule of "
                         f"{schedule_steps} steps, more than {MAX_SCHEDULE_STEPS}; raise the strength or lower "
                         "the steps")
    # int(schedule_steps * share) == run_steps exactly; the half step keeps float rounding off the edge.
    share = 0.0 if strength == 0 else min(1.0, (run_steps + 0.5) / schedule_steps)
    settings = _second_pass_settings(hires, first, schedule_steps)
    largest = decoder_need(pipe.spec.autoencoder, 1, *enlarged, itemsize=4).activation_bytes
    tiled = pipe.tiled_vae or largest > AUTO_TILED_VAE_BYTES
    return HiresPlan(hires, first, (prompt, negative_prompt), enlarged, size, settings, share, run_steps, tiled)


def _asked(hires: HiresFix) -> str:
    return f"resize {hires.resize_x}x{hires.resize_y}" if hires.resized else f"scale {hires.scale:g}"


def _check_upscaler_model(upscaler: Pipeline, width: int, height: int, enlarged: tuple[int, int]) -> None:
    from latent_diffusion.pipelines.common import builtin_upscaler_input_limit

    factor, multiple = upscaler.latent_factor, input_multiple(upscaler)
    limit = builtin_upscaler_input_limit(upscaler)
    if limit is not None and max(width, height) > limit:
        raise ValueError(f"upscaler {upscaler.name!r} was trained on {limit}x{limit} inputs and recolours larger "
                         f"ones; the first pass is {width}x{height}: use a latent or Lanczos upscaler instead")
    if width % multiple or height % multiple:
        raise ValueError(f"upscaler {upscaler.name!r} takes images whose sides are multiples of {multiple}; "
                         f"the first pass is {width}x{height}")
    if enlarged[0] > factor * width or enlarged[1] > factor * height:
        raise ValueError(f"upscaler {upscaler.name!r} enlarges {factor}x, so it cannot make {enlarged[0]}x"
                         f"{enlarged[1]} from {width}x{height}; ask for at most {factor}x")


def _second_pass_settings(hires: HiresFix, first: SamplingSettings, steps: int) -> SamplingSettings:
    """The hires sampler and scheduler (each the first pass's unless given) over ``steps`` steps."""
    same_sampler, same_scheduler = is_same_choice(hires.sampler), is_same_choice(hires.scheduler)
    sampler, scheduler = first.sampler, first.scheduler
    if not same_sampler:
        sampler, carried = resolve_sampler(hires.sampler, None if same_scheduler else hires.scheduler)
        # A name that carries a schedule ("DPM++ 2M Karras") or an explicit scheduler wins.
        scheduler = carried if not carried.is_automatic or not same_scheduler else first.scheduler
    elif not same_scheduler:
        scheduler = get_scheduler(hires.scheduler)
    return SamplingSettings(sampler, steps, first.guidance_scale, first.step_callback, scheduler)


# ---------------------------------------------------------------------------------------------- running
def upscale_latents(latents: Tensor, mode: str, size: tuple[int, int]) -> Tensor:
    """Latents interpolated to ``size`` = (height, width) in latent pixels with a latent upscale mode."""
    interpolation, antialias = LATENT_UPSCALE_MODES[mode]
    # In float32: CPUs have no half-precision bicubic kernels.
    return F.interpolate(latents.float(), size=size, mode=interpolation, antialias=antialias).to(latents.dtype)


def _cut_centre(latents: Tensor, width: int, height: int) -> Tensor:
    """The centre ``height`` x ``width`` latents (the odd row or column off the bottom/right, as A1111)."""
    cut_y, cut_x = latents.shape[2] - height, latents.shape[3] - width
    return latents[:, :, cut_y // 2:latents.shape[2] - (cut_y + 1) // 2, cut_x // 2:latents.shape[3] - (cut_x + 1) // 2]


def _enlarge_pixels(plan: HiresPlan, images: list[Image.Image], first_seed: int) -> Tensor:
    """The first pass's images enlarged to ``plan.enlarged`` as pixels in [-1, 1]."""
    upscaler = plan.hires.upscaler
    enlarged = []
    for index, image in enumerate(images):
        if isinstance(upscaler, str):
            image = image.resize(plan.enlarged, PIXEL_UPSCALERS[upscaler])
        else:
            image = _run_upscaler_model(plan, upscaler, image, first_seed + index)
        enlarged.append(image_to_tensor(image))
    return torch.cat(enlarged)


def _run_upscaler_model(plan: HiresPlan, upscaler: Pipeline, image: Image.Image, seed: int) -> Image.Image:
    """A super-resolution model's enlargement (the second pass's sampler, steps, CFG and prompts), resized
    down to the target with Lanczos where the model's factor overshoots it, as A1111 does."""
    prompt, negative = plan.prompts
    settings = plan.settings
    big = upscaler.upscale(image, prompt if upscaler.takes_text else "", negative_prompt=negative,
                           steps=plan.run_steps, sampler=settings.sampler.name, scheduler=settings.scheduler.name,
                           guidance_scale=settings.guidance_scale, seed=seed,
                           step_callback=settings.step_callback).images[0]
    return big if big.size == plan.enlarged else big.resize(plan.enlarged, Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class FirstPass:
    """What the second pass takes over from the first: its latents and how they were made."""

    latents: Tensor
    first_seed: int
    clip_skip: int | None = None
    micro: MicroConditioning | None = None
    refiner: Refiner | None = None


def second_pass(pipe: Pipeline, plan: HiresPlan, first: FirstPass, warnings: list[str]) -> list[Image.Image]:
    """Enlarge the first pass's latents and redraw them at the large size: the finished images."""
    batch = first.latents.shape[0]
    decoder = first.refiner.pipe if first.refiner else pipe
    generators = make_generators(first.first_seed, batch)
    f = pipe.latent_factor
    if isinstance(plan.hires.upscaler, str) and plan.hires.upscaler in LATENT_UPSCALE_MODES:
        height, width = plan.enlarged[1] // f, plan.enlarged[0] // f
        init = upscale_latents(first.latents, plan.hires.upscaler, (height, width))
    else:
        small = tensor_to_images(decoder.decode(first.latents, warnings))
        pixels = _enlarge_pixels(plan, small, first.first_seed)
        init = pipe.encode_images(pixels, generators, tiled=plan.tiled_vae)
    init = _cut_centre(init, plan.size[0] // f, plan.size[1] // f)
    prompt, negative = plan.prompts
    width, height = plan.size
    cond, uncond = pipe.text_conditioning(prompt, negative, batch, first.clip_skip, width=width, height=height,
                                          micro=first.micro)
    refine = prepare_refiner(first.refiner, prompt, negative, batch, width=width, height=height, micro=first.micro)
    latents = pipe.sample_latents(plan.settings, BatchNoise(generators), cond, uncond, init_latent=init,
                                  strength=plan.strength, description="hires fix", refine=refine,
                                  tiled_decode=plan.tiled_vae)
    return decoder.to_images(latents, warnings, tiled=plan.tiled_vae)
