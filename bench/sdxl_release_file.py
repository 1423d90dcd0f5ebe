"""Write an SDXL single file as Stability releases it, with random weights: the check that a user's
``sd_xl_base_1.0.safetensors`` (or the refiner) loads and generates.

The file has the release layout (``conditioner.embedders.N``, ``model.diffusion_model``,
``first_stage_model``), fp16 tensors and the extra keys release files carry (the CLIP-L position
ids). Weights are drawn with a sane scale so that the image is not NaN; it is noise, not a picture.

    python bench/sdxl_release_file.py /tmp/sd_xl_base_random.safetensors [--refiner]
    ldm info /tmp/sd_xl_base_random.safetensors
    ldm txt2img "a photo of a cat" -c /tmp/sd_xl_base_random.safetensors -W 512 -H 512 --steps 2
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from latent_diffusion.checkpoints.io import save_safetensors
from latent_diffusion.config import SDXL, SDXL_REFINER
from latent_diffusion.models.ldm import LatentDiffusion


def random_release_state(spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp16 random tensors for every key of ``spec``'s model, plus the release files' extras."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LatentDiffusion(spec).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        tensor = torch.empty(shape, dtype=torch.float32)
        if len(shape) >= 2:
            bound = math.sqrt(3.0 / max(1, math.prod(shape[1:])))
            tensor.uniform_(-bound, bound, generator=generator)
        elif key.endswith("weight") or key.endswith("logit_scale"):
            tensor.uniform_(0.8, 1.2, generator=generator)
        else:
            tensor.uniform_(-0.1, 0.1, generator=generator)
        state[key] = tensor.half()
    if spec.family == "sdxl":
        state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--refiner", action="store_true", help="the refiner's layout instead of the base model's")
    args = parser.parse_args()
    spec = SDXL_REFINER if args.refiner else SDXL
    save_safetensors(random_release_state(spec), args.path, {"format": "pt"})
    print(f"wrote {args.path} ({args.path.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
