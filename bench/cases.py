"""The benchmark cases: what is measured, at full size and in the tiny ``--quick`` configuration."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Case:
    """One benchmark: ``kind`` says what runs, ``size`` is latent side (unet) or image side (vae, txt2img)."""

    name: str
    kind: str  # "load" | "unet" | "vae" | "txt2img"
    size: int
    label: str
    quick_size: int
    warmup: int = 0
    runs: int = 1
    # Agreement: "relative" max|ours - ref| <= 1e-4 max|ref|; "pixels" max difference <= 2/255.
    check: str = "relative"
    model: str = "sd15"  # "sd15" or "sdxl" (random weights of that family, full size or tiny with --quick)

    def scaled(self, quick: bool) -> Case:
        return replace(self, size=self.quick_size) if quick else self


CASES = {case.name: case for case in [
    Case("load", "load", 0, "checkpoint load (file -> ready model)", 0, check="none"),
    Case("unet32", "unet", 32, "UNet step, batch 2, 32x32 latents", 8, warmup=1),
    Case("unet64", "unet", 64, "UNet step, batch 2, 64x64 latents", 16, warmup=1),
    Case("txt2img256", "txt2img", 256, "txt2img 256x256, 20 steps DPM++ 2M, CFG 7.5", 32, check="pixels"),
    Case("txt2img512", "txt2img", 512, "txt2img 512x512, 20 steps DPM++ 2M, CFG 7.5", 64, check="pixels"),
    Case("vae512", "vae", 512, "VAE decode 512x512", 64),
    Case("vae1024", "vae", 1024, "VAE decode 1024x1024", 128),
    Case("sdxl_unet64", "unet", 64, "SDXL UNet step, batch 2 (CFG), 64x64 latents", 8, warmup=1, model="sdxl"),
    Case("sdxl_unet128", "unet", 128, "SDXL UNet step, batch 2 (CFG), 128x128 latents (1024 px)", 16, warmup=1,
         model="sdxl"),
]}
