"""LPIPS (Zhang et al. 2018) on VGG16 features, loaded from a local weights file, and its fallback.

The module tree matches the ``lpips`` package (``net.slice1..5`` hold torchvision's VGG16
``features`` layers under their original indices; ``lin0..4.model.1`` are the learned 1x1 heads),
so its ``vgg.pth`` heads and torchvision's ``vgg16`` state dict load strictly. Nothing is
downloaded: without a file, :func:`build_perceptual_loss` warns and returns
:class:`MultiScaleSSIMLoss`, a structure term that needs no learned weights.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.training.metrics import ssim

log = logging.getLogger(__name__)

# (first index, last index + 1) of torchvision's vgg16.features for each LPIPS tap (relu1_2 ... relu5_3).
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_CHANNELS = (64, 128, 256, 512, 512)
_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256),
          17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}
_POOLS = (4, 9, 16, 23)
# The lpips package's input normalisation ("ScalingLayer"), constants rather than buffers.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _vgg_layer(index: int) -> nn.Module:
    if index in _CONVS:
        return nn.Conv2d(*_CONVS[index], kernel_size=3, padding=1)
    if index in _POOLS:
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.ReLU(inplace=False)


class _LinearHead(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class _VGGSlices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for number, (start, end) in enumerate(_SLICES, 1):
            layers = OrderedDict((str(i), _vgg_layer(i)) for i in range(start, end))
            self.add_module(f"slice{number}", nn.Sequential(layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for number in range(1, 6):
            x = getattr(self, f"slice{number}")(x)
            taps.append(x)
        return taps


class LPIPS(nn.Module):
    """Learned perceptual distance per image, for inputs in [-1, 1]; frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _VGGSlices()
        for k, channels in enumerate(_CHANNELS):
            self.add_module(f"lin{k}", _LinearHead(channels))
        self.requires_grad_(False)
        self.eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shift = torch.tensor(_SHIFT, device=a.device, dtype=a.dtype).view(1, 3, 1, 1)
        scale = torch.tensor(_SCALE, device=a.device, dtype=a.dtype).view(1, 3, 1, 1)
        features_a = self.net((a - shift) / scale)
        features_b = self.net((b - shift) / scale)
        total = 0.0
        for k, (fa, fb) in enumerate(zip(features_a, features_b)):
            # Unit-normalise each feature vector along channels (eq. 1 of the paper).
            fa = fa / (fa.square().sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((fa - fb).square()).mean(dim=(2, 3))
        return total.view(-1)


def _to_lpips_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept torchvision ``features.N.*`` keys and the lpips package's own keys."""
    mapped = {}
    for key, value in state_dict.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            number = next((n for n, (s, e) in enumerate(_SLICES, 1) if s <= index < e), None)
            if number is not None:
                mapped[f"net.slice{number}.{key[len('features.'):]}"] = value
        elif key.startswith(("net.slice", "lin")):
            mapped[key] = value
    return mapped


def load_lpips(lpips_path: str, vgg_path: str | None = None) -> LPIPS:
    """LPIPS from local files: the heads (and VGG16) in ``lpips_path``, the VGG16 in ``vgg_path`` if separate."""
    from latent_diffusion.checkpoints.io import read_state_dict

    weights = _to_lpips_keys(read_state_dict(lpips_path))
    if vgg_path is not None:
        weights.update(_to_lpips_keys(read_state_dict(vgg_path)))
    model = LPIPS()
    expected = set(model.state_dict())
    missing = sorted(expected - set(weights))
    if missing:
        raise ValueError(
            f"LPIPS weights incomplete: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}; give "
            "loss.lpips_weights (lpips heads, e.g. vgg.pth) and loss.vgg_weights (torchvision vgg16) if they are separate"
        )
    model.load_state_dict({k: weights[k] for k in expected}, strict=True)
    return model


class MultiScaleSSIMLoss(nn.Module):
    """Fallback perceptual term: mean of 1 - SSIM over a three-level image pyramid, per image."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for level in range(3):
            if min(a.shape[-2:]) < 4:
                break
            total = total + (1 - ssim((a + 1) / 2, (b + 1) / 2, reduce=False))
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        return total / 3


def build_perceptual_loss(lpips_path: str | None, vgg_path: str | None = None) -> nn.Module:
    """LPIPS when a local file is given; otherwise a warning and the multi-scale SSIM fallback."""
    if lpips_path:
        return load_lpips(lpips_path, vgg_path)
    log.warning(
        "no LPIPS weights given (loss.lpips_weights): the perceptual term falls back to multi-scale "
        "1 - SSIM, which needs no learned weights but sharpens textures less than LPIPS"
    )
    return MultiScaleSSIMLoss()
