"""Stage-1 losses: perceptual (LPIPS or its documented fallback) and the PatchGAN discriminator."""
