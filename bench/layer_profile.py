"""Where a UNet step's time goes: each convolution and linear layer's shape, time and GFLOP/s.

Layers of one shape are summed. A shape far below its neighbours' rate is the place to look: this
table found SD 1.5's last downsampling packed for the wrong size (9.6 GFLOP/s where the other
convolutions ran at 260-400) and showed the 4x4 level bound by reading its weights.

    python bench/layer_profile.py                       # full-size SD 1.5 (random weights), 32x32 latents, exact
    python bench/layer_profile.py --latent 64 --bf16
    python bench/layer_profile.py --checkpoint FILE --latent 16

Times come from the host clock around each layer's call (on a CPU the call returns when the work is
done); the total is a step without the clocks, for scale. Rates count a convolution's direct FLOPs,
also where it runs by Winograd's algorithm (nn/winograd.py), which does fewer. Reported, not asserted.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.cases import Case  # noqa: E402
from bench.inputs import unet_inputs  # noqa: E402
from bench.models import load_ours  # noqa: E402
from bench.run import prepare_files  # noqa: E402
from latent_diffusion.nn.attention import GEGLU  # noqa: E402


def _describe(layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple[str, float]:
    if isinstance(layer, GEGLU):  # timed whole: packed, its projection runs inside it (nn/packed.py)
        proj = layer.proj
        return (f"GEGLU {proj.in_features}->{proj.out_features}, {x.numel() // x.shape[-1]} rows",
                2 * out.numel() * 2 * proj.in_features)
    if isinstance(layer, nn.Conv2d):
        flops = 2 * out.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        return (f"conv {layer.kernel_size[0]}x{layer.kernel_size[1]} stride {layer.stride[0]} "
                f"{layer.in_channels}->{layer.out_channels} at {tuple(x.shape[2:])}"), flops
    return f"linear {layer.in_features}->{layer.out_features}, {x.numel() // x.shape[-1]} rows", 2 * out.numel() * layer.in_features


def profile(unet: nn.Module, call) -> dict[str, list[float]]:
    """Per shape: [calls, seconds, FLOPs] of one ``call()``, timed layer by layer (GEGLUs whole)."""
    table: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])

    def timed(layer: nn.Module, forward):
        def run(x, *args, **kwargs):
            started = time.perf_counter()
            out = forward(x, *args, **kwargs)
            name, flops = _describe(layer, x, out)
            row = table[name]
            row[0] += 1
            row[1] += time.perf_counter() - started
            row[2] += flops
            return out
        return run

    gated = {id(m.proj) for m in unet.modules() if isinstance(m, GEGLU)}
    layers = [m for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear, GEGLU)) and id(m) not in gated]
    saved = [(layer, layer.__dict__.get("forward")) for layer in layers]
    for layer in layers:
        layer.forward = timed(layer, layer.forward)
    try:
        call()
    finally:
        for layer, forward in saved:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="any model file (default: SD 1.5, random weights)")
    parser.add_argument("--latent", type=int, default=32, help="latent side")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--rows", type=int, default=25, help="shapes shown, slowest first")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    args = parser.parse_args(argv)
    path = args.checkpoint or prepare_files(False, args.cache)[0]
    pipe = load_ours(path, "cpu", torch.float32, **({"bf16": True} if args.bf16 else {}))
    case = Case(f"unet{args.latent}", "unet", args.latent, "", 1)
    x, t, context = unet_inputs(case, pipe.spec, "cpu", pipe.dtype)

    def step():
        pipe.unet_forward(x, t, context, None)

    with torch.no_grad():
        step()  # packs the weights
        started = time.perf_counter()
        step()
        total = time.perf_counter() - started
        table = profile(pipe.model.unet, step)
    timed = sum(row[1] for row in table.values())
    print(f"UNet step, batch {x.shape[0]}, {args.latent}x{args.latent} latents, {'bf16' if args.bf16 else 'exact'}: "
          f"{total:.3f} s; convolutions, linears and GEGLUs {timed:.3f} s, {sum(r[2] for r in table.values()) / 1e9:.1f} GFLOP")
    print("| layer shape | calls | ms | GFLOP/s |\n|---|---|---|---|")
    for name, (calls, seconds, flops) in sorted(table.items(), key=lambda item: -item[1][1])[:args.rows]:
        print(f"| {name} | {calls} | {seconds * 1000:.1f} | {flops / seconds / 1e9:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
