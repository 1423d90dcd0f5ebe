"""What every task shares: the loaded model, prompt encoding, one sampling core, decoding, results.

A :class:`Pipeline` holds a loaded model with its tokenizer and noise schedule. The task modules
(txt2img, img2img, inpaint, upscale, sample) build the conditioning and the starting latent for
their task and call :meth:`Pipeline.sample_latents` and :meth:`Pipeline.decode`; seeding, guidance,
progress and the half-precision guard live here once.

Seeding: image ``i`` of a batch gets its own generator seeded ``seed + i``. Whatever a task draws
for its input image (the VAE posterior sample, the upscaler's noise augmentation) is drawn from that
generator first, then the sampler's noise; diffusers draws in the same order from a generator list.
"""
from __future__ import annotations

import math
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import torch
from PIL import Image
from torch import Tensor

from latent_diffusion.checkpoints.io import CheckpointError, read_state_dict, release_file_pages
from latent_diffusion.checkpoints.load import LoadedModel
from latent_diffusion.diffusion.denoiser import Conditioning, Denoiser
from latent_diffusion.diffusion.guidance import ClassifierFreeGuidance
from latent_diffusion.diffusion.registry import SamplerSpec, resolve_sampler, sigmas_for
from latent_diffusion.diffusion.samplers import Step
from latent_diffusion.diffusion.sampling import BatchNoise, make_generators, sample
from latent_diffusion.diffusion.schedulers import AUTOMATIC, SchedulerSpec
from latent_diffusion.diffusion.schedules import NoiseSchedule, img2img_sigmas
from latent_diffusion.families.distilled import sampling_defaults_for
from latent_diffusion.models.autoencoder import AutoencoderKL
from latent_diffusion.models.vae_tiling import decode_tiled, encode_tiled
from latent_diffusion.nn import bf16 as bf16_mode
from latent_diffusion.nn import cpu_heap
from latent_diffusion.nn.packed import PACKED_DTYPES, PackedWeights, packing_available, unpacked
from latent_diffusion.pipelines.images import check_size, tensor_to_images
from latent_diffusion.pipelines.memory import check_encoding, check_sampling
from latent_diffusion.pipelines.png_info import format_parameters, model_hash
from latent_diffusion.pipelines.prompt_addons import PromptAddons
from latent_diffusion.pipelines.refiner import HandOff, RefinerRun
from latent_diffusion.pipelines.text_conditioning import MicroConditioning, TextConditioner

if TYPE_CHECKING:
    from latent_diffusion.pipelines.control import ControlSet

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# File names the built-in model may ship under, first found wins.
DEFAULT_MODEL_FILES = ("shapes-ldm.safetensors", "shapes.safetensors")
# The built-in super-resolution model that ``ldm upscale`` uses without ``--checkpoint``.
DEFAULT_UPSCALER_FILES = ("shapes-sr.safetensors",)
# It saw only 16x16 inputs (shapes scenes reduced from 64x64). Larger inputs come out recoloured,
# whole or cut into 16 px tiles (bench/builtin_upscaler_range.py, 64 -> 256: PSNR 29.0 and 21.1 dB
# where bicubic gives 35.2), so the CLI and the server refuse them.
BUILTIN_UPSCALER_INPUT = 16
MAX_SEED = 2**32 - 1
# ``callback(step, total_steps)`` after every sampler step of one request.
StepCallback = Callable[[Step, int], None]


def default_checkpoint_path() -> Path:
    """The built-in model that commands use without ``--checkpoint`` (shipped in ``latent_diffusion/assets``)."""
    for name in DEFAULT_MODEL_FILES:
        if (ASSETS / name).is_file():
            return ASSETS / name
    raise FileNotFoundError(
        "no built-in model is installed yet; pass --checkpoint PATH (a .safetensors/.ckpt file or a diffusers folder)"
    )


def builtin_upscaler_input_limit(pipe: Pipeline) -> int | None:
    """The largest input side ``pipe`` was trained on, where known: the built-in upscaler's."""
    source = pipe.loaded.source
    try:
        builtin = default_upscaler_path()
    except FileNotFoundError:
        return None
    return BUILTIN_UPSCALER_INPUT if source is not None and Path(source).resolve() == builtin.resolve() else None


def default_upscaler_path() -> Path:
    """The built-in super-resolution model (16x16 -> 64x64 shapes world) that ``ldm upscale`` uses by default."""
    for name in DEFAULT_UPSCALER_FILES:
        if (ASSETS / name).is_file():
            return ASSETS / name
    raise FileNotFoundError("no built-in super-resolution model is installed; pass --checkpoint PATH")


def resolve_seed(seed: int | None) -> int:
    """A user's seed, or a fresh random one (-1 and None both mean random, as in A1111)."""
    if seed is None or seed == -1:
        # Half the range, so that the seeds of the following images (seed + k) stay valid.
        return secrets.randbelow(2**31)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}] (or -1 for random), got {seed}")
    return int(seed)


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


@dataclass
class GenerationResult:
    """Images of a task with the A1111 parameters text of each (what goes into the PNG)."""

    images: list[Image.Image] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # The ControlNet units' control maps as they went in (one per unit, from the first batch).
    control_maps: list[Image.Image] = field(default_factory=list)

    def extend(self, other: GenerationResult) -> None:
        self.images += other.images
        self.parameters += other.parameters
        self.seeds += other.seeds
        self.warnings += [w for w in other.warnings if w not in self.warnings]
        self.control_maps = self.control_maps or other.control_maps


@dataclass(frozen=True)
class SamplingSettings:
    """The sampler choices every task shares (validated once)."""

    sampler: SamplerSpec
    steps: int
    guidance_scale: float
    # Called as ``step_callback(step, total_steps)`` after every sampler step of this request (the
    # server's progress and previews); an exception raised there aborts the sampling. Passed per
    # request, never stored on the shared Pipeline.
    step_callback: StepCallback | None = field(default=None, compare=False)
    # The sigma schedule; Automatic runs the sampler's own.
    scheduler: SchedulerSpec = AUTOMATIC

    @classmethod
    def make(cls, sampler: str, steps: int | None, guidance_scale: float,
             step_callback: StepCallback | None = None, scheduler: str | None = None) -> SamplingSettings:
        spec, scheduler_spec = resolve_sampler(sampler, scheduler)
        steps = spec.default_steps if steps is None else steps
        if not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise ValueError(f"steps must be a whole number in [1, 1000], got {steps!r}")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance scale must be a finite number >= 0, got {guidance_scale}")
        return cls(spec, steps, float(guidance_scale), step_callback, scheduler_spec)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or not sys.stderr.isatty(), leave=False, unit="step")


def load_vae_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Replace a model's autoencoder by a separate VAE file (SD ``vae-ft-mse`` style, bare or prefixed keys)."""
    state = read_state_dict(path)
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # Released VAE files carry their training loss (LPIPS, discriminator) and EMA bookkeeping.
    state = {k: v for k, v in state.items() if not k.startswith(("loss.", "model_ema."))}
    if any(".up_blocks." in k or ".down_blocks." in k for k in state):
        raise CheckpointError(f"VAE file {path} is in the diffusers layout; use the original-layout file "
                              "(as released for A1111, e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    target = model.first_stage_model
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        problems = [f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"VAE file {path} does not fit this model's autoencoder ({'; '.join(problems)})")
    dtype = next(iter(expected.values())).dtype
    target.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)


BF16_FALLBACK = ("bf16 mode needs native bfloat16 arithmetic (AVX512-BF16 or AMX on a CPU), which this device "
                 "lacks, where it would be many times slower than fp32: ran the exact fp32 path instead")


def _native_bf16(model) -> bool:
    return bf16_mode.has_native_bf16(next(model.unet.parameters()).device)


class Pipeline:
    """A loaded model ready for the tasks: ``txt2img``, ``img2img``, ``inpaint``, ``upscale``, ``sample``."""

    def __init__(self, loaded: LoadedModel, *, name: str | None = None, hash_: str | None = None,
                 progress: bool = True, tiled_vae: bool = False, lean: bool = False,
                 compile_unet: bool = False, bf16: bool = False, lora_dir: str | os.PathLike | None = None,
                 embeddings_dir: str | os.PathLike | None = None, packed: bool | None = None) -> None:
        if lean and (compile_unet or bf16):
            raise ValueError("lean mode does not combine with bf16 mode or a compiled UNet: lean swaps the weights "
                             "per block, bf16 converts them, a compiled UNet has them frozen in")
        if bf16 and next(loaded.model.first_stage_model.parameters()).dtype != torch.float32:
            raise ValueError("bf16 mode keeps everything but the UNet in fp32; load without --half")
        # Said with every result the pipeline makes (a mode it could not run, and what it ran instead).
        self.mode_warnings: list[str] = []
        if bf16 and not _native_bf16(loaded.model):
            bf16 = False
            loaded.model.unet.float()
            self.mode_warnings.append(BF16_FALLBACK)
        self.loaded = loaded
        self.model = loaded.model
        self.spec = loaded.spec
        self.family = loaded.family
        # A few-step distilled model (SD-Turbo, ...) says so in its file; commands fill unset options from it.
        self.sampling_defaults = sampling_defaults_for(loaded.source)
        self.schedule = NoiseSchedule.from_config(self.spec.schedule)
        self.name = name or (loaded.source.stem if loaded.source else self.spec.family)
        self.hash = hash_
        self.progress = progress
        # Decode in bands of rows (models/vae_tiling.py): bounded memory for large images. bf16 mode,
        # the small mode, always does: the same image (142 dB), a 256 px image's peak 0.18 GiB lower
        # (SD 1.5: 2.34 GiB against 2.52) for 0.5 s more decoding.
        self.tiled_vae = tiled_vae or bf16
        if lean:
            _make_pipeline_lean(self.model)
        # Latents, conditioning and images stay fp32 in bf16 mode; only the UNet's insides are bf16.
        self.bf16, self.compile_unet = bf16, compile_unet
        self.unet_forward = self._unet_stack(compile_unet=compile_unet, bf16=bf16)
        self.packed_weights = self._pack(packed, other_modes=lean or compile_unet)
        if self.device.type == "cpu":
            cpu_heap.reuse_freed_buffers()  # a step's large activations reuse the heap (8% of a step)
        self._text: TextConditioner | None = None
        # LoRAs and embeddings that prompts name (default folders: addons/library.py).
        self.addons = PromptAddons(self, lora_dir, embeddings_dir)
        # What the text encoder could not read of the prompts (unknown words, cut tokens); taken by the task.
        self.prompt_warnings: list[str] = []

    def _unet_stack(self, *, compile_unet: bool, bf16: bool) -> Callable[..., Tensor]:
        """What the sampler calls: the UNet, wrapped by each run mode in turn. A layer takes the callable
        below it and passes every argument through, so a per-request layer (a ControlNet's residuals)
        stacks on top the same way; the model keeps the plain UNet and its state-dict names."""
        network: Callable[..., Tensor] = self.model.unet
        if bf16:
            from latent_diffusion.nn.bf16 import BF16Autocast

            network = BF16Autocast(self.model.unet)  # converts the UNet's weights in place
        if compile_unet:
            from latent_diffusion.nn.compiled import CompiledUNet

            network = CompiledUNet(network, self.model.unet, progress=self.progress)  # bf16's graph, if on
        return network

    def _pack(self, packed: bool | None, other_modes: bool) -> PackedWeights | None:
        """Packed weights (nn/packed.py): on by default on a CPU, for fp32 weights and bf16 mode's UNet."""
        dtype = next(self.model.unet.parameters()).dtype
        why_not = (f"packing is for a CPU with oneDNN, not {self.device}" if not packing_available(self.device)
                   else "lean and compiled modes hold the weights their own way" if other_modes
                   else f"the weights are {dtype}; packing takes fp32 weights or bf16 mode's" if dtype not in PACKED_DTYPES
                   else None)
        if packed and why_not:
            raise ValueError(f"cannot pack the weights: {why_not}")
        if packed is False or why_not:
            return None
        # The text encoders, called once a prompt, stay as loaded: their pages are given back between
        # prompts (text_conditioning), which a packed copy in ordinary memory could not do.
        return PackedWeights(self.model.unet, self.model.first_stage_model)

    def plain_weights(self) -> ContextManager[None]:
        """Inside, the model's layers hold their weights in PyTorch's layout, to read or change."""
        return unpacked(self.model)

    def weights_changed(self) -> None:
        """The UNet's weights were replaced (LoRAs merged or removed): a compiled UNet, which froze
        the old ones into its graph, is compiled (or loaded from the disk cache) again on its next call."""
        if self.compile_unet:
            self.unet_forward.weights_changed()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | None = None,
        *,
        vae: str | os.PathLike | None = None,
        config_yaml: str | os.PathLike | None = None,
        half: bool = False,
        family: str | None = None,
        prediction: str | None = None,
        use_ema: bool = False,
        device: str | torch.device = "cpu",
        progress: bool = True,
        tiled_vae: bool = False,
        lean: bool = False,
        compile_unet: bool = False,
        bf16: bool = False,
        lora_dir: str | os.PathLike | None = None,
        embeddings_dir: str | os.PathLike | None = None,
        packed: bool | None = None,
    ) -> Pipeline:
        """Load a single file or diffusers folder (the built-in model when ``path`` is None).

        A CompVis YAML next to the file (same name, ``.yaml``) describes it when ``config_yaml`` is
        not given, as A1111 looks for one; models this package trains are exported that way.
        """
        from latent_diffusion.checkpoints.convert import load_diffusers_folder
        from latent_diffusion.checkpoints.load import load_checkpoint
        from latent_diffusion.pipelines.device import check_device

        check_device(device)
        path = Path(path) if path is not None else default_checkpoint_path()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if config_yaml is None and path.is_file() and path.with_suffix(".yaml").is_file():
            config_yaml = path.with_suffix(".yaml")
        if vae is not None and not Path(vae).is_file():
            raise FileNotFoundError(f"VAE file not found: {vae}")
        # Lean mode loads half precision (the fp32 weights never exist whole) and computes in fp32.
        dtype = torch.float16 if half or lean else torch.float32
        if path.is_dir():
            loaded = load_diffusers_folder(path, dtype=dtype, device=device)
            hash_ = None
        else:
            # bf16 mode: the UNet converted as it loads, so its fp32 file pages are released as it goes.
            unet_bf16 = bf16 and not half and bf16_mode.has_native_bf16(device)  # else the fp32 path, said by __init__
            loaded = load_checkpoint(path, family=family, prediction=prediction, config_yaml=config_yaml,
                                     use_ema=use_ema, dtype=dtype, device=device,
                                     unet_dtype=torch.bfloat16 if unet_bf16 else None)
            hash_ = model_hash(path)
        if vae is not None:
            load_vae_weights(loaded.model, vae)
        return cls(loaded, name=path.stem if path.is_file() else path.name, hash_=hash_, progress=progress,
                   tiled_vae=tiled_vae, lean=lean, compile_unet=compile_unet, bf16=bf16, lora_dir=lora_dir,
                   embeddings_dir=embeddings_dir, packed=packed)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """What latents, conditioning and images are kept in: the UNet's dtype (fp32 in bf16 mode)."""
        return torch.float32 if self.bf16 else next(self.model.unet.parameters()).dtype

    @property
    def latent_factor(self) -> int:
        return self.spec.downsampling_factor

    @property
    def takes_text(self) -> bool:
        return self.family.takes_text(self.spec)

    @property
    def takes_class(self) -> bool:
        return self.family.takes_class(self.spec)

    @property
    def concat_channels(self) -> int:
        """Image channels the UNet takes besides the latent (5 for SD inpainting, 3 for upscalers)."""
        return self.family.concat_channels(self.spec)

    # ------------------------------------------------------------------ conditioning
    @property
    def text(self) -> TextConditioner:
        """How this model turns prompts into conditioning (built on first use: tokenizers take a moment)."""
        if not self.takes_text:
            raise ValueError(f"this model ({self.spec.family}) takes no text prompt")
        if self._text is None:
            self._text = self.family.text_conditioner(self.model, self.dtype)
        return self._text

    def encode_prompts(self, prompts: Sequence[str], clip_skip: int | None = None) -> Tensor:
        """Cross-attention context [B, 77 * chunks, width] with A1111 emphasis and long-prompt chunking.

        All prompts passed together get the same number of 77-token chunks, so encode a batch's
        prompts and negative prompts in one call.
        """
        context = self.text.encode(self.addons.apply(*prompts), clip_skip)
        return context[0] if isinstance(context, tuple) else context

    def text_conditioning(self, prompt: str, negative_prompt: str, batch_size: int, clip_skip: int | None, *,
                          width: int, height: int,
                          micro: MicroConditioning | None = None) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for a batch of one prompt at an image size (SDXL conditions on the size).

        The LoRAs the prompts' ``<lora:...>`` tags name are merged first (and only those).
        """
        prompt, negative_prompt = self.addons.apply(prompt, negative_prompt)
        found = self.text.prompt_warnings(prompt, negative_prompt)
        self.prompt_warnings += [w for w in found if w not in self.prompt_warnings]
        pair = self.text.encode_pair(prompt, negative_prompt, batch_size, clip_skip=clip_skip, width=width,
                                   height=height, micro=micro or MicroConditioning())
        encoder = self.model.condition_encoder
        if encoder is not None:
            # Text encoders mapped from their file give their pages back until the next prompt (read
            # again from the page cache): 0.46 GiB less at the sampling's peak for SD 1.x.
            for parameter in encoder.parameters():
                release_file_pages(parameter)
        return pair

    # ------------------------------------------------------------------ latents <-> images
    def encode_images(self, pixels: Tensor, generators: Sequence[torch.Generator] | None, *,
                      tiled: bool | None = None) -> Tensor:
        """Scaled latents of images in [-1, 1]; a KL posterior is sampled with each image's generator.

        ``tiled`` encodes in bands of rows (models/vae_tiling.py): the same latents in bounded memory
        (default: the pipeline's ``tiled_vae``, as for decoding).
        """
        tiled = self.tiled_vae if tiled is None else tiled
        check_encoding(self, pixels.shape[-1], pixels.shape[-2], tiled=tiled)
        vae = self.model.first_stage_model
        pixels = pixels.to(self.device, self.dtype)

        def encode(x: Tensor):
            return encode_tiled(vae, x, progress=self.progress) if tiled else vae.encode(x)

        with torch.no_grad():
            if isinstance(vae, AutoencoderKL):
                rows = []
                for i in range(pixels.shape[0]):
                    posterior = encode(pixels[i:i + 1])
                    rows.append(posterior.sample(generators[i]) if generators else posterior.mode())
                latents = torch.cat(rows)
            else:
                latents = encode(pixels)
        return latents * self.spec.scale_factor

    def decode(self, latents: Tensor, warnings: list[str] | None = None, *, tiled: bool | None = None) -> Tensor:
        """Images in [-1, 1] (float32, on the CPU) from scaled latents; a half-precision overflow is redone in fp32.

        ``tiled`` decodes in bands of rows (default: the pipeline's ``tiled_vae``).
        """
        vae = self.model.first_stage_model
        tiled = self.tiled_vae if tiled is None else tiled
        cpu_heap.give_back_free_heap()  # the sampling's buffers, whose sizes the VAE's do not fit
        with torch.no_grad():
            z = latents.to(self.dtype) / self.spec.scale_factor
            images = decode_tiled(vae, z, progress=self.progress) if tiled else vae.decode(z)
            if not torch.isfinite(images).all():
                if self.dtype == torch.float32:
                    raise FloatingPointError("the decoded image contains NaN/inf even in fp32; the weights are broken")
                message = "the VAE overflowed in half precision; decoded this batch in fp32 instead"
                if warnings is not None and message not in warnings:
                    warnings.append(message)
                images = _decode_fp32(vae, z.float())
        return images.float().cpu()

    def to_images(self, latents: Tensor, warnings: list[str], *, tiled: bool | None = None) -> list[Image.Image]:
        return tensor_to_images(self.decode(latents, warnings, tiled=tiled))

    # ------------------------------------------------------------------ the sampling core
    def latent_shape(self, batch_size: int, width: int, height: int) -> tuple[int, int, int, int]:
        check_size(width, height, max(8, self.latent_factor))
        f = self.latent_factor
        return (batch_size, self.spec.latent_channels, height // f, width // f)

    def sample_latents(
        self,
        settings: SamplingSettings,
        noise: BatchNoise,
        cond: Conditioning,
        uncond: Conditioning | None,
        *,
        shape: Sequence[int] | None = None,
        init_latent: Tensor | None = None,
        strength: float = 1.0,
        keep_mask: Tensor | None = None,
        description: str = "sampling",
        refine: RefinerRun | None = None,
        tiled_decode: bool | None = None,
        control: ControlSet | None = None,
    ) -> Tensor:
        """Run the sampler under classifier-free guidance (skipped when ``uncond`` is None or scale 1);
        ``refine`` hands the last part of the schedule to a refiner model; ``control`` adds ControlNets'
        residuals to this model's UNet (pipelines/control.py). Refused first when sampling, and decoding
        the result (``tiled_decode``: in bands; default the pipeline's), cannot fit in memory."""
        batch, _channels, latent_height, latent_width = shape if init_latent is None else init_latent.shape
        guided = uncond is not None and settings.guidance_scale != 1.0
        check_sampling(self, batch, latent_width, latent_height, guided=guided, tiled_decode=tiled_decode)
        sigmas = sigmas_for(settings.sampler, self.schedule, settings.steps, scheduler=settings.scheduler,
                            model_kind=self.family.align_your_steps_table)
        network = self.unet_forward
        if control is not None:
            run = sigmas if init_latent is None else img2img_sigmas(sigmas, strength)
            network = control.layer(network, self.schedule, run, guided)
        denoiser = self.guided_denoiser(uncond, settings.guidance_scale, network=network)
        if refine is not None:
            refiner = refine.refiner
            refiner.check_fits(self)
            denoiser = HandOff(denoiser, refiner.pipe.guided_denoiser(refine.uncond, settings.guidance_scale),
                               refine.cond, self.schedule, refiner.switch_at)
        total = len(sigmas) - 1 if init_latent is None else max(int((len(sigmas) - 1) * strength), 0)

        def on_step(step: Step) -> None:
            bar.update(1)
            if settings.step_callback is not None:
                settings.step_callback(step, total)

        with _progress(total, description, self.progress) as bar, torch.no_grad():
            latents = sample(
                settings.sampler, denoiser, sigmas, noise, shape=shape, cond=cond, init_latent=init_latent,
                strength=strength, keep_mask=keep_mask, callback=on_step,
                dtype=self.dtype, device=self.device, schedule=self.schedule,
            )
        if not torch.isfinite(latents).all():
            raise FloatingPointError(
                "sampling produced NaN/inf latents" + (" (try without --half)" if self.dtype != torch.float32 else "")
            )
        return latents

    def guided_denoiser(self, uncond: Conditioning | None, guidance_scale: float,
                        network: Callable[..., Tensor] | None = None):
        """The model as a denoiser ``D(x, sigma, cond)``, under classifier-free guidance when it applies;
        ``network``: a layer over :attr:`unet_forward` to call instead of it."""
        denoiser = Denoiser(network or self.unet_forward, self.schedule, self.spec.prediction)
        if uncond is not None and guidance_scale != 1.0:
            denoiser = ClassifierFreeGuidance(denoiser, uncond, guidance_scale)
        return denoiser

    def run_batches(self, seed: int | None, batch_size: int, batch_count: int,
                    run_batch: Callable[[int, list[torch.Generator]], GenerationResult]) -> GenerationResult:
        """Call ``run_batch(first_seed, generators)`` per batch; image k of the whole run has seed ``seed + k``."""
        check_positive("batch size", batch_size)
        check_positive("batch count", batch_count)
        seed = resolve_seed(seed)
        if seed + batch_size * batch_count - 1 > MAX_SEED:
            raise ValueError(f"seed {seed} leaves no room for {batch_size * batch_count} images (seeds end at {MAX_SEED})")
        result = GenerationResult()
        self.prompt_warnings = []  # none left over from a run that failed
        from tqdm.auto import tqdm

        batches = tqdm(range(batch_count), desc="batches", unit="batch",
                       disable=batch_count == 1 or not self.progress or not sys.stderr.isatty())
        try:
            for index in batches:
                first = seed + index * batch_size
                result.extend(run_batch(first, make_generators(first, batch_size)))
                taken = [*self.mode_warnings, *self.addons.take_warnings(), *self.prompt_warnings]
                self.prompt_warnings = []
                result.warnings += [w for w in taken if w not in result.warnings]
        finally:
            cpu_heap.give_back_free_heap()  # what the generation's activations left free
        return result

    # ------------------------------------------------------------------ parameters text
    def parameters_text(self, prompt: str, negative_prompt: str, settings: SamplingSettings, seed: int,
                        width: int, height: int, extra: dict[str, Any] | None = None) -> str:
        """The A1111 ``parameters`` text for one image."""
        values: dict[str, Any] = {
            "Steps": settings.steps, "Sampler": settings.sampler.label,
            "Schedule type": None if settings.scheduler.is_automatic else settings.scheduler.label,
            "CFG scale": _number(settings.guidance_scale),
            "Seed": seed, "Size": f"{width}x{height}", "Model hash": self.hash, "Model": self.name,
        }
        if self.takes_text:
            values.update(self.addons.parameters(prompt, negative_prompt))
        values.update(extra or {})
        return format_parameters(prompt, negative_prompt, values)

    # ------------------------------------------------------------------ tasks
    def txt2img(self, prompt: str = "", **options) -> GenerationResult:
        from latent_diffusion.pipelines.txt2img import txt2img

        return txt2img(self, prompt, **options)

    def img2img(self, prompt: str = "", image: Image.Image | None = None, **options) -> GenerationResult:
        from latent_diffusion.pipelines.img2img import img2img

        return img2img(self, prompt, image, **options)

    def inpaint(self, prompt: str = "", image: Image.Image | None = None, mask: Image.Image | None = None,
                **options) -> GenerationResult:
        from latent_diffusion.pipelines.inpaint import inpaint

        return inpaint(self, prompt, image, mask, **options)

    def upscale(self, image: Image.Image | None = None, prompt: str = "", **options) -> GenerationResult:
        from latent_diffusion.pipelines.upscale import upscale

        return upscale(self, image, prompt, **options)

    def sample(self, **options) -> GenerationResult:
        from latent_diffusion.pipelines.sample import sample_classes

        return sample_classes(self, **options)


def _make_pipeline_lean(model: torch.nn.Module) -> None:
    """fp16 UNet and VAE weights computed block by block in fp32 (nn/lean.py); the text encoder in fp32."""
    from latent_diffusion.nn.lean import make_lean

    make_lean(model.unet)
    make_lean(model.first_stage_model)
    if model.condition_encoder is not None:
        model.condition_encoder.float()


def _decode_fp32(vae: torch.nn.Module, z: Tensor) -> Tensor:
    """Decode with an fp32 copy of the VAE (the half-precision weights stay as they are)."""
    import copy

    return copy.deepcopy(vae).float().decode(z)


def _number(value: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5" (as A1111 writes CFG scales)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
