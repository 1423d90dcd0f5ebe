"""Reading weight files safely: formats, refusals and clear errors."""
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch

from latent_diffusion.checkpoints.io import (
    CheckpointError, read_safetensors_metadata, read_state_dict, read_tensor_infos, save_safetensors,
)


def _tensors():
    return {
        "a.weight": torch.randn(3, 5),
        "b.bias": torch.randn(7).half(),
        "c.steps": torch.arange(4, dtype=torch.int64),
        "d.flag": torch.tensor([True, False]),
        "e.scalar": torch.tensor(2.5),
    }


def _assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_safetensors_round_trip_matches_the_reference_library(tmp_path):
    tensors = _tensors()
    ours = tmp_path / "ours.safetensors"
    save_safetensors(tensors, ours, metadata={"format": "pt", "note": "x"})
    _assert_same(safetensors.torch.load_file(ours), tensors)  # the reference reader accepts our files
    _assert_same(read_state_dict(ours), tensors)
    assert read_safetensors_metadata(ours) == {"format": "pt", "note": "x"}
    theirs = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, theirs)
    _assert_same(read_state_dict(theirs), tensors)
    infos = read_tensor_infos(theirs)
    assert infos["a.weight"].shape == (3, 5) and infos["b.bias"].dtype == torch.float16


def test_safetensors_are_memory_mapped_not_copied(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors({"w": torch.randn(64, 64), "v": torch.randn(10)}, path)
    loaded = read_state_dict(path)
    # Both tensors view one file-backed storage rather than owning private copies.
    assert loaded["w"].untyped_storage().data_ptr() == loaded["v"].untyped_storage().data_ptr()
    loaded["w"].zero_()  # copy-on-write: the file is untouched
    assert not torch.all(read_state_dict(path)["w"] == 0)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickled_checkpoints_load_and_unwrap_state_dict(tmp_path, suffix):
    tensors = _tensors()
    wrapped = tmp_path / f"wrapped{suffix}"
    torch.save({"state_dict": tensors, "global_step": 10, "epoch": 1}, wrapped)
    _assert_same(read_state_dict(wrapped), tensors)
    bare = tmp_path / f"bare{suffix}"
    torch.save(tensors, bare)
    _assert_same(read_state_dict(bare), tensors)


def test_legacy_pickle_format_loads(tmp_path):
    path = tmp_path / "old.ckpt"
    tensors = _tensors()
    torch.save({"state_dict": tensors}, path, _use_new_zipfile_serialization=False)
    _assert_same(read_state_dict(path), tensors)


def test_format_comes_from_content_not_name(tmp_path):
    path = tmp_path / "actually_safetensors.ckpt"
    tensors = _tensors()
    save_safetensors(tensors, path)
    _assert_same(read_state_dict(path), tensors)


def test_lightning_callback_metadata_does_not_block_loading(tmp_path, monkeypatch):
    # Lightning checkpoints key callback states by class; build one without Lightning installed.
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    path = tmp_path / "lightning.ckpt"
    tensors = _tensors()
    torch.save({"state_dict": tensors, "callbacks": {ModelCheckpoint: {"best": 1.0}}}, path)
    monkeypatch.delitem(sys.modules, module.__name__)
    _assert_same(read_state_dict(path), tensors)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused.*system"):
        read_state_dict(path)
    assert not marker.exists()
    raw = tmp_path / "evil_raw.pt"  # a plain pickle stream, as in the pre-zip format
    raw.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    with pytest.raises(CheckpointError):
        read_state_dict(raw)
    assert not marker.exists()


def test_clear_errors_for_things_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "missing.safetensors")
    png = tmp_path / "image.ckpt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="PNG image"):
        read_state_dict(png)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, these are not weights\n")
    with pytest.raises(CheckpointError, match="text file"):
        read_state_dict(text)
    lfs = tmp_path / "model.ckpt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="Git LFS"):
        read_state_dict(lfs)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(empty)
    with pytest.raises(CheckpointError, match="folder"):
        read_state_dict(tmp_path)


def test_truncated_files_are_reported(tmp_path):
    full = tmp_path / "full.safetensors"
    save_safetensors({"w": torch.randn(256, 256)}, full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(cut)
    ckpt = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}}, ckpt)
    cut_ckpt = tmp_path / "cut.ckpt"
    cut_ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(cut_ckpt)


def test_empty_and_non_tensor_state_dicts_are_errors(tmp_path):
    empty_st = tmp_path / "empty.safetensors"
    save_safetensors({}, empty_st)
    with pytest.raises(CheckpointError, match="no tensors"):
        read_state_dict(empty_st)
    empty_ckpt = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {}}, empty_ckpt)
    with pytest.raises(CheckpointError, match="no tensors"):
        read_state_dict(empty_ckpt)
    odd = tmp_path / "odd.ckpt"
    torch.save({"w": torch.zeros(1), "name": "hello"}, odd)
    with pytest.raises(CheckpointError, match="not tensors"):
        read_state_dict(odd)


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors({"w": torch.ones(3)}, path)
    with pytest.raises(CheckpointError):
        save_safetensors({"w": torch.ones(3), "z": torch.zeros(2, dtype=torch.complex64)}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left behind


def _resident_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page residency is read from /proc")
def test_released_file_pages_leave_memory_but_the_data_stays_readable(tmp_path):
    from latent_diffusion.checkpoints.io import release_file_pages

    weights = {"big": torch.randn(64, 1024, 256)}  # 64 MiB
    path = tmp_path / "big.safetensors"
    save_safetensors(weights, path)
    mapped = read_state_dict(path)["big"]
    before = _resident_kib()
    half = mapped.half()  # touches every page of the mapping
    touched = _resident_kib()
    release_file_pages(mapped)
    released = _resident_kib()
    assert touched - before > 60 * 1024  # the fp32 pages (64 MiB) plus the fp16 copy (32 MiB)
    assert touched - released > 56 * 1024  # nearly all the file's pages went
    assert torch.equal(mapped, weights["big"])  # read again from the file when touched
    assert torch.equal(half, weights["big"].half())


def test_releasing_pages_of_ordinary_memory_does_nothing():
    from latent_diffusion.checkpoints.io import release_file_pages

    tensor = torch.randn(256, 1024)
    copy = tensor.clone()
    release_file_pages(tensor)
    assert torch.equal(tensor, copy)


def test_atomically_written_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
