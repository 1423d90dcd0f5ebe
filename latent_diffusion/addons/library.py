"""The folders LoRAs and embeddings are found in, by the names prompts use.

A file's name is its stem (``models/loras/style/ink.safetensors`` is ``ink``, also ``style/ink``),
as in A1111. Without ``--lora-dir`` / ``--embeddings-dir`` the folders are ``loras`` and
``embeddings`` under the models folder: ``$LDM_MODELS_DIR``, else ``./models``. A default folder
that does not exist is simply empty; a folder that was asked for and does not exist is an error.
Files are read once and read again when they change on disk.
"""
from __future__ import annotations

import difflib
import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from latent_diffusion.addons.lora_family import seems_made_for
from latent_diffusion.checkpoints.io import read_safetensors_metadata, read_tensor_infos, sniff_format

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")
HASH_CHARS = 12  # A1111's short hashes of LoRAs and embeddings
_CHUNK = 1 << 20
Item = TypeVar("Item")


def models_folder() -> Path:
    return Path(os.environ.get("LDM_MODELS_DIR", "models"))


def default_lora_dir() -> Path:
    return models_folder() / "loras"


def default_embeddings_dir() -> Path:
    return models_folder() / "embeddings"


def addon_hash(path: Path) -> str:
    """A1111's short hash: of a safetensors file's tensor data (kohya's, which ignores the metadata
    header), of the whole file otherwise."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if sniff_format(path) == "safetensors":
            handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()[:HASH_CHARS]


class AddonFolder(Generic[Item]):
    """The files of one kind in a folder (and its subfolders), each read when first asked for."""

    kind = "file"  # in messages

    def __init__(self, folder: str | os.PathLike | None, read: Callable[[Path], Item]) -> None:
        self.asked = folder is not None
        self.folder = Path(folder) if folder is not None else self.default_folder()
        if self.asked and not self.folder.is_dir():
            raise FileNotFoundError(f"{self.kind} folder not found: {self.folder}")
        self._read = read
        self._files: dict[str, Path] | None = None
        self._cache: dict[Path, tuple[tuple[int, int], Item, str | None]] = {}

    @staticmethod
    def default_folder() -> Path:
        raise NotImplementedError

    def refresh(self) -> None:
        """Look at the folder again (new, renamed and removed files)."""
        self._files = None

    def files(self) -> dict[str, Path]:
        """Every name a file answers to -> the file."""
        if self._files is None:
            self._files = {}
            if self.folder.is_dir():
                for path in sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()):
                    relative = path.relative_to(self.folder).with_suffix("").as_posix()
                    self._files.setdefault(path.stem, path)
                    self._files[relative] = path
        return self._files

    def names(self) -> list[str]:
        """One name per file: its stem, or its path in the folder where two files share a stem."""
        paths = sorted(set(self.files().values()))
        stems = Counter(path.stem for path in paths)
        return [path.stem if stems[path.stem] == 1 else path.relative_to(self.folder).with_suffix("").as_posix()
                for path in paths]

    def path_of(self, name: str) -> Path:
        files = self.files()
        if name in files:
            return files[name]
        close = difflib.get_close_matches(name, list(files), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else (
            f" (it has {len(files)}: {', '.join(sorted(files)[:8])})" if files else " (it has none)")
        where = self.folder if self.asked or self.folder.is_dir() else f"{self.folder}, which does not exist"
        raise ValueError(f"unknown {self.kind} {name!r}: no such file in {where}{hint}")

    def read(self, name: str) -> Item:
        """The named file, read (again only when it changed on disk)."""
        return self._entry(self.path_of(name))[1]

    def short_hash(self, name: str) -> str:
        path = self.path_of(name)
        stamp, item, digest = self._entry(path)
        if digest is None:
            digest = addon_hash(path)
            self._cache[path] = (stamp, item, digest)
        return digest

    def _entry(self, path: Path):
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self._read(path), None)
            self._cache[path] = cached
        return cached


class LoraLibrary(AddonFolder):
    kind = "LoRA"

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        from latent_diffusion.addons.lora_file import read_lora_file

        super().__init__(folder, read_lora_file)

    @staticmethod
    def default_folder() -> Path:
        return default_lora_dir()

    def describe(self, name: str) -> dict[str, Any]:
        """What A1111's ``/sdapi/v1/loras`` says of a file, and the family it seems made for (read from
        its header alone)."""
        path = self.path_of(name)
        metadata = read_safetensors_metadata(path) if sniff_format(path) == "safetensors" else {}
        shapes = {key: info.shape for key, info in read_tensor_infos(path).items()}
        return {"name": name, "alias": metadata.get("ss_output_name") or name,
                "path": path.relative_to(self.folder).as_posix(), "metadata": metadata,
                "family": seems_made_for(shapes, metadata)}
