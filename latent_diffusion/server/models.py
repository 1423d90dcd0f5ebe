"""The models a server may load: the built-in one, the startup checkpoint and the files of its model folder.

Clients name models by title, file name, stem or hash from this list only; a name is never joined
onto a path, so no other file on disk can be reached through the API.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from latent_diffusion.pipelines.common import Pipeline, default_checkpoint_path
from latent_diffusion.pipelines.png_info import model_hash

MODEL_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelEntry:
    """One loadable checkpoint; ``title`` is what A1111 clients send back in ``sd_model_checkpoint``."""

    name: str
    path: Path
    hash: str | None

    @property
    def title(self) -> str:
        return f"{self.path.name} [{self.hash}]" if self.hash else self.path.name

    def matches(self, key: str) -> bool:
        key = key.strip()
        if key.endswith("]") and " [" in key:
            # "name.safetensors [hash]": the hash must agree when both sides know it.
            key, _, given = key[:-1].rpartition(" [")
            if self.hash is not None and given != self.hash:
                return False
        return key in (self.path.name, self.name) or (self.hash is not None and key == self.hash)


class ModelManager:
    """Lists the model folder and holds the one loaded :class:`Pipeline` (loads happen on the job worker)."""

    def __init__(self, checkpoint: Path | None, models_dir: Path | None,
                 loader: Callable[[Path], Pipeline] | None = None, upscalers: list[Path] | None = None) -> None:
        self.startup = Path(checkpoint) if checkpoint is not None else None
        self.models_dir = Path(models_dir) if models_dir is not None else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise FileNotFoundError(f"model folder not found: {self.models_dir}")
        self.loader = loader or (lambda path: Pipeline.from_checkpoint(path, progress=False))
        self.pipeline: Pipeline | None = None
        self.entry: ModelEntry | None = None
        # Super-resolution models offered by the upscale endpoint next to the resampling filters; each is
        # loaded on first use and kept, beside the generation model.
        self.upscaler_paths = {Path(p).stem: Path(p) for p in (builtin_upscalers() if upscalers is None else upscalers)}
        self._upscalers: dict[str, Pipeline] = {}
        # The last refiner asked for, kept beside the generation model (one at a time: they are large).
        self._refiner: tuple[Path, Pipeline] | None = None
        for path in self.upscaler_paths.values():
            if not path.is_file():
                raise FileNotFoundError(f"upscaler checkpoint not found: {path}")
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()

    def _hash(self, path: Path, compute: bool = True) -> str | None:
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._hashes and compute:
                self._hashes[key] = model_hash(path)
            return self._hashes.get(key)

    def _paths(self) -> list[Path]:
        paths: list[Path] = []
        if self.startup is not None:
            paths.append(self.startup.resolve())
        else:
            try:
                paths.append(default_checkpoint_path().resolve())
            except FileNotFoundError:
                pass
        if self.models_dir is not None:
            paths += sorted(p.resolve() for p in self.models_dir.iterdir()
                            if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)
        return list(dict.fromkeys(paths))

    def entries(self) -> list[ModelEntry]:
        """Every loadable model; hashes are shown once known (hashing a multi-GB file takes a while)."""
        return [ModelEntry(path.stem, path, self._hash(path, compute=False)) for path in self._paths()]

    def find(self, key: str) -> ModelEntry:
        """The listed model a client's name refers to (ValueError naming the choices otherwise)."""
        for entry in self.entries():
            if entry.matches(key):
                return entry
        choices = [e.title for e in self.entries()]
        raise ValueError(f"unknown model {key!r}; choose one of {choices}")

    def load(self, entry: ModelEntry) -> Pipeline:
        """Load ``entry`` unless it is already loaded; call only from the job worker."""
        if self.entry is not None and self.entry.path == entry.path and self.pipeline is not None:
            return self.pipeline
        pipeline = self.loader(entry.path)
        self.pipeline, self.entry = pipeline, ModelEntry(entry.name, entry.path, self._hash(entry.path))
        return pipeline

    def refiner(self, entry: ModelEntry) -> Pipeline:
        """The pipeline of a listed model used as a refiner; call only from the job worker."""
        if entry.path == (self.entry.path if self.entry else None) and self.pipeline is not None:
            return self.pipeline
        if self._refiner is None or self._refiner[0] != entry.path:
            self._refiner = None  # release the previous one before loading the next
            self._refiner = (entry.path, self.loader(entry.path))
        return self._refiner[1]

    def upscaler(self, name: str) -> Pipeline:
        """The super-resolution pipeline listed as ``name``; call only from the job worker."""
        if name not in self.upscaler_paths:
            raise ValueError(f"unknown upscaler {name!r}")
        if name not in self._upscalers:
            self._upscalers[name] = self.loader(self.upscaler_paths[name])
        return self._upscalers[name]

    def trained_input_size(self, name: str) -> int | None:
        """The largest input side the upscaler listed as ``name`` was trained on, where known (the built-in one)."""
        path = self.upscaler_paths.get(name)
        if path is None and self.pipeline is not None and self.entry is not None and self.pipeline.name == name:
            path = self.entry.path
        builtin = [p.resolve() for p in builtin_upscalers()]
        from latent_diffusion.pipelines.common import BUILTIN_UPSCALER_INPUT

        return BUILTIN_UPSCALER_INPUT if path is not None and path.resolve() in builtin else None

    def load_startup(self) -> Pipeline:
        """Load the first listed model: ``--checkpoint``, else the built-in one, else the folder's first."""
        paths = self._paths()
        if not paths:
            raise FileNotFoundError("no model to serve: the built-in model is not installed and no --checkpoint "
                                    "or --models-dir was given")
        return self.load(ModelEntry(paths[0].stem, paths[0], None))


def builtin_upscalers() -> list[Path]:
    """The built-in super-resolution model, when this install has one."""
    from latent_diffusion.pipelines import common

    # Older installs have no built-in upscaler (nor this function).
    find = getattr(common, "default_upscaler_path", None)
    try:
        return [find()] if find is not None else []
    except FileNotFoundError:
        return []
