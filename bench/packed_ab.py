"""Packed against plain weights in one process, alternating: UNet steps and txt2img images.

On a shared machine whose speed drifts between processes, two pipelines from the same file timed
turn by turn in one process compare more steadily than fresh processes do (``bench/run.py``). The
plain side runs eager layers on the weights as loaded, as before packing (and as diffusers does).

    python bench/packed_ab.py                      # full-size SD 1.5, random weights: 32x32 steps, 256 px images
    python bench/packed_ab.py --latent 64 --images 0
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.cases import Case  # noqa: E402
from bench.inputs import PROMPT, SEED, unet_inputs  # noqa: E402
from bench.models import load_ours, spec_for  # noqa: E402
from bench.run import prepare_files  # noqa: E402
from bench.worker import dpmpp_2m_settings  # noqa: E402


def image(pipe, size: int) -> float:
    from latent_diffusion.diffusion.sampling import BatchNoise, make_generators

    started = time.perf_counter()
    cond, uncond = pipe.text_conditioning(PROMPT, "", 1, None, width=size, height=size)
    latents = pipe.sample_latents(dpmpp_2m_settings(), BatchNoise(make_generators(SEED, 1)), cond, uncond,
                                  shape=pipe.latent_shape(1, size, size))
    pipe.decode(latents)
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=32, help="latent side of the UNet steps")
    parser.add_argument("--steps", type=int, default=4, help="UNet steps a side (after one untimed)")
    parser.add_argument("--images", type=int, default=2, help="txt2img images a side (20 steps DPM++ 2M)")
    parser.add_argument("--size", type=int, default=256, help="txt2img image side")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    args = parser.parse_args(argv)
    weights, _ = prepare_files(False, args.cache)
    pipes = {"packed": load_ours(weights, "cpu", torch.float32), "plain": load_ours(weights, "cpu", torch.float32, plain=True)}
    case = Case("ab", "unet", args.latent, "", args.latent)
    x, t, context = unet_inputs(case, spec_for(False), "cpu", torch.float32)
    seconds = {name: [] for name in pipes}
    outputs = {}
    with torch.no_grad():
        for step in range(args.steps + 1):
            for name, pipe in pipes.items():
                started = time.perf_counter()
                outputs[name] = pipe.unet_forward(x, t, context, None)
                if step:  # the first call packs
                    seconds[name].append(time.perf_counter() - started)
    difference = ((outputs["packed"] - outputs["plain"]).abs().max() / outputs["plain"].abs().max()).item()
    images = {name: [] for name in pipes}
    for _ in range(args.images):
        for name, pipe in pipes.items():
            images[name].append(image(pipe, args.size))
    print(f"UNet step, batch 2, {args.latent}x{args.latent} latents, median of {args.steps}: " + ", ".join(
        f"{name} {statistics.median(values):.2f} s" for name, values in seconds.items()) +
        f"; packed/plain {statistics.median(seconds['packed']) / statistics.median(seconds['plain']):.2f}; "
        f"relative difference {difference:.1e}")
    if args.images:
        print(f"txt2img {args.size}x{args.size}, 20 steps, image by image (the first packs the text encoder and VAE): " + "; ".join(
            f"{name} " + ", ".join(f"{value:.1f}" for value in values) + " s" for name, values in images.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
