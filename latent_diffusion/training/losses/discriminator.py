"""PatchGAN discriminator (Isola et al. 2017) and the hinge losses of the taming / CompVis stage-1 training."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """``NLayerDiscriminator``: a real/fake logit per overlapping patch (keys ``main.N`` as in taming)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1
            next_width = channels * min(2**n, 8)
            layers += [nn.Conv2d(width, next_width, 4, stride, 1, bias=False), nn.BatchNorm2d(next_width),
                       nn.LeakyReLU(0.2, True)]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            # DCGAN initialisation, as the reference's weights_init.
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_generator_weight(
    reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor, scale: float,
    average: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Balance the GAN term against reconstruction by their gradient norms at the decoder's last layer (Esser et al. eq. 7).

    ``average`` (an all-reduce mean under DDP) makes the norms those of the global batch's
    gradients, so that N processes weigh the terms as one process with the same batch would.
    """
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    if average is not None:
        rec_grad, gan_grad = average(rec_grad), average(gan_grad)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * scale
