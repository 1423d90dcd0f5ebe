"""How faithful the built-in 16 -> 64 super-resolution model is outside its training range (the server's choice).

Shapes scenes rendered at 4x the input size are the truth; the input is that render area-reduced to
``--input`` pixels. Printed per way of upscaling: PSNR against the truth, and how far the output,
reduced back to the input's size, is from the input (mean absolute error in 0-255 levels: a
recoloured output is far from its own input). The server refuses inputs beyond 16 px because of it.

    python bench/builtin_upscaler_range.py --input 64 --scenes 8
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def area_reduce(image: np.ndarray, size: int) -> np.ndarray:
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
    reduced = torch.nn.functional.adaptive_avg_pool2d(pixels, size)[0].permute(1, 2, 0)
    return reduced.round().to(torch.uint8).numpy()


def psnr(image: np.ndarray, truth: np.ndarray) -> float:
    error = np.mean((image.astype(np.float64) - truth.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(error, 1e-12)))


def report(label: str, outputs: list[np.ndarray], truths: list[np.ndarray], inputs: list[np.ndarray], seconds: float):
    quality = np.mean([psnr(o, t) for o, t in zip(outputs, truths)])
    drift = np.mean([np.abs(area_reduce(o, i.shape[0]).astype(float) - i).mean() for o, i in zip(outputs, inputs)])
    print(f"{label:<28} PSNR {quality:6.2f} dB   reduced back vs input: MAE {drift:5.2f}   {seconds:6.1f} s", flush=True)


def main(argv=None) -> None:
    from latent_diffusion.data.shapes import render_scene, sample_scene
    from latent_diffusion.pipelines.common import Pipeline, default_upscaler_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=int, default=64, help="input side in pixels (the model was trained on 16)")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--tiles", default="16:4,32:8", help="tile:overlap pairs to try (input pixels)")
    args = parser.parse_args(argv)
    pipe = Pipeline.from_checkpoint(default_upscaler_path(), progress=False)
    rng = np.random.default_rng(0)
    truths = [render_scene(sample_scene(rng), args.input * 4) for _ in range(args.scenes)]
    inputs = [area_reduce(t, args.input) for t in truths]
    started = time.monotonic()
    bicubic = [np.asarray(Image.fromarray(i).resize((args.input * 4,) * 2, Image.Resampling.BICUBIC)) for i in inputs]
    report("bicubic", bicubic, truths, inputs, time.monotonic() - started)
    ways = [("model, whole", {})] + [(f"model, tiles {pair}", {"tile_size": int(pair.split(":")[0]),
                                                               "tile_overlap": int(pair.split(":")[1])})
                                     for pair in args.tiles.split(",") if pair]
    for label, options in ways:
        started = time.monotonic()
        outputs = [np.asarray(pipe.upscale(Image.fromarray(i), seed=k, **options).images[0]) for k, i in enumerate(inputs)]
        report(label, outputs, truths, inputs, time.monotonic() - started)


if __name__ == "__main__":
    main()
