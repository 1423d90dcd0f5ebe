"""Does our attention materialise the full attention matrix? Peak memory of one SD 1.5 SpatialTransformer.

    python bench/attention_memory.py --latent 64 128

Each size runs in a fresh process; the peak RSS growth during the forward pass is set against the
size of the full [batch, heads, tokens, tokens] fp32 matrix that the plain softmax(QK^T)V path builds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(latent: int, batch: int) -> dict:
    from bench.worker import peak_rss_bytes
    from latent_diffusion.nn.attention import SpatialTransformer

    # SD 1.5's first level: 320 channels, 8 heads of 40, CLIP-L context.
    block = SpatialTransformer(320, heads=8, dim_head=40, context_dim=768).eval()
    x = torch.randn(batch, 320, latent, latent)
    context = torch.randn(batch, 77, 768)
    before = peak_rss_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        block(x, context)
    tokens = latent * latent
    return {"latent": latent, "batch": batch, "seconds": time.perf_counter() - start,
            "peak_growth_gib": (peak_rss_bytes() - before) / 2**30,
            "full_matrix_gib": batch * 8 * tokens * tokens * 4 / 2**30}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latent", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.latent[0], args.batch)))
        return
    for latent in args.latent:
        out = subprocess.run([sys.executable, __file__, "--child", "--latent", str(latent), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
