"""Pack a trained shapes-world LDM for shipping: EMA weights folded in, fp16, no optimiser or EMA copies.

    python scripts/pack_shapes_model.py runs/shapes/ldm/model.safetensors latent_diffusion/assets/shapes-ldm.safetensors

The output keeps the original single-file layout and the spec in the metadata, so it loads with
``load_checkpoint`` / ``Pipeline.from_checkpoint`` like the training export (without ``--ema``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from latent_diffusion.checkpoints.io import read_safetensors_metadata, read_state_dict, save_safetensors
from latent_diffusion.checkpoints.load import EMA_PREFIX, ema_key

# Schedule buffers and the latent scale stay fp32: fp16 would round alphas_cumprod near 1.
KEEP_FP32 = ("betas", "alphas_cumprod", "scale_factor")


def pack(source: str | Path, target: str | Path) -> Path:
    """Write ``target``: the EMA UNet as the UNet (when present), floats in fp16, bookkeeping dropped."""
    tensors = read_state_dict(str(source))
    packed = {}
    for name, value in tensors.items():
        if name.startswith(EMA_PREFIX):
            continue
        if name.startswith("model.diffusion_model.") and ema_key(name) in tensors:
            value = tensors[ema_key(name)]
        if value.is_floating_point() and name not in KEEP_FP32:
            value = value.to(torch.float16)
        packed[name] = value.contiguous()
    metadata = {k: v for k, v in read_safetensors_metadata(str(source)).items()}
    target = Path(target)
    save_safetensors(packed, target, metadata)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="training export (model.safetensors)")
    parser.add_argument("target", help="file to write")
    args = parser.parse_args()
    path = pack(args.source, args.target)
    print(path, f"{path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
