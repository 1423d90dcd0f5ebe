"""The machine's practical ceiling (fp32 GFLOP/s of a large matmul) and the UNet's counted FLOPs.

Run as a script it prints one JSON line; ``bench/run.py`` calls it in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def matmul_gflops(size: int, repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[float]:
    """GFLOP/s of ``size x size @ size x size`` products (2 n^3 FLOPs each), one figure per repeat."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool and kernel selection
    rates = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return rates


def unet_flops(spec, latent_side: int, batch: int = 2) -> int:
    """FLOPs of one UNet call, counted by ``FlopCounterMode`` on the meta device (shapes only, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from latent_diffusion.models.unet import UNetModel

    with torch.device("meta"):
        unet = UNetModel(spec.unet)
        x = torch.empty(batch, spec.latent_channels, latent_side, latent_side)
        t = torch.empty(batch)
        context = torch.empty(batch, 77, spec.unet.context_dim)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, context)
    return counter.get_total_flops()


def main(argv=None) -> None:
    from bench.models import spec_for

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size, repeats = (512, 3) if args.quick else (4096, 5)
    rates = matmul_gflops(size, repeats, args.device, getattr(torch, args.dtype))
    spec = spec_for(args.quick)
    flops = {side: unet_flops(spec, side) for side in ((8, 16) if args.quick else (32, 64))}
    print(json.dumps({"matmul_size": size, "gflops": rates, "gflops_median": statistics.median(rates),
                      "unet_flops": flops}))


if __name__ == "__main__":
    main()
