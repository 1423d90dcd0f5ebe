"""Peak memory of a banded ("tiled") SD-VAE decode in a fresh process (random weights; memory does not depend on them).

    python bench/vae_tiling_memory.py --size 2048
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.worker import peak_rss_bytes  # noqa: E402


def main(argv=None) -> None:
    from latent_diffusion.config import SD_VAE
    from latent_diffusion.models.autoencoder import AutoencoderKL
    from latent_diffusion.models.vae_tiling import decode_tiled

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--untiled", action="store_true")
    args = parser.parse_args(argv)
    vae = AutoencoderKL(SD_VAE).eval()
    z = torch.randn(1, 4, args.size // 8, args.size // 8)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        image = vae.decode(z) if args.untiled else decode_tiled(vae, z)
    print(json.dumps({"size": args.size, "tiled": not args.untiled, "seconds": time.perf_counter() - start,
                      "peak_rss_gib": peak_rss_bytes() / 2**30, "weights_rss_gib": baseline / 2**30,
                      "shape": list(image.shape)}))


if __name__ == "__main__":
    main()
