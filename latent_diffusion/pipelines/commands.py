"""The generation commands of ``ldm`` (txt2img, img2img, inpaint, upscale, sample): options and runners.

Every input is read and checked before the model runs and before anything is written; images are
written atomically with their A1111 ``parameters`` chunk as soon as each batch is done.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from latent_diffusion.pipelines.control_cli import add_control_options, check_control_args, control_units
from latent_diffusion.pipelines.outputs import Writer, check_output_folder

DEFAULT_SAMPLER = "euler_a"
# img2img on a distilled model at a low strength: at most this many steps to reach one that runs.
MAX_DISTILLED_STEPS = 50


# ---------------------------------------------------------------------------------------------- options
def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", "-c", default=None,
                       help="model file (.safetensors/.ckpt) or diffusers folder; default: the built-in model "
                       "(for upscale: the built-in 16 -> 64 px shapes super-resolution model)")
    group.add_argument("--config", default=None,
                       help="CompVis inference YAML describing the checkpoint; default: CHECKPOINT.yaml if present")
    group.add_argument("--vae", default=None, help="separate VAE file that replaces the checkpoint's autoencoder")
    group.add_argument("--half", action="store_true",
                       help="keep the weights in float16 (decoding falls back to float32 on overflow); default fp32")
    group.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    group.add_argument("--tiled-vae", action="store_true",
                       help="decode in bands of rows: bounded memory for large images, the same image as without")
    group.add_argument("--lean", action="store_true",
                       help="keep UNet/VAE weights in float16 and compute in float32, block by block (about half the memory)")
    group.add_argument("--compile", action="store_true",
                       help="run the UNet compiled ahead of time with frozen weights (the same images; with --bf16 "
                            "its bf16 graph): a compile of a minute or more per image size and batch, kept on disk "
                            "($LDM_COMPILE_CACHE, default ~/.cache/latent-diffusion/compiled) for later runs")
    group.add_argument("--plain-weights", action="store_true",
                       help="on a CPU, run the layers on their weights as loaded instead of packing them for oneDNN "
                            "once (slower; the same images to float rounding)")
    group.add_argument("--bf16", action="store_true",
                       help="UNet in bfloat16 (products in bf16, sums in fp32), VAE decoded in bands: on CPUs with "
                            "AMX about a third of the time, about 29 dB from the exact image")
    group.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, mps)")
    add_addon_options(parser)


def add_addon_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "LoRAs and embeddings", "prompts name LoRAs as <lora:NAME:WEIGHT> (or <lora:NAME:TEXT_WEIGHT:UNET_WEIGHT>) "
                                "and textual-inversion embeddings by their file names")
    group.add_argument("--lora-dir", default=None, metavar="FOLDER",
                       help="folder of LoRA / LyCORIS files; default: MODELS/loras, where MODELS is $LDM_MODELS_DIR "
                            "or ./models")
    group.add_argument("--embeddings-dir", default=None, metavar="FOLDER",
                       help="folder of textual-inversion embeddings; default: MODELS/embeddings")


def add_sdxl_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SDXL")
    group.add_argument("--refiner", default=None, metavar="FILE",
                       help="a refiner model (.safetensors/.ckpt or diffusers folder) that finishes the image")
    group.add_argument("--refiner-switch-at", type=float, default=0.8, metavar="FRACTION",
                       help="where the refiner takes over, as a fraction of the noise schedule in (0, 1) (A1111: 0.8)")
    group.add_argument("--original-size", type=_size, default=None, metavar="WxH",
                       help="size conditioning: the size the model should think the image had; default: the image's")
    group.add_argument("--target-size", type=_size, default=None, metavar="WxH", help="size conditioning; default: the image's")
    group.add_argument("--crop-top-left", type=_size, default=None, metavar="TOPxLEFT",
                       help="crop conditioning in pixels; default 0x0 (an uncropped image)")
    group.add_argument("--aesthetic-score", type=float, default=6.0, help="refiner's score for the prompt (A1111: 6)")
    group.add_argument("--negative-aesthetic-score", type=float, default=2.5,
                       help="refiner's score for the negative prompt (A1111: 2.5)")


def _size(text: str) -> tuple[int, int]:
    """"1024x768" -> (1024, 768)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected two whole numbers as AxB (e.g. 1024x768), got {text!r}")
    return int(parts[0]), int(parts[1])


def _sdxl_kwargs(args: argparse.Namespace, pipe) -> dict[str, Any]:
    """The refiner and micro-conditioning keywords of txt2img and img2img."""
    from latent_diffusion.pipelines.refiner import Refiner
    from latent_diffusion.pipelines.text_conditioning import MicroConditioning

    micro = MicroConditioning(original_size=args.original_size, target_size=args.target_size,
                              crop_top_left=args.crop_top_left or (0, 0), aesthetic_score=args.aesthetic_score,
                              negative_aesthetic_score=args.negative_aesthetic_score)
    refiner = None
    if args.refiner is not None:
        from latent_diffusion.pipelines.common import Pipeline

        refiner = Refiner(Pipeline.from_checkpoint(args.refiner, device=args.device, progress=not args.quiet,
                                                   half=args.half, tiled_vae=args.tiled_vae, lean=args.lean),
                          args.refiner_switch_at)
        refiner.check_fits(pipe)
    return dict(micro_conditioning=None if micro == MicroConditioning() else micro, refiner=refiner)


def _check_sdxl_options(args: argparse.Namespace) -> None:
    """Refiner options that need no model, checked before the slow load."""
    if getattr(args, "refiner", None) is None:
        return
    from pathlib import Path

    if not 0.0 < args.refiner_switch_at < 1.0:
        raise ValueError(f"--refiner-switch-at must lie strictly between 0 and 1, got {args.refiner_switch_at}")
    if not Path(args.refiner).exists():
        raise FileNotFoundError(f"refiner not found: {args.refiner}")


# The built-in model's text-to-image guidance: in two draws of `ldm eval-shapes --spoken-prompts 40`
# (seeds 0 and 7), guidance 2 against 3 drew shapes the geometric judge accepts in 88.7% / 90.8% of
# scenes against 86.2% / 84.2%, the classifier's scores level (MODEL_CARD.md, sampling settings).
BUILTIN_TXT2IMG_GUIDANCE = 2.0


def add_sampling_options(parser: argparse.ArgumentParser, *, guidance: float, builtin_guidance: float = 3.0,
                         sampler: str = DEFAULT_SAMPLER) -> None:
    """``guidance``: the default for a checkpoint; ``builtin_guidance``: for the built-in models, which were
    measured best at 2-3 (MODEL_CARD.md) where Stable Diffusion's 7.5 oversaturates them."""
    group = parser.add_argument_group("sampling")
    parser.set_defaults(default_guidance=guidance, builtin_guidance=builtin_guidance)
    group.add_argument("--sampler", default=sampler, help="sampler name or A1111 label; see `ldm samplers`")
    group.add_argument("--scheduler", default=None,
                       help="sigma schedule (A1111's schedule type: karras, exponential, align_your_steps, ...); "
                            "default: the sampler's own (Automatic); see `ldm samplers`")
    group.add_argument("--steps", type=int, default=None,
                       help="sampling steps; default: the sampler's (20, or 50 for ddim/plms; 1 for a Turbo model)")
    group.add_argument("--cfg-scale", "--guidance-scale", dest="guidance_scale", type=float, default=None,
                       help=f"classifier-free guidance scale (1 = no guidance); default: {guidance:g}, "
                            f"or {builtin_guidance:g} with the built-in model")
    group.add_argument("--seed", type=int, default=-1, help="seed of the first image (image k uses seed+k); -1 = random")
    group.add_argument("--batch-size", type=int, default=1, help="images generated together")
    group.add_argument("--batch-count", "--n-iter", dest="batch_count", type=int, default=1, help="batches per prompt")


def add_output_options(parser: argparse.ArgumentParser, command: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--outdir", "-o", default=f"outputs/{command}", help="folder for the PNG files")
    group.add_argument("--grid", action="store_true", help="also save a grid of all images")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress bars, no file list")


def add_prompt_options(parser: argparse.ArgumentParser, *, clip_skip: bool = True) -> None:
    parser.add_argument("prompt_text", nargs="?", default=None, metavar="PROMPT",
                        help="the prompt (the same as --prompt)")
    group = parser.add_argument_group("prompt")
    group.add_argument("--prompt", "-p", default="",
                       help="prompt; A1111 emphasis: (word:1.3), (word) x1.1, [word] /1.1, BREAK; any length")
    group.add_argument("--negative-prompt", "-n", default="", help="negative prompt (empty: the empty prompt)")
    group.add_argument("--prompts-file", default=None, help="text file with one prompt per line (replaces --prompt)")
    if clip_skip:
        group.add_argument("--clip-skip", type=int, default=None,
                           help="A1111 clip skip: 2 = penultimate CLIP layer; default: the model's own")


def add_hires_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "hires fix", "generate at the given size, enlarge, then redraw at the larger size (A1111's hires fix); "
                     "on with --hires-scale, --hires-width or --hires-height")
    group.add_argument("--hires-scale", metavar="FACTOR", type=float, default=None,
                       help="enlarge the first pass by this factor (1-4]")
    group.add_argument("--hires-width", metavar="PX", type=int, default=None,
                       help="target width (multiple of 8) instead of --hires-scale; alone it keeps the aspect ratio")
    group.add_argument("--hires-height", metavar="PX", type=int, default=None,
                       help="target height (multiple of 8); with --hires-width the centre of the enlarged "
                            "image is kept")
    group.add_argument("--hires-upscaler", metavar="NAME", default=None,
                       help="Latent (default), Latent (antialiased|bicubic|bicubic antialiased|nearest|nearest-exact), "
                            "None, Lanczos, Nearest, or a super-resolution checkpoint (a file, or the built-in "
                            "shapes-sr)")
    group.add_argument("--hires-steps", metavar="N", type=int, default=None,
                       help="steps the second pass runs; default 0: as many as the first pass")
    group.add_argument("--hires-denoise", metavar="STRENGTH", type=float, default=None,
                       help="denoising strength of the second pass in [0, 1]; default 0.7")
    group.add_argument("--hires-sampler", metavar="NAME", default=None,
                       help="the second pass's sampler; default: --sampler")
    group.add_argument("--hires-scheduler", metavar="NAME", default=None,
                       help="the second pass's scheduler; default: --scheduler")
    group.add_argument("--hires-prompt", metavar="TEXT", default=None,
                       help="the second pass's prompt; default: the prompt")
    group.add_argument("--hires-negative-prompt", metavar="TEXT", default=None,
                       help="the second pass's negative prompt; default: the negative prompt")


# ---------------------------------------------------------------------------------------------- helpers
def read_prompts(args: argparse.Namespace) -> list[str]:
    if getattr(args, "prompts_file", None) is None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


def _load_image_arg(path: str | None, what: str):
    from latent_diffusion.pipelines.images import load_image

    if path is None:
        raise ValueError(f"--{what.replace(' ', '-')} is required")
    return load_image(path, what=what)


def _pipeline(args: argparse.Namespace):
    from latent_diffusion.pipelines.common import Pipeline

    return Pipeline.from_checkpoint(args.checkpoint, vae=args.vae, config_yaml=args.config, half=args.half,
                                    use_ema=args.ema, device=args.device, progress=not args.quiet,
                                    tiled_vae=args.tiled_vae, lean=args.lean,
                                    compile_unet=args.compile, bf16=args.bf16, lora_dir=args.lora_dir,
                                    embeddings_dir=args.embeddings_dir, packed=False if args.plain_weights else None)


def _guidance(args: argparse.Namespace, pipe=None) -> float:
    """The CFG scale asked for; else a few-step distilled model's (1: none), the built-in models' (measured
    best), a released family's own (SD 7.5, SDXL 5), or the command's default for models trained here."""
    if args.guidance_scale is not None:
        return args.guidance_scale
    if pipe is not None and pipe.sampling_defaults is not None:
        return pipe.sampling_defaults.guidance_scale
    if getattr(args, "checkpoint", None) is None:
        return args.builtin_guidance
    if pipe is not None and pipe.family.preset is not None:
        return pipe.family.default_guidance
    return args.default_guidance


def _sampling_kwargs(args: argparse.Namespace, pipe=None) -> dict[str, Any]:
    chosen = dict(sampler=args.sampler, scheduler=args.scheduler, steps=args.steps,
                  guidance_scale=_guidance(args, pipe), batch_size=args.batch_size, batch_count=args.batch_count)
    return {**chosen, **_distilled_defaults(args, pipe)}


def _distilled_defaults(args: argparse.Namespace, pipe=None) -> dict[str, Any]:
    """Steps and scheduler of a few-step distilled model (families/distilled.py) where none were asked
    for (a sampler name that carries its scheduler, "DPM++ 2M Karras", keeps that one). img2img runs
    the last ``int(steps * strength)`` steps, so its steps are raised until that is at least one."""
    from latent_diffusion.diffusion.registry import resolve_sampler

    defaults = None if pipe is None else pipe.sampling_defaults
    if defaults is None:
        return {}
    chosen = {}
    if args.steps is None:
        strength = getattr(args, "strength", 1.0)
        steps = defaults.steps
        while 0 < strength and int(steps * strength) < 1 and steps < MAX_DISTILLED_STEPS:
            steps += 1
        chosen["steps"] = steps
    if args.scheduler is None and resolve_sampler(args.sampler)[1].is_automatic:
        chosen["scheduler"] = defaults.scheduler
    return chosen


def _check_common(args: argparse.Namespace) -> None:
    """Checks that need no model, so that bad options fail before a slow load."""
    from latent_diffusion.diffusion.registry import resolve_sampler
    from latent_diffusion.pipelines.common import resolve_seed
    from latent_diffusion.pipelines.device import check_device

    resolve_sampler(args.sampler, args.scheduler)
    check_device(args.device)
    if getattr(args, "outdir", None) is not None:
        check_output_folder(args.outdir)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    for name in ("batch_size", "batch_count"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _check_sdxl_options(args)
    _check_prompt_addons(args)
    args.seed = resolve_seed(args.seed)


def _check_prompt_addons(args: argparse.Namespace) -> None:
    """The LoRA and embedding folders exist, and every ``<lora:...>`` of the prompts is readable and
    found, before the slow load."""
    from latent_diffusion.addons.embeddings import EmbeddingLibrary
    from latent_diffusion.addons.library import LoraLibrary
    from latent_diffusion.pipelines.prompt_addons import PromptAddons

    EmbeddingLibrary(args.embeddings_dir)
    loras = LoraLibrary(args.lora_dir)
    texts = read_prompts(args) if hasattr(args, "prompt") else []
    texts += [getattr(args, name, None) or "" for name in ("negative_prompt", "hires_prompt", "hires_negative_prompt",
                                                           "lora_tags")]
    for tag in PromptAddons.tags(*texts):
        loras.path_of(tag.name)


def _run_prompts(args: argparse.Namespace, task: Callable[..., Any], **inputs: Any) -> None:
    """Run ``task(prompt, seed=...)`` for each prompt; prompt j continues the seeds where j-1 stopped."""
    prompts = read_prompts(args)
    writer = Writer(args.outdir, args.quiet)
    per_prompt = args.batch_size * args.batch_count
    for index, prompt in enumerate(prompts):
        writer.save(task(prompt, seed=args.seed + index * per_prompt, **inputs))
    if args.grid:
        writer.save_grid()


def _take_positional_prompt(args: argparse.Namespace) -> None:
    """``ldm txt2img "a red circle"``: the positional prompt, which may not contradict --prompt."""
    text = getattr(args, "prompt_text", None)
    if text is None:
        return
    if args.prompt and args.prompt != text:
        raise ValueError("give the prompt either as the positional PROMPT or as --prompt, not both")
    args.prompt = text


def _check_given_size(args: argparse.Namespace) -> None:
    """-W/-H as given. 0 is an error rather than "the default size", which is what leaving them out means."""
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} {value}: give a positive multiple of 8, or leave {flag} out for the default")


_HIRES_DETAILS = ("hires_upscaler", "hires_steps", "hires_denoise", "hires_sampler", "hires_scheduler",
                  "hires_prompt", "hires_negative_prompt")


def _hires_requested(args: argparse.Namespace) -> bool:
    """Whether the hires fix is on; its other options without a target are refused."""
    if args.hires_scale is not None or args.hires_width is not None or args.hires_height is not None:
        return True
    stray = [name for name in _HIRES_DETAILS if getattr(args, name) is not None]
    if stray:
        raise ValueError(f"--{stray[0].replace('_', '-')} needs --hires-scale or --hires-width/--hires-height")
    return False


def _hires_fix(args: argparse.Namespace, upscaler):
    """The hires fix the options ask for, checked (``upscaler``: a name or a loaded super-resolution model)."""
    from latent_diffusion.pipelines.hires import DEFAULT_DENOISING_STRENGTH, HiresFix

    return HiresFix(
        scale=args.hires_scale if args.hires_scale is not None else 2.0, upscaler=upscaler,
        steps=args.hires_steps or 0, resize_x=args.hires_width or 0, resize_y=args.hires_height or 0,
        denoising_strength=DEFAULT_DENOISING_STRENGTH if args.hires_denoise is None else args.hires_denoise,
        sampler=args.hires_sampler, scheduler=args.hires_scheduler, prompt=args.hires_prompt or "",
        negative_prompt=args.hires_negative_prompt or "")


def _hires_upscaler_source(name: str | None) -> str | Path:
    """A built-in upscaler's name, or the super-resolution checkpoint that ``--hires-upscaler`` names."""
    from latent_diffusion.pipelines.common import default_upscaler_path
    from latent_diffusion.pipelines.hires import DEFAULT_UPSCALER, unknown_upscaler, upscaler_names

    name = DEFAULT_UPSCALER if name is None else name
    if name in upscaler_names():
        return name
    if Path(name).exists():
        return Path(name)
    try:
        builtin = default_upscaler_path()
    except FileNotFoundError:
        builtin = None
    if builtin is not None and name == builtin.stem:
        return builtin
    raise unknown_upscaler(name, [builtin.stem] if builtin is not None else [],
                           "the path of a super-resolution checkpoint")


def _check_hires(args: argparse.Namespace) -> str | Path | None:
    """The hires options checked before any model loads; the upscaler to use (None: no hires fix)."""
    from latent_diffusion.pipelines.hires import DEFAULT_UPSCALER, checked_target_sizes

    if not _hires_requested(args):
        return None
    source = _hires_upscaler_source(args.hires_upscaler)
    # A super-resolution model is loaded after the main one; its numbers are checked now.
    hires = _hires_fix(args, source if isinstance(source, str) else DEFAULT_UPSCALER)
    if args.width is not None and args.height is not None:
        checked_target_sizes(hires, args.width, args.height)
    return source


def _load_hires(args: argparse.Namespace, source: str | Path | None):
    """The hires fix with its upscaler loaded (None without one)."""
    if source is None:
        return None
    if isinstance(source, Path):
        from latent_diffusion.pipelines.common import Pipeline

        source = Pipeline.from_checkpoint(source, half=args.half, device=args.device, progress=not args.quiet)
    return _hires_fix(args, source)


def native_image_size(pipe) -> int:
    """Default image side: the family's (512 for SD 1.x, 1024 for SDXL; a model of ours: its training size),
    or a distilled model's own (SDXL-Turbo: 512)."""
    if pipe.sampling_defaults is not None:
        return pipe.sampling_defaults.image_size
    return pipe.family.native_image_size(pipe.spec)


# ---------------------------------------------------------------------------------------------- commands
def cmd_txt2img(args: argparse.Namespace) -> None:
    from latent_diffusion.pipelines.images import check_size

    _take_positional_prompt(args)
    if args.from_png:
        apply_png_parameters(args)
    _check_common(args)
    _check_given_size(args)
    if args.width is not None or args.height is not None:
        check_size(args.width or 64, args.height or 64)
    hires_upscaler = _check_hires(args)
    controls = check_control_args(args)
    read_prompts(args)
    pipe = _pipeline(args)
    hires = _load_hires(args, hires_upscaler)
    control = control_units(controls, pipe)
    args.width, args.height = args.width or native_image_size(pipe), args.height or native_image_size(pipe)
    check_size(args.width, args.height)
    _run_prompts(args, lambda prompt, **kw: pipe.txt2img(
        prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        clip_skip=args.clip_skip, hires=hires, control=control, **_sdxl_kwargs(args, pipe),
        **_sampling_kwargs(args, pipe), **kw))


def cmd_img2img(args: argparse.Namespace) -> None:
    from latent_diffusion.pipelines.images import check_size, to_rgb

    _take_positional_prompt(args)
    _check_common(args)
    _check_given_size(args)
    image = to_rgb(_load_image_arg(args.init_image, "init image"), what="init image")
    if args.width or args.height:
        check_size(args.width or image.width, args.height or image.height)
    else:
        check_size(*image.size)
    controls = check_control_args(args)
    read_prompts(args)
    pipe = _pipeline(args)
    control = control_units(controls, pipe)
    _run_prompts(args, lambda prompt, **kw: pipe.img2img(
        prompt, image, negative_prompt=args.negative_prompt, strength=args.strength, width=args.width,
        height=args.height, clip_skip=args.clip_skip, control=control, **_sdxl_kwargs(args, pipe),
        **_sampling_kwargs(args, pipe), **kw))


def cmd_inpaint(args: argparse.Namespace) -> None:
    from latent_diffusion.pipelines.images import check_size, to_rgb
    from latent_diffusion.pipelines.inpaint import prepare_mask

    _take_positional_prompt(args)
    _check_common(args)
    image = to_rgb(_load_image_arg(args.image, "image"), what="image")
    mask = _load_image_arg(args.mask, "mask")
    check_size(*image.size)
    prepare_mask(mask, image.size, blur=args.mask_blur, padding=args.mask_padding)
    controls = check_control_args(args)
    read_prompts(args)
    pipe = _pipeline(args)
    control = control_units(controls, pipe)
    _run_prompts(args, lambda prompt, **kw: pipe.inpaint(
        prompt, image, mask, negative_prompt=args.negative_prompt, mask_blur=args.mask_blur,
        mask_padding=args.mask_padding, keep_unmasked=args.keep_unmasked, strength=args.strength,
        clip_skip=args.clip_skip, control=control, **_sampling_kwargs(args, pipe), **kw))


def cmd_upscale(args: argparse.Namespace) -> None:
    from latent_diffusion.pipelines.images import to_rgb

    _take_positional_prompt(args)
    _check_common(args)
    image = to_rgb(_load_image_arg(args.image, "image"), what="image")
    read_prompts(args)
    if args.checkpoint is None:
        from latent_diffusion.pipelines.common import BUILTIN_UPSCALER_INPUT, default_upscaler_path

        if max(image.size) > BUILTIN_UPSCALER_INPUT:
            side = BUILTIN_UPSCALER_INPUT
            raise ValueError(f"the built-in upscaler turns {side}x{side} shapes images into {4 * side}x{4 * side} and "
                             f"recolours anything larger; {args.image} is {image.size[0]}x{image.size[1]}: give an "
                             f"image of at most {side}x{side}, or --checkpoint with another super-resolution model")
        args.guidance_scale = _guidance(args)  # the built-in model's, before its path replaces None
        args.checkpoint = str(default_upscaler_path())
    pipe = _pipeline(args)
    _run_prompts(args, lambda prompt, **kw: pipe.upscale(
        image, prompt, negative_prompt=args.negative_prompt, noise_level=args.noise_level,
        tile_size=args.tile_size, tile_overlap=args.tile_overlap, clip_skip=args.clip_skip,
        **_sampling_kwargs(args, pipe), **kw))


def cmd_sample(args: argparse.Namespace) -> None:
    from latent_diffusion.pipelines.images import check_size

    _check_common(args)
    check_size(args.width, args.height)
    pipe = _pipeline(args)
    writer = Writer(args.outdir, args.quiet)
    writer.save(pipe.sample(class_ids=args.class_ids, width=args.width, height=args.height, seed=args.seed,
                            **_sampling_kwargs(args, pipe)))
    if args.grid:
        writer.save_grid()


def cmd_eval_shapes(args: argparse.Namespace) -> None:
    from latent_diffusion.evaluation.shapes_eval import (
        describe_reading, evaluate_generator, fixed_prompt_set, format_failures, format_report, read_prompt_file,
        rendering_generator, spoken_prompt_set,
    )
    from latent_diffusion.pipelines.images import check_size

    args.lora_tags = "".join(f" <lora:{tag}>" for tag in args.lora)  # read by _check_common
    _check_common(args)
    check_size(args.size, args.size)
    counts = args.prompts_per_group
    if counts is not None and counts < 1:
        raise ValueError(f"--prompts-per-group must be >= 1, got {counts}")
    if args.prompts and counts:
        raise ValueError("--prompts and --prompts-per-group exclude each other")
    if args.spoken_prompts < 0:
        raise ValueError(f"--spoken-prompts must be >= 0, got {args.spoken_prompts}")
    if args.save_failures:  # checked before the minutes of generating, never written over
        check_output_folder(args.save_failures)
        if (Path(args.save_failures) / "failures.txt").exists():
            raise ValueError(f"--save-failures {args.save_failures} holds an earlier run's failures: pick another folder")
    if args.prompts:
        prompts = read_prompt_file(args.prompts)
    else:
        prompts = fixed_prompt_set(counts, counts, counts) if counts else fixed_prompt_set()
    prompts += spoken_prompt_set(args.spoken_prompts, seed=args.prompt_seed) if args.spoken_prompts else []
    if args.control is not None:
        _eval_shapes_control(args)
        return
    psnrs: list[float] = []  # the round trip's, image by image
    if args.renderer or args.round_trip:
        generate = rendering_generator(seed=args.seed, resolution=args.size)
        if args.round_trip:
            generate = _through_first_stage(_pipeline(args), generate, psnrs)
    else:
        pipe = _pipeline(args)
        counter = iter(range(args.seed, args.seed + 10**9))

        def generate(caption: str):
            return pipe.txt2img(caption + args.lora_tags, width=args.size, height=args.size, steps=args.steps,
                                sampler=args.sampler, scheduler=args.scheduler, guidance_scale=_guidance(args, pipe), seed=next(counter)).images[0]

    evaluation = evaluate_generator(generate, prompts=prompts, images_per_prompt=args.images_per_prompt, seed=args.seed,
                                    judge=args.judge)
    if args.json:
        import json

        judged = {"judge": evaluation.judge}
        if evaluation.judge == "both":
            judged.update(geometric_accuracy=evaluation.geometric_accuracy, agreement=evaluation.agreement)
        if psnrs:
            judged["round_trip_psnr"] = statistics.mean(psnrs)
        if args.show_failures:
            judged["failures"] = [{"caption": f.caption, "group": f.group, "failed_by": list(f.failed_by),
                                   "readings": {judge: describe_reading(r) for judge, r in f.readings.items()}}
                                  for f in evaluation.failures]
        print(json.dumps({"accuracy": evaluation.accuracy, "frechet_distance": evaluation.frechet_distance,
                          "images": evaluation.image_count, "references": evaluation.reference_count, **judged},
                         indent=2))
    else:
        print(format_report(evaluation))
        if psnrs:
            print(f"round trip: PSNR {statistics.mean(psnrs):.1f} dB against the renders (mean of {len(psnrs)})")
    if args.show_failures and not args.json:
        print(format_failures(evaluation))
    if args.save_failures:
        _save_failures(evaluation, Path(args.save_failures))


def _save_failures(evaluation, folder: Path) -> None:
    """Each failed image as NUMBER.png (its number in ``format_failures``' list), the list beside them."""
    from PIL import Image

    from latent_diffusion.data.shapes import tensor_to_image
    from latent_diffusion.evaluation.shapes_eval import format_failures

    folder.mkdir(parents=True, exist_ok=True)
    for number, failure in enumerate(evaluation.failures):
        Image.fromarray(tensor_to_image(failure.image)).save(folder / f"{number:03d}.png")
    (folder / "failures.txt").write_text(format_failures(evaluation) + "\n")
    print(f"{len(evaluation.failures)} failed images written to {folder}", file=sys.stderr)


def _through_first_stage(pipe, generate: Callable[[str], torch.Tensor],
                         psnrs: list[float] | None = None) -> Callable[[str], torch.Tensor]:
    """``generate``'s images encoded by ``pipe``'s first stage and decoded again (posterior means);
    each one's PSNR against the image it came from is appended to ``psnrs``."""
    def round_trip(caption: str) -> torch.Tensor:
        image = generate(caption)[None]
        decoded = pipe.decode(pipe.encode_images(image, None))[0].clamp(-1, 1)
        if psnrs is not None:
            from latent_diffusion.training.metrics import psnr

            psnrs.append(float(psnr((decoded[None] + 1) / 2, (image + 1) / 2)))  # metrics take [0, 1]
        return decoded

    return round_trip


def _eval_shapes_control(args: argparse.Namespace) -> None:
    """``eval-shapes --control FILE``: maps put the object at P, prompts at Q; scored with and without the ControlNet."""
    from latent_diffusion.evaluation.shapes_classifier import load_shapes_classifier
    from latent_diffusion.evaluation.shapes_control import control_cases, evaluate_control, format_control_report
    from latent_diffusion.pipelines.control import ControlUnit, load_controlnet_for, unit_settings

    if args.renderer or args.round_trip:
        option = "--renderer" if args.renderer else "--round-trip"
        raise ValueError(f"{option} and --control exclude each other: the renderer has no ControlNet to score")
    if not Path(args.control).exists():
        raise FileNotFoundError(f"--control {args.control}: ControlNet not found")
    cases = control_cases(args.control_cases, seed=2024 + args.seed)
    settings = unit_settings(weight=args.control_weight, control_mode=args.control_mode)
    pipe = _pipeline(args)
    controlnet = load_controlnet_for(pipe, args.control)
    classifier = load_shapes_classifier()
    results = {}
    for label, with_control in (("with ControlNet", True), ("without (baseline)", False)):
        def generate(caption, control_map, index):
            control = [ControlUnit(controlnet, control_map, **settings)] if with_control else None
            return pipe.txt2img(caption + args.lora_tags, width=args.size, height=args.size, steps=args.steps,
                                sampler=args.sampler,
                                scheduler=args.scheduler, guidance_scale=_guidance(args, pipe), seed=args.seed + index,
                                control=control).images[0]

        results[label] = evaluate_control(generate, cases, classifier, size=args.size, seed=args.seed)
    if args.json:
        import json

        print(json.dumps({"cases": len(cases), "results": results}, indent=2))
    else:
        print(format_control_report(results, len(cases)))


def apply_png_parameters(args: argparse.Namespace) -> None:
    """Take prompt, negative prompt, steps, sampler, schedule type, CFG scale, seed, size, clip skip and the
    hires fix from a PNG."""
    from latent_diffusion.pipelines.png_info import parse_parameters, read_png_parameters

    text = read_png_parameters(args.from_png)
    if not text:
        raise ValueError(f"{args.from_png} holds no generation parameters")
    prompt, negative, settings = parse_parameters(text)
    args.prompt, args.negative_prompt, args.prompts_file = prompt, negative, None
    try:
        if "Size" in settings:
            args.width, args.height = (int(v) for v in settings["Size"].split("x"))
        args.steps = int(settings.get("Steps", args.steps or 0)) or None
        args.sampler = settings.get("Sampler", args.sampler)
        args.scheduler = settings.get("Schedule type", args.scheduler)
        args.guidance_scale = float(settings.get("CFG scale", _guidance(args)))
        args.seed = int(settings.get("Seed", args.seed))
        args.clip_skip = int(settings["Clip skip"]) if "Clip skip" in settings else args.clip_skip
        _apply_png_hires(args, settings)
    except ValueError as error:
        raise ValueError(f"{args.from_png}: unreadable generation parameters ({error})") from None


def _apply_png_hires(args: argparse.Namespace, settings: dict[str, str]) -> None:
    """The hires fix of a PNG's parameters (A1111's keys), when it was made with one."""
    if "Hires upscale" not in settings and "Hires resize" not in settings:
        return
    args.hires_scale = args.hires_width = args.hires_height = None
    if "Hires resize" in settings:
        width, height = (int(v) for v in settings["Hires resize"].split("x"))
        args.hires_width, args.hires_height = width or None, height or None
    else:
        args.hires_scale = float(settings["Hires upscale"])
    args.hires_upscaler = settings.get("Hires upscaler")
    args.hires_steps = int(settings.get("Hires steps", 0))
    args.hires_denoise = float(settings["Denoising strength"]) if "Denoising strength" in settings else None
    args.hires_sampler, args.hires_scheduler = settings.get("Hires sampler"), settings.get("Hires schedule type")
    args.hires_prompt, args.hires_negative_prompt = settings.get("Hires prompt"), settings.get("Hires negative prompt")


def add_task_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register txt2img, img2img, inpaint, upscale and sample with ``add(name, func, help)``."""
    p = add("txt2img", cmd_txt2img, "Generate images from a text prompt.")
    add_prompt_options(p)
    p.add_argument("--width", "-W", type=int, default=None,
                   help="image width in pixels (multiple of 8); default: the model's native size")
    p.add_argument("--height", "-H", type=int, default=None,
                   help="image height in pixels (multiple of 8); default: the model's native size")
    p.add_argument("--from-png", default=None,
                   help="regenerate a PNG written by ldm/A1111: its prompt, seed, size, sampler, schedule type, steps, "
                        "CFG, hires fix")
    add_sampling_options(p, guidance=7.5, builtin_guidance=BUILTIN_TXT2IMG_GUIDANCE)
    add_hires_options(p)
    add_control_options(p)
    add_model_options(p)
    add_sdxl_options(p)
    add_output_options(p, "txt2img")

    p = add("img2img", cmd_img2img, "Redraw an image towards a prompt (SDEdit).")
    add_prompt_options(p)
    p.add_argument("--init-image", "-i", required=True, help="the starting image")
    p.add_argument("--strength", type=float, default=0.75, help="denoising strength in (0, 1]: 1 ignores the image")
    p.add_argument("--width", "-W", type=int, default=None, help="resize the image to this width; default: its own")
    p.add_argument("--height", "-H", type=int, default=None, help="resize the image to this height; default: its own")
    add_sampling_options(p, guidance=7.5)
    add_control_options(p)
    add_model_options(p)
    add_sdxl_options(p)
    add_output_options(p, "img2img")

    p = add("inpaint", cmd_inpaint, "Repaint the white part of a mask (inpainting or ordinary models).")
    add_prompt_options(p)
    p.add_argument("--image", "-i", required=True, help="the image to edit (sides multiples of 8)")
    p.add_argument("--mask", "-m", required=True, help="mask of the same size: white = repaint (or opaque strokes on a transparent layer)")
    p.add_argument("--mask-blur", type=float, default=4.0, help="Gaussian blur radius of the mask in pixels (A1111's 4)")
    p.add_argument("--mask-padding", type=int, default=0, help="grow the mask by this many pixels first")
    p.add_argument("--keep-unmasked", action="store_true",
                   help="paste the original pixels back outside the (blurred) mask, so they stay exact")
    p.add_argument("--strength", type=float, default=1.0, help="denoising strength in (0, 1]")
    add_sampling_options(p, guidance=7.5)
    add_control_options(p)
    add_model_options(p)
    add_output_options(p, "inpaint")

    p = add("upscale", cmd_upscale, "Upscale an image with the SD x4 upscaler or an LDM super-resolution model.")
    add_prompt_options(p)
    p.add_argument("--image", "-i", required=True, help="the low-resolution image")
    p.add_argument("--noise-level", type=int, default=20, help="noise augmentation of the input (x4 upscaler), 0-350")
    p.add_argument("--tile-size", type=int, default=None, help="process in tiles of this many input pixels; default: whole")
    p.add_argument("--tile-overlap", type=int, default=16, help="overlap of neighbouring tiles in input pixels")
    add_sampling_options(p, guidance=9.0, builtin_guidance=1.0)
    add_model_options(p)
    add_output_options(p, "upscale")

    _add_eval_shapes_parser(add)
    p = add("sample", cmd_sample, "Class-conditional or unconditional sampling (latent-diffusion models).")
    p.add_argument("--class-ids", type=int, nargs="+", default=None, help="class id(s), cycled over the images")
    p.add_argument("--width", "-W", type=int, default=256, help="image width in pixels (multiple of 8)")
    p.add_argument("--height", "-H", type=int, default=256, help="image height in pixels (multiple of 8)")
    add_sampling_options(p, guidance=1.0)
    add_model_options(p)
    add_output_options(p, "sample")


def _add_eval_shapes_parser(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("eval-shapes", cmd_eval_shapes,
            "Score a text-to-image model on the shapes world: per-attribute accuracy and a Fréchet distance.")
    p.add_argument("--renderer", action="store_true",
                   help="score the perfect renderer instead of a model (the ceiling of the scores)")
    p.add_argument("--round-trip", action="store_true",
                   help="score the perfect renderer's images sent through the model's autoencoder and back "
                        "(the ceiling its first stage allows)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images generated per evaluation prompt")
    p.add_argument("--prompts-per-group", type=int, default=None,
                   help="prompts per group (one object, two objects, held-out pairs); default: the full fixed set")
    p.add_argument("--spoken-prompts", type=int, default=0, metavar="N",
                   help="also N captions as people write them per spoken group (one object, two in a relation, "
                        "three, counts, no place at all, held-out pairs), scored on what they state")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="score these prompts instead of the fixed set: one a line, 'PROMPT | CAPTION' where CAPTION "
                        "in the shapes grammar names the scene asked for (e.g. a new word's meaning)")
    p.add_argument("--prompt-seed", type=int, default=2025,
                   help="the draw of --spoken-prompts captions (the image seeds are --seed's)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--show-failures", action="store_true",
                   help="list every image a judge failed, with each judge's reading (with --json: as 'failures')")
    p.add_argument("--save-failures", default=None, metavar="DIR",
                   help="write every image a judge failed to DIR (NUMBER.png, and the list as failures.txt)")
    p.add_argument("--judge", choices=("classifier", "geometric", "both"), default="classifier",
                   help="who reads the images: the learned classifier, geometric measurements (nothing learned), "
                        "or both, with how often they agree")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]",
                   help="a LoRA of --lora-dir applied to every prompt, as <lora:NAME:WEIGHT> would (repeatable)")
    p.add_argument("--control", default=None, metavar="FILE",
                   help="score a canny ControlNet instead: maps put the object at one position, prompts at another; "
                        "reports where it lands with and without the ControlNet")
    p.add_argument("--control-cases", type=int, default=60, help="number of cases with --control")
    p.add_argument("--control-weight", type=float, default=1.0, help="the ControlNet's weight with --control (0-2)")
    p.add_argument("--control-mode", default="balanced",
                   help="with --control: balanced, prompt (my prompt is more important) or control (ControlNet is more "
                        "important)")
    # Whatever file it scores is a shapes-world model trained here: scored at the built-in model's own
    # guidance (MODEL_CARD.md), as SD's 7.5 oversaturates their colours.
    add_sampling_options(p, guidance=BUILTIN_TXT2IMG_GUIDANCE, builtin_guidance=BUILTIN_TXT2IMG_GUIDANCE)
    p.set_defaults(seed=0, batch_size=1, batch_count=1)
    add_model_options(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
