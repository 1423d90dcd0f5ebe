"""An optional compiled UNet: compiled ahead of time by Inductor with frozen weights, one package per
input shape, kept on disk so that a shape is compiled once, not once per process.

Freezing turns the weights into constants of the compiled graph, so Inductor packs them in oneDNN's
blocked layouts once and fuses the small ops around the products; the package is C++ that calls the
kernels directly, without PyTorch's per-layer dispatch in Python, which is most of a small UNet's
eager step (the built-in model: 8.8 ms against 15.9 ms, the same fp32 results to 2e-5; bf16 mode's
graph 7.3 ms). The price is a compile per input shape (batch, latent size, context length): about
a minute for the built-in model, more for SD-size UNets, paid the first time a shape is seen on a
machine; afterwards the package loads in milliseconds. Packages live in ``$LDM_COMPILE_CACHE`` (default
``~/.cache/latent-diffusion/compiled``), named by a digest of everything the compiled code depends
on: the weights, the inputs' shapes and dtypes, the torch version and the CPU's vector instructions.
A package is kept only once its output on the inputs it was compiled for matches the eager UNet's.
A process keeps the last KEEP_LOADED shapes loaded (each holds its own copy of the weights); a
server that sees many sizes loads the others from disk as they come back.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

KEEP_LOADED = 2
# Below this many UNet parameters Inductor also times its own matmul kernels against oneDNN's and
# keeps the faster: on the built-in model's small products its bf16 AMX micro-kernels are several
# times faster (a bf16 step 5.7 ms against 9.6; fp32 7.8 against 8.7, measured alone), for a compile
# of 70-140 s instead of 35 s. On SD-size UNets the search would multiply a compile of minutes.
AUTOTUNE_BELOW = 100_000_000
PLAIN = {"freezing": True}
AUTOTUNED = {**PLAIN, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
# How far (relative, whole output) a package may be from the eager network on the inputs it was
# compiled for: fp32 packages measure 2e-6; a bf16 graph's fusions round differently from eager bf16.
RELATIVE_TOLERANCE = {False: 1e-4, True: 3e-2}


def compile_cache_dir() -> Path:
    """Where compiled packages are kept: ``$LDM_COMPILE_CACHE`` or ``~/.cache/latent-diffusion/compiled``."""
    configured = os.environ.get("LDM_COMPILE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "latent-diffusion" / "compiled"


def weights_digest(module: nn.Module) -> str:
    """A digest of every parameter and buffer of ``module``: names, dtypes, shapes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class CompileError(RuntimeError):
    """A compile that failed or made a package unlike the eager UNet; the message says what to do."""


class _Forward(nn.Module):
    """What is exported: ``network`` (the UNet or a mode wrapped around it) with the UNet's signature;
    holding the UNet as a submodule makes its weights the graph's parameters, which freezing folds in."""

    def __init__(self, network: Callable[..., Tensor], unet: nn.Module) -> None:
        super().__init__()
        self.network, self.unet = network, unet

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None,
                control: list[Tensor] | None = None) -> Tensor:
        return self.network(x, timesteps, context, y, control=control) if control is not None else \
            self.network(x, timesteps, context, y)


class CompiledUNet:
    """Calls ``network`` (``unet`` or a mode wrapped around it) through packages compiled for each
    input shape; call it under ``torch.no_grad()``."""

    def __init__(self, network: Callable[..., Tensor], unet: nn.Module, *, cache_dir: Path | None = None,
                 progress: bool = True, autotune: bool | None = None) -> None:
        unet.requires_grad_(False)
        self.network, self.unet = network, unet
        self.cache_dir = cache_dir if cache_dir is not None else compile_cache_dir()
        self.progress = progress
        if autotune is None:
            autotune = sum(parameter.numel() for parameter in unet.parameters()) < AUTOTUNE_BELOW
        self.options = AUTOTUNED if autotune and next(unet.parameters()).device.type == "cpu" else PLAIN
        self.loaded: OrderedDict[str, Callable[..., Tensor]] = OrderedDict()
        self._described: str | None = None  # the weights and the code, described on the first call

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None,
                 **kwargs: Any) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("a UNet compiled with frozen weights is for inference: call it under torch.no_grad()")
        args = (x, timesteps, context, y)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if not all(leaf is None or isinstance(leaf, Tensor) for leaf in leaves):
            # A plain number would be compiled in as a constant (one package per timestep): run eagerly.
            return self.network(*args, **kwargs)
        key = self._key(leaves, spec)
        if key not in self.loaded:
            self.loaded[key] = self._load_or_compile(key, args, kwargs)
            while len(self.loaded) > KEEP_LOADED:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(key)
        return self.loaded[key](*args, **kwargs)

    def weights_changed(self) -> None:
        """The UNet's weights were changed in place (LoRAs merged or taken out): the packages in
        memory hold the old ones; later calls find, or compile, those of the new weights."""
        self.loaded.clear()
        self._described = None

    def _key(self, leaves: list[Any], spec: pytree.TreeSpec) -> str:
        if self._described is None:  # what every package of these weights shares, taken once (not per step)
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            self._described = json.dumps({
                "torch": torch.__version__, "isa": str(pick_vec_isa()), "weights": weights_digest(self.unet),
                "network": type(self.network).__name__, "structure": str(self.unet), "options": self.options,
            }, sort_keys=True)
        inputs = [None if leaf is None else [list(leaf.shape), str(leaf.dtype), str(leaf.device)] for leaf in leaves]
        described = self._described + json.dumps({"inputs": inputs, "spec": str(spec)})
        return hashlib.sha256(described.encode()).hexdigest()[:32]

    def _load_or_compile(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Tensor]:
        path = self.cache_dir / f"unet-{key}.pt2"
        if path.is_file():
            return torch._inductor.aoti_load_package(str(path))
        # Each package is checked against the eager network on the inputs that asked for it before it
        # is kept: Inductor's searched matmul kernels gave NaN on a tiny test UNet (torch 2.13), so a
        # package that disagrees is dropped and the plain compile tried.
        expected = self.network(*args, **kwargs)
        tolerance = RELATIVE_TOLERANCE[next(self.unet.parameters()).dtype == torch.bfloat16]
        attempts = [self.options, PLAIN] if self.options != PLAIN else [PLAIN]
        for options in attempts:
            self._compile(path, args, kwargs, options)
            package = torch._inductor.aoti_load_package(str(path))
            difference = _relative_difference(package(*args, **kwargs), expected)
            if difference <= tolerance:
                return package
            path.unlink()
            if self.progress:
                print(f"the compiled UNet is {difference:.2g} (relative) from the eager one: dropped",
                      file=sys.stderr, flush=True)
        raise CompileError(f"the compiled UNet's output is {difference:.2g} (relative) from the eager UNet's, "
                           f"more than {tolerance:g}: run without --compile")

    def _compile(self, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> None:
        if self.progress:
            print(f"compiling the UNet for inputs of shape {tuple(args[0].shape)}: once for this shape, "
                  f"kept in {self.cache_dir}", file=sys.stderr, flush=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
        try:
            _own_storages(self.unet)
            exported = torch.export.export(_Forward(self.network, self.unet), args, kwargs, strict=False)
            with _inductor_work_dir(self.cache_dir):
                # A copy: the compiler adds its own entries to the dict it is given.
                torch._inductor.aoti_compile_and_package(exported, package_path=str(partial),
                                                         inductor_configs=dict(options))
            os.replace(partial, path)  # whole or not at all: another process may be reading the cache
        except Exception as error:
            raise CompileError(f"compiling the UNet failed ({type(error).__name__}: {error}); "
                               f"run without --compile ({_compile_hint(error, self.unet)})") from error
        finally:
            partial.unlink(missing_ok=True)


def _own_storages(module: nn.Module) -> None:
    """Give each weight of ``module`` a storage of its own. A file loaded without copying leaves every
    weight a view of one buffer the size of the file, and the compiler writes each constant's whole
    storage: SD 1.5's 686 fp32 UNet weights asked it for 686 x 4 GB and failed (MemoryError)."""
    for holder in module.modules():
        for table in (holder._parameters, holder._buffers):
            for name, tensor in table.items():
                if tensor is not None and tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.clone()
                    else:
                        table[name] = tensor.clone()


def _compile_hint(error: BaseException, unet: nn.Module) -> str:
    """What a failed compile most likely lacked. The compiler holds the frozen weights several times
    over while it writes the package (SD 1.5's 3.4 GB fp32 UNet: a 19.4 GB peak)."""
    # Inductor wraps the MemoryError in its own error type, naming it in the message.
    if any(isinstance(cause, MemoryError) or "MemoryError" in str(cause) for cause in _causes(error)):
        size = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**30
        return (f"it ran out of memory: compiling copies the UNet's {size:.1f} GiB of weights several times; "
                "--bf16 halves them")
    return "it needs a C++ compiler, e.g. g++"


def _causes(error: BaseException) -> list[BaseException]:
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    return chain


@contextlib.contextmanager
def _inductor_work_dir(cache_dir: Path):
    """Inductor's work files for one compile, in a folder of ``cache_dir`` deleted afterwards.

    Left to itself Inductor keeps them in ``/tmp/torchinductor_$USER`` for good: several GB per shape of
    an SD-size UNet (45 GB after one session of benchmarks), none of it needed once the package is written.
    """
    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # another torch: Inductor's own folder
        yield
        return
    with tempfile.TemporaryDirectory(prefix="inductor-work-", dir=cache_dir) as work, temporary_cache_dir(work):
        yield


def _relative_difference(output: Tensor, expected: Tensor) -> float:
    """||output - expected|| / ||expected||; NaN anywhere gives inf."""
    output, expected = output.float(), expected.float()
    difference = float((output - expected).norm() / expected.norm().clamp_min(1e-12))
    return difference if difference == difference else float("inf")
