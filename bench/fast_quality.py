"""Fast modes' images against the exact fp32 image of the same model, prompt and seed: PSNR and time.

Only the UNet differs between the rows: the same text conditioning, sampler (DPM++ 2M, 20 steps),
noise and VAE decode (ours, fp32) make every image, so the PSNR is what the UNet's precision costs.

Rows: ``exact`` (ours, fp32; the reference), ``ours-bf16`` (``--bf16``), ``ours-compiled``
(``--compile``: fp32, compiled ahead of time; its first image includes the compile, or loading the
package a previous run left in the disk cache), ``ours-bf16-compiled`` (both), ``openvino`` (our UNet
converted by ``openvino.convert_model``, OpenVINO's default precision: bf16 where the CPU has it)
and ``openvino-f32`` (the same, f32 precision hint). OpenVINO is a peer only (``pip install openvino``).
Seconds are per image, median (the rows run one after another, not alternating; the first image of
each row includes its first call); the OpenVINO conversion is timed apart. Reported, not asserted.

    python bench/fast_quality.py                           # the built-in model, 64 px
    python bench/fast_quality.py --model sd15 --images 1   # full-size SD 1.5, random weights, 256 px
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.few_step import BUILTIN_GUIDANCE, BUILTIN_PROMPTS, SD_PROMPTS, psnr  # noqa: E402
from bench.results_file import write_table  # noqa: E402

ROWS = ("exact", "ours-bf16", "ours-compiled", "ours-bf16-compiled", "openvino", "openvino-f32")


class _UNetGraph(torch.nn.Module):
    """Our UNet with positional inputs, as ``openvino.convert_model`` traces it."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, context)


def openvino_unet(pipe, precision: str, size: int, prompt: str):
    """``pipe``'s UNet compiled by OpenVINO (conversion traced on a real call); (callable, seconds)."""
    import openvino as ov

    captured = {}

    def capture(x, t, context=None, y=None):
        captured.setdefault("inputs", (x, t, context))
        return pipe.model.unet(x, t, context, y)

    network, pipe.unet_forward = pipe.unet_forward, capture
    pipe.txt2img(prompt, steps=1, width=size, height=size, seed=0, sampler="euler")
    pipe.unet_forward = network
    started = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(_UNetGraph(pipe.model.unet.eval()), example_input=captured["inputs"])
    config = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}
    compiled = ov.Core().compile_model(model, "CPU", config)

    def call(x, t, context=None, y=None):
        return torch.from_numpy(compiled([x.numpy(), t.numpy(), context.numpy()])[0].copy())

    return call, time.perf_counter() - started


def checkpoint_path(args) -> Path | None:
    """The model file (None: the built-in model)."""
    if args.checkpoint or args.model == "builtin":
        return args.checkpoint
    from bench.models import write_weights
    from latent_diffusion.config import SD1

    path = args.cache / "sd15-random.safetensors"  # the file bench/run.py writes and reads
    if not path.is_file():
        print(f"writing random SD 1.5 weights to {path} (once)", file=sys.stderr)
        write_weights(SD1, path)
    return path


def pipeline(row: str, path: Path | None, size: int, prompt: str, notes: list[str]):
    """The pipeline of one row, or None where it cannot run here."""
    from latent_diffusion.pipelines.common import Pipeline

    if row.startswith("ours") or row == "exact":
        pipe = Pipeline.from_checkpoint(path, progress=False, bf16="bf16" in row, compile_unet="compiled" in row)
        notes += [f"{row}: {warning}" for warning in pipe.mode_warnings]
        return pipe
    try:
        import openvino  # noqa: F401
    except ImportError:
        notes.append(f"{row}: openvino is not installed")
        return None
    pipe = Pipeline.from_checkpoint(path, progress=False, packed=False)  # OpenVINO traces the plain layers
    pipe.unet_forward, seconds = openvino_unet(pipe, "f32" if row == "openvino-f32" else "default", size, prompt)
    notes.append(f"{row}: conversion and compilation {seconds:.1f} s")
    return pipe


def main(argv=None) -> int:
    from latent_diffusion.pipelines.commands import native_image_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["builtin", "sd15"], default="builtin")
    parser.add_argument("--checkpoint", type=Path, default=None, help="any model file instead")
    parser.add_argument("--images", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--size", type=int, default=None, help="image side; default: the model's (256 for sd15)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (exact always)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    builtin = args.checkpoint is None and args.model == "builtin"
    prompts = BUILTIN_PROMPTS if builtin else SD_PROMPTS
    size = args.size or (256 if args.model == "sd15" and not args.checkpoint else None)
    path, notes = checkpoint_path(args), []
    images, seconds = {}, {}
    rows = [row for row in ROWS if row == "exact" or row in args.rows]
    for row in rows:  # one pipeline at a time: four full-size fp32 models do not fit 24 GiB together
        pipe = pipeline(row, path, size or 64, prompts[0], notes)
        if pipe is None:
            continue
        size = size or native_image_size(pipe)
        guidance = BUILTIN_GUIDANCE if builtin else pipe.family.default_guidance
        images[row], seconds[row] = [], []
        for prompt in prompts:
            for seed in range(1, args.images + 1):
                started = time.perf_counter()
                result = pipe.txt2img(prompt, sampler="dpmpp_2m", steps=args.steps, width=size, height=size,
                                      seed=seed, guidance_scale=guidance)
                seconds[row].append(time.perf_counter() - started)
                images[row].append(np.asarray(result.images[0]))
        notes.append(f"{row}: first image {seconds[row][0]:.2f} s")
        del pipe
    model = (f"`{args.checkpoint.name}`" if args.checkpoint else
             "the built-in model" if builtin else "full-size SD 1.5, random weights")
    count = len(prompts) * args.images
    lines = [f"## Fast modes against the exact fp32 image: {model}, {size}x{size}, {args.steps} steps DPM++ 2M", "",
             f"{count} images per row (same prompts, seeds, conditioning and VAE; only the UNet differs); CFG "
             f"{guidance:g}; PSNR against the exact image, mean (min-max); torch {torch.__version__}, "
             f"load average at the end {os.getloadavg()[0]:.1f}.", "",
             "| UNet | s per image | PSNR vs exact, dB |", "|---|---|---|"]
    for row in images:
        values = [psnr(image, ref) for image, ref in zip(images[row], images["exact"])]
        quality = "-" if row == "exact" else f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"
        lines.append(f"| {row} | {statistics.median(seconds[row]):.2f} | {quality} |")
    lines += [""] + [f"- {note}" for note in notes]
    table = "\n".join(lines)
    write_table(table, args.results, f"fast-quality-{'checkpoint' if args.checkpoint else args.model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
