"""Safe reading and atomic writing of weight files.

``.safetensors`` files are parsed here and memory-mapped copy-on-write, so a tensor read from one
costs no memory until a page is touched and never exists twice. Pickled PyTorch files
(``.ckpt``/``.pt``/``.pth``/``.bin``) go through ``torch.load(weights_only=True)``: a pickle that
asks to call anything but tensor rebuilding is refused before it can run. The format is taken from
the file's first bytes, not its name, so a mislabelled file still loads and a PNG or an HTML error
page saved as ``model.ckpt`` gets an error that says what it is.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import pickle
import re
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Literal, Mapping

import torch
from torch.multiprocessing.reductions import StorageWeakRef


class CheckpointError(ValueError):
    """A weight file that cannot be read, is unsafe, or does not hold the expected model."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


FileFormat = Literal["safetensors", "torch-zip", "torch-legacy"]

# https://github.com/huggingface/safetensors#format
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# Content that people commonly mistake for weights, so the error can say what the file is.
_KNOWN_NON_CHECKPOINTS = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"version https://git-lfs", "a Git LFS pointer (the weights were never downloaded)"),
    (b"<!DOCTYPE", "an HTML page (a failed download?)"),
    (b"<html", "an HTML page (a failed download?)"),
    (b"\x1f\x8b", "a gzip archive"),
)


def _describe_foreign_content(head: bytes) -> str:
    for magic, what in _KNOWN_NON_CHECKPOINTS:
        if head.lower().startswith(magic.lower()):
            return what
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return f"unrecognised binary data starting with {head[:8]!r}"


def sniff_format(path: str | os.PathLike) -> FileFormat:
    """Which kind of weight file ``path`` is, judged from its first bytes; errors name what it is instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a weight file (a diffusers folder? see convert.py)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= min(size - 8, _MAX_HEADER_BYTES) and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode: torch.save before the zip format
        return "torch-legacy"
    raise CheckpointError(f"{path}: not a checkpoint, it is {_describe_foreign_content(head)}")


# ------------------------------------------------------------------------------------------
# safetensors


@dataclass(frozen=True)
class _SafetensorsHeader:
    entries: dict[str, tuple[TensorInfo, int, int]]  # name -> (info, begin, end) in the data section
    metadata: dict[str, str]
    data_start: int


def _parse_safetensors_header(path: Path) -> _SafetensorsHeader:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {header_len})")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: corrupt safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_len = size - data_start
    entries: dict[str, tuple[TensorInfo, int, int]] = {}
    covered = 0
    for name, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {entry!r}") from None
        info = TensorInfo(shape, dtype)
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(f"{path}: corrupt safetensors file: {name!r} has {end - begin} bytes for shape {shape}")
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated file: {name!r} ends at byte {data_start + end} but the file has {size} bytes"
            )
        entries[name] = (info, begin, end)
        covered = max(covered, end)
    if covered != data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file: {data_len - covered} bytes after the last tensor")
    return _SafetensorsHeader(entries, dict(metadata), data_start)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    header = _parse_safetensors_header(path)
    size = path.stat().st_size
    # MAP_PRIVATE mapping: pages are read on first touch, shared with the page cache, and
    # copy-on-write if someone later trains in place, so the file itself is never modified.
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    _remember_mapping(storage)
    tensors: dict[str, torch.Tensor] = {}
    for name, (info, begin, _end) in header.entries.items():
        offset = header.data_start + begin
        itemsize = info.dtype.itemsize
        if offset % itemsize == 0:
            tensor = torch.empty(0, dtype=info.dtype)
            tensor.set_(storage, offset // itemsize, info.shape)
        else:  # misaligned writer: fall back to a copy for this one tensor
            raw = storage[offset : offset + info.nbytes]
            tensor = torch.empty(0, dtype=torch.uint8).set_(raw).view(info.dtype).reshape(info.shape).clone()
        tensors[name] = tensor
    return tensors


def release_file_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel a memory-mapped tensor's pages are no longer needed (Linux; no-op elsewhere).

    Converting a mapped fp32 file to fp16 touches every page of the mapping, and they would all stay
    resident (counted in the process's memory) until the last tensor is converted. The mapping is
    private and never written, so dropped pages would simply be read from the file again if touched.
    """
    # Only tensors of a mapping this module made: on ordinary memory the advice would zero the data.
    if _LIBC is None or tensor.numel() == 0 or not _file_mapped(tensor):
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages inside the tensor only
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def _remember_mapping(storage: torch.UntypedStorage) -> None:
    # A weak reference to the storage itself: an address is only trusted while its mapping lives.
    _MAPPINGS[:] = [(ref, ptr) for ref, ptr in _MAPPINGS if not ref.expired()]
    _MAPPINGS.append((StorageWeakRef(storage), storage.data_ptr()))


def _file_mapped(tensor: torch.Tensor) -> bool:
    storage = tensor.untyped_storage()
    return any(not ref.expired() and ptr == storage.data_ptr() and ref.cdata == storage._cdata
               for ref, ptr in _MAPPINGS)


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
_MAPPINGS: list[tuple[StorageWeakRef, int]] = []  # storages mapped from files, with their addresses
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file."""
    return _parse_safetensors_header(Path(path)).metadata


# ------------------------------------------------------------------------------------------
# pickled PyTorch files


class _InertStandIn:
    """Replaces a training-framework class that checkpoints mention in their metadata only."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


# Lightning stores its callbacks' states keyed by their classes; those globals are names of
# classes, not weights, so we let them through as inert stand-ins instead of refusing the file.
_METADATA_GLOBALS = [
    (_InertStandIn, name)
    for name in (
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
        "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
        "lightning_fabric.utilities.data.AttributeDict",
        "pytorch_lightning.utilities.parsing.AttributeDict",
    )
]


def _numpy_scalar_globals() -> list:
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but reading weights should not hinge on it
        return []
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtype_classes = [type(np.dtype(kind)) for kind in ("int64", "int32", "float64", "float32")]
    return [
        (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
        np.dtype, *dtype_classes,
    ]


def _check_torch_zip(path: Path) -> None:
    """CheckpointError unless the zip archive has the layout ``torch.save`` writes (``<name>/data.pkl``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({error})") from None
    if not any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} files)" if len(names) > 3 else "")
        raise CheckpointError(f"{path}: a zip archive holding {shown or 'nothing'}, not a PyTorch checkpoint")


def _torch_load(path: Path, kind: FileFormat) -> object:
    if kind == "torch-zip":
        _check_torch_zip(path)
    allowed = _METADATA_GLOBALS + _numpy_scalar_globals()
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "torch-zip")
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            culprit = found.group(1) if found else "an object that is not a tensor"
            raise CheckpointError(
                f"{path}: refused: the pickle asks to call {culprit}, and only tensors and plain "
                "containers are loaded from pickled checkpoints (a pickle can run arbitrary code). "
                "If you trust this file, convert it to .safetensors with the tool that made it."
            ) from None
        except (EOFError, zipfile.BadZipFile) as error:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({error or 'unexpected end of file'})") from None
        except RuntimeError as error:
            message = str(error)
            if "data.pkl" in message or "locating file" in message:
                raise CheckpointError(f"{path}: a zip archive, but not a PyTorch checkpoint") from None
            if any(s in message for s in ("PytorchStreamReader", "central directory", "zip archive", "unexpected EOF", "storage")):
                raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({message.splitlines()[0]})") from None
            raise


def _unwrap_state_dict(path: Path, obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: not a state dict: {len(not_tensors)} entries are not tensors, e.g. {not_tensors[:5]}"
        )
    return obj


# ------------------------------------------------------------------------------------------
# public API


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a weight file, lazily memory-mapped where the format allows; never runs code."""
    path = Path(path)
    kind = sniff_format(path)
    if kind == "safetensors":
        state_dict = _read_safetensors(path)
    else:
        state_dict = _unwrap_state_dict(path, _torch_load(path, kind))
    if not state_dict:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors (empty state dict)")
    return state_dict


def read_saved_object(path: str | os.PathLike) -> object:
    """What a weight file holds: a safetensors file's tensors, or the object a pickled file was saved
    from (tensors and plain containers only, as for :func:`read_state_dict`; never runs code)."""
    path = Path(path)
    kind = sniff_format(path)
    return _read_safetensors(path) if kind == "safetensors" else _torch_load(path, kind)


def read_tensor_infos(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Shapes and dtypes of a weight file's tensors; safetensors are answered from the header alone."""
    path = Path(path)
    if sniff_format(path) == "safetensors":
        infos = {name: info for name, (info, _b, _e) in _parse_safetensors_header(path).entries.items()}
        if not infos:
            raise CheckpointError(f"{path}: the checkpoint holds no tensors (empty state dict)")
        return infos
    # Memory-mapped pickles: asking for shapes touches no tensor data.
    return {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in read_state_dict(path).items()}


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for writing; on success fsync and rename it over ``path``.

    A reader (or a run resumed after a crash) sees the old file or the complete new one, never a
    half-written one; on error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode an ordinary open() would.
        os.fchmod(handle, 0o666 & ~_current_umask())
        with os.fdopen(handle, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    # Linux reports it without changing it; os.umask can only read it by setting it, which would
    # briefly affect other threads' new files.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as ``.safetensors`` atomically: a temporary file in the same folder, then rename.

    Tensors are streamed one by one, so writing needs no second copy of the model in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].dtype.itemsize, kv[0]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, tensor in items:
        if tensor.dtype not in _SAFETENSORS_NAMES:
            raise CheckpointError(f"cannot store {name!r}: dtype {tensor.dtype} has no safetensors name")
        nbytes = tensor.numel() * tensor.dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw_header = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw_header += b" " * (-len(raw_header) % 8)  # keeps every tensor aligned for zero-copy mapping

    with atomic_write(path) as out:
        out.write(struct.pack("<Q", len(raw_header)))
        out.write(raw_header)
        for _name, tensor in items:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                out.write(memoryview(flat.view(torch.uint8).numpy()))
