"""Latent Diffusion Models and Stable Diffusion 1.x/2.x in plain PyTorch."""

__version__ = "0.1.0"
