"""How much memory a generation needs, so that what cannot fit is refused before the work.

At large sizes activations, not weights, fill the memory, and they grow with the pixel count. The
rule: a network's peak is a fixed number of copies of its largest activation (a layer's input and
output, a residual branch, the normalised copy...). The copies were measured (peak resident memory
of a forward pass on the CPU in float32, SD 1 and the built-in model's networks, 512 to 1024 px) and
rounded to whole copies, down where they varied, so that a refused request could not have run:

- VAE decoder: 4 (measured 3.9 to 4.1). Its largest activation, at level ``i`` (pixels / 4^i), has
  the widest of the level's own channels and those the coarser level brings up, for the whole
  batch (decoded at once).
- VAE encoder, one image at a time: 6 (measured 6.1); the finer level's channels come down.
- Either in bands of rows (models/vae_tiling.py): 2 (measured 2.1), as only the activations between
  layers exist whole, in float16 above 1 GiB.
- UNet: 5 (measured 5.4 to 6.8), at latent level ``l``: the transformer's GEGLU projection (8 x the
  channels per token) where the level attends, the older attention block's qkv (3 x) there, else
  the skip concatenation (2 x); classifier-free guidance runs the batch twice.

Attention is fused (memory linear in the tokens), so no tokens x tokens matrix is counted. The need
is compared with the memory free now: the host's MemAvailable (or what its cgroup allows, when
less), or the GPU's free memory.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from latent_diffusion.config import AutoencoderConfig, UNetConfig
from latent_diffusion.models.vae_tiling import DEFAULT_EXACT_BYTES

if TYPE_CHECKING:
    from latent_diffusion.pipelines.common import Pipeline

GIB = 2**30


class InsufficientMemoryError(ValueError):
    """A request whose activations do not fit in the memory that is free."""


@dataclass(frozen=True)
class Need:
    """About ``copies`` x the largest activation (``batch`` x ``channels`` x ``height`` x ``width``) for ``network``."""

    network: str
    copies: int
    batch: int
    channels: int
    width: int
    height: int
    itemsize: int

    @property
    def activation_bytes(self) -> int:
        return self.batch * self.channels * self.width * self.height * self.itemsize

    @property
    def bytes(self) -> int:
        return self.copies * self.activation_bytes

    @property
    def detail(self) -> str:
        return (f"{self.copies} x {self.channels} channels at {self.width}x{self.height}, batch {self.batch}, "
                f"{self.itemsize * 8}-bit")


def _largest_level(widths: list[int], width: int, height: int) -> tuple[int, int, int]:
    """(channels, width, height) of the level whose channels x pixels is largest; level i is 2^i smaller."""
    levels = [(c, math.ceil(width / 2**i), math.ceil(height / 2**i)) for i, c in enumerate(widths)]
    return max(levels, key=lambda level: level[0] * level[1] * level[2])


def _banded(network: str, copies: int, batch: int, channels: int, width: int, height: int, itemsize: int,
            tiled: bool) -> Need:
    """The whole pass's need, or the banded pass's (two whole activations, float16 above 1 GiB)."""
    if not tiled:
        return Need(network, copies, batch, channels, width, height, itemsize)
    if batch * channels * width * height * 4 > DEFAULT_EXACT_BYTES:
        itemsize = 2
    return Need(f"{network} (tiled)", 2, batch, channels, width, height, itemsize)


def decoder_need(config: AutoencoderConfig, batch: int, width: int, height: int, itemsize: int,
                 tiled: bool = False) -> Need:
    """The VAE decoder making ``batch`` images of ``width`` x ``height`` pixels at once."""
    mult = config.ch_mult
    widths = [config.ch * max(m, mult[min(i + 1, len(mult) - 1)]) for i, m in enumerate(mult)]
    return _banded("VAE decoder", 4, batch, *_largest_level(widths, width, height), itemsize, tiled)


def encoder_need(config: AutoencoderConfig, width: int, height: int, itemsize: int, tiled: bool = False) -> Need:
    """The VAE encoder reading one image of ``width`` x ``height`` pixels."""
    mult = config.ch_mult
    widths = [config.ch * max(m, mult[i - 1] if i else 1) for i, m in enumerate(mult)]
    return _banded("VAE encoder", 6, 1, *_largest_level(widths, width, height), itemsize, tiled)


def _attends(config: UNetConfig, level: int) -> bool:
    depth = config.transformer_depth
    depth = depth[level] if isinstance(depth, tuple) else depth
    return 2**level in config.attention_resolutions and (depth > 0 or not config.use_spatial_transformer)


def unet_need(config: UNetConfig, batch: int, latent_width: int, latent_height: int, itemsize: int) -> Need:
    """The UNet denoising ``batch`` latents (twice the images under classifier-free guidance)."""
    widths = []
    for level, mult in enumerate(config.channel_mult):
        channels = config.model_channels * mult
        factor = (8 if config.use_spatial_transformer else 3) if _attends(config, level) else 2
        widths.append(factor * channels)
    channels, w, h = _largest_level(widths, latent_width, latent_height)
    return Need("UNet", 5, batch, channels, w, h, itemsize)


# ---------------------------------------------------------------------------------------------- free memory
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _reclaimable_cache(stat: Path) -> int:
    """The cgroup's inactive file pages: page cache the kernel drops before refusing memory."""
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_available() -> int | None:
    for folder, limit_name, usage_name in ((Path("/sys/fs/cgroup"), "memory.max", "memory.current"),
                                           (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes",
                                            "memory.usage_in_bytes")):
        limit, usage = _read_int(folder / limit_name), _read_int(folder / usage_name)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes "no limit" as a huge number
            return max(limit - usage + _reclaimable_cache(folder / "memory.stat"), 0)
    return None


def _host_available() -> int | None:
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    cgroup = _cgroup_available()
    if cgroup is not None:
        found.append(cgroup)
    return min(found) if found else None


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``, or None where that cannot be told (then nothing is checked)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return _host_available() if device.type == "cpu" else None


# ---------------------------------------------------------------------------------------------- the check
def _gib(count: float) -> str:
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / 2**20:.0f} MiB"


def check_fits(needs: list[Need], available: int | None, *, size: tuple[int, int], multiple: int,
               batch: int = 1, tiled_alternative: Need | None = None) -> None:
    """InsufficientMemoryError when the largest need exceeds ``available``. It says how large the request
    is, and what fits instead: tiled decoding, a smaller batch, the largest square size of one image
    (every need grows in proportion to the pixels and the batch)."""
    if available is None:
        return
    worst = max(needs, key=lambda need: need.bytes)
    if worst.bytes <= available:
        return
    width, height = size
    advice = []
    if tiled_alternative is not None and worst.network in ("VAE decoder", "VAE encoder"):
        others = max([need.bytes for need in needs if need is not worst] + [tiled_alternative.bytes])
        if others <= available:
            advice.append(f"--tiled-vae (Pipeline(tiled_vae=True); then about {_gib(others)})")
    if batch > 1 and batch * available // worst.bytes >= 1:
        advice.append(f"--batch-size {batch * available // worst.bytes}")
    side = math.isqrt(width * height * batch * available // worst.bytes)
    side -= side % multiple
    one = "one image at a time, " if batch > 1 else ""
    advice.append(f"{one}a size up to about {side}x{side}" if side >= multiple else "a smaller size")
    raise InsufficientMemoryError(
        f"{_request(width, height, batch)} needs about {_gib(worst.bytes)} for the {worst.network} "
        f"({worst.detail}), but only {_gib(available)} of memory is free; use {' or '.join(advice)}"
    )


def _request(width: int, height: int, batch: int) -> str:
    return f"a batch of {batch} {width}x{height} images" if batch > 1 else f"a {width}x{height} image"


def check_sampling(pipe: Pipeline, batch: int, latent_width: int, latent_height: int, guided: bool,
                   tiled_decode: bool | None = None) -> None:
    """Refuse to sample ``batch`` latents of this size, and decode them (in bands when ``tiled_decode``;
    by default as the pipeline does), when that cannot fit."""
    f = pipe.latent_factor
    width, height = latent_width * f, latent_height * f
    vae, itemsize = pipe.spec.autoencoder, pipe.dtype.itemsize
    tiled = pipe.tiled_vae if tiled_decode is None else tiled_decode
    unet = unet_need(pipe.spec.unet, batch * (2 if guided else 1), latent_width, latent_height,
                     2 if pipe.bf16 else itemsize)
    decode = decoder_need(vae, batch, width, height, itemsize, tiled=tiled)
    alternative = None if tiled else decoder_need(vae, batch, width, height, itemsize, tiled=True)
    check_fits([unet, decode], available_bytes(pipe.device), size=(width, height), multiple=max(8, f),
               batch=batch, tiled_alternative=alternative)


def check_encoding(pipe: Pipeline, width: int, height: int, *, tiled: bool = False) -> None:
    """Refuse to encode an image of this size (in bands when ``tiled``) when that cannot fit."""
    vae, itemsize = pipe.spec.autoencoder, pipe.dtype.itemsize
    need = encoder_need(vae, width, height, itemsize, tiled=tiled)
    alternative = None if tiled else encoder_need(vae, width, height, itemsize, tiled=True)
    check_fits([need], available_bytes(pipe.device), size=(width, height), multiple=max(8, pipe.latent_factor),
               tiled_alternative=alternative)
