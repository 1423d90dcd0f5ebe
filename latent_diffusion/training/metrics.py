"""Reconstruction metrics (PSNR, SSIM, rFID) and the run's logs (CSV, TensorBoard when installed)."""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [0, 1]."""
    mse = (a - b).square().flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, *, reduce: bool = True) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5) for images in [0, 1]."""
    channels = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size, 1.5, channels, a.device, a.dtype)
    c1, c2 = 0.01**2, 0.03**2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    per_image = value.flatten(1).mean(1)
    return per_image.mean() if reduce else per_image


class InceptionFeatures:
    """A TorchScript Inception feature extractor from a local file (e.g. the StyleGAN/clean-fid ``inception-2015-12-05.pt``)."""

    def __init__(self, path: str, device: torch.device) -> None:
        if not Path(path).is_file():
            raise ValueError(f"run.inception_weights: {path} is not a file")
        self.model = torch.jit.load(path, map_location=device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """2048-d pool features of images in [-1, 1]."""
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(self.device)
        try:
            features = self.model(uint8, return_features=True)
        except (RuntimeError, TypeError):
            features = self.model(uint8)
        return features.flatten(1).double().cpu()


class MetricsLogger:
    """Append scalar metrics to ``metrics.csv`` (and TensorBoard when the package is installed); rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.csv"
        self.writer = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed; metrics go to %s only", self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        rows = [(step, name, float(value)) for name, value in values.items() if math.isfinite(float(value))]
        new_file = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(["step", "name", "value"])
            writer.writerows(rows)
        if self.writer is not None:
            for step_, name, value in rows:
                self.writer.add_scalar(name, value, step_)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
