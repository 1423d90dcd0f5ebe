"""Few-step samplers against a 20-step DPM++ 2M image of the same model, prompt and seed: time and PSNR.

Every row runs txt2img on the same prompts and seeds; its PSNR is against the 20-step DPM++ 2M image
(pixels, 0-255), its time the median seconds per image. Reported, not asserted.

What the PSNR means depends on the model. LCM and TCD are made for distilled models (an LCM/TCD
checkpoint, or a base model with an LCM-LoRA): on any other model their few steps only show how far
they land from a converged image. On the built-in model that is what is measured: how far 4 LCM steps
are from 20 DPM++ 2M steps. With random weights (``--model sd15``) the images are noise-like and the
PSNR says nothing about LCM at all; that option measures the time at full size.

    python bench/few_step.py                          # the built-in model, 64 px (seconds)
    python bench/few_step.py --model sd15 --images 1  # full-size SD 1.5, random weights, 512 px (minutes on a CPU)
    python bench/few_step.py --checkpoint MODEL.safetensors --prompt "<lora:lcm-lora-sdv1-5:1> a cat"
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.results_file import write_table  # noqa: E402

BUILTIN_GUIDANCE = 2.0  # what `ldm txt2img` uses with the built-in model (MODEL_CARD.md; 3 before 2026-12-02)
BUILTIN_PROMPTS = ("a red circle", "a blue square and a green triangle", "two yellow stars")
SD_PROMPTS = ("a photograph of an astronaut riding a horse", "a bowl of fruit on a wooden table")


@dataclass(frozen=True)
class Row:
    label: str
    sampler: str
    steps: int
    guidance: float | None  # None: the model's default guidance


REFERENCE = Row("DPM++ 2M, 20 steps (reference)", "dpmpp_2m", 20, None)
ROWS = (
    REFERENCE,
    Row("LCM, 4 steps", "lcm", 4, None),
    Row("LCM, 4 steps, CFG 1 (as LCM models run)", "lcm", 4, 1.0),
    Row("TCD, 4 steps", "tcd", 4, None),
    Row("DPM++ 2M, 4 steps", "dpmpp_2m", 4, None),
)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    error = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(error, 1e-12)))


def load(args):
    from latent_diffusion.pipelines.common import Pipeline

    path = args.checkpoint
    if args.model == "sd15" and path is None:
        from bench.models import write_weights
        from latent_diffusion.config import SD1

        path = args.cache / "sd15-random.safetensors"  # the file bench/run.py writes and reads
        if not path.is_file():
            print(f"writing random SD 1.5 weights to {path} (once)", file=sys.stderr)
            write_weights(SD1, path)
    return Pipeline.from_checkpoint(path, device=args.device, progress=False, lora_dir=args.lora_dir)


def run_rows(pipe, prompts, seeds, size: int, guidance: float) -> dict[Row, tuple[list, list]]:
    """Each row's images and seconds; the rows take turns image by image, so drift in the machine's
    load hits them alike."""
    measured = {row: ([], []) for row in ROWS}
    for prompt in prompts:
        for seed in seeds:
            for row in ROWS:
                started = time.perf_counter()
                result = pipe.txt2img(prompt, sampler=row.sampler, steps=row.steps, width=size, height=size,
                                      seed=seed, guidance_scale=guidance if row.guidance is None else row.guidance)
                measured[row][1].append(time.perf_counter() - started)
                measured[row][0].append(np.asarray(result.images[0]))
    return measured


def main(argv=None) -> int:
    from latent_diffusion.pipelines.commands import native_image_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["builtin", "sd15"], default="builtin",
                        help="the built-in model (default) or full-size SD 1.5 with random weights")
    parser.add_argument("--checkpoint", type=Path, default=None, help="any model file instead (e.g. an LCM model)")
    parser.add_argument("--lora-dir", type=Path, default=None, help="LoRA folder, for <lora:...> tags in --prompt")
    parser.add_argument("--prompt", action="append", default=None, help="prompt (repeatable); default: a few")
    parser.add_argument("--images", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--size", type=int, default=None, help="image side; default: the model's")
    parser.add_argument("--cfg-scale", type=float, default=None, help="CFG of every row but 'CFG 1'; default: the model's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (on a shared CPU, 1 steadies the times)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pipe = load(args)
    builtin = args.checkpoint is None and args.model == "builtin"
    prompts = args.prompt or (BUILTIN_PROMPTS if builtin else SD_PROMPTS)
    seeds = range(1, args.images + 1)
    size = args.size or native_image_size(pipe)
    guidance = args.cfg_scale if args.cfg_scale is not None else (
        BUILTIN_GUIDANCE if builtin else pipe.family.default_guidance)
    pipe.txt2img(prompts[0], sampler="euler", steps=1, width=size, height=size, seed=0)  # warm-up, untimed

    measured = [(row, *results) for row, results in run_rows(pipe, prompts, seeds, size, guidance).items()]
    table = render(measured, args, size, guidance, len(prompts) * len(seeds))
    write_table(table, args.results, f"few-step-{'checkpoint' if args.checkpoint else args.model}")
    return 0


def render(measured, args, size: int, guidance: float, count: int) -> str:
    reference_images = measured[0][1]
    model = (f"`{args.checkpoint.name}`" if args.checkpoint else
             "the built-in model" if args.model == "builtin" else "full-size SD 1.5, random weights")
    lines = [f"## Few-step samplers against 20 DPM++ 2M steps: {model}, {size}x{size}, {args.device}", "",
             f"{count} image{'s' if count != 1 else ''} per row (same prompts and seeds); CFG {guidance:g} unless the row says; "
             "PSNR against the reference image, mean (min-max); seconds: median per image; "
             f"torch threads {args.threads or 'default'}, load average at the end {os.getloadavg()[0]:.1f}.", "",
             "| sampler | UNet steps | s per image | PSNR vs reference, dB |", "|---|---|---|---|"]
    for row, images, seconds in measured:
        if row is REFERENCE:
            quality = "-"
        else:
            values = [psnr(image, ref) for image, ref in zip(images, reference_images)]
            quality = f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"
        lines.append(f"| {row.label} | {row.steps} | {statistics.median(seconds):.3f} | {quality} |")
    if args.checkpoint is None and args.model == "sd15":
        lines += ["", "Random weights: the PSNR is meaningless for LCM and TCD, which need a distilled model "
                  "(an LCM checkpoint or LCM-LoRA); only the times mean something here."]
    elif args.checkpoint is None:
        lines += ["", "The built-in model is not distilled: the PSNR measures how far 4 LCM (or TCD) steps land "
                  "from 20 DPM++ 2M steps, not LCM's quality on an LCM model."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
