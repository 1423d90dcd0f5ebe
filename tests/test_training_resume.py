"""Resuming both training stages: exact with dropout, clear about changed settings, robust to damaged files."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from latent_diffusion.checkpoints.io import read_state_dict
from latent_diffusion.config import ConfigError
from latent_diffusion.training import checkpointing
from latent_diffusion.training.config import load_experiment
from test_training import TINY, images_and_autoencoder

# A small unconditional LDM and the tiny autoencoder, each with dropout on, EMA, and a checkpoint every 2 steps.
LDM = ["ldm.task=unconditional", "ldm.unet.context_dim=null", "ldm.unet.use_spatial_transformer=false",
       "ldm.conditioner.kind=none", "ldm.unet.dropout=0.3", "optim.warmup_steps=0"]
AUTOENCODER = ["autoencoder.dropout=0.3", "optim.ema_decay=0.9", "loss.disc_start=1", "optim.warmup_steps=0"]
STAGES = {"ldm": ("ldm-txt2img.yaml", LDM, "model.safetensors"),
          "autoencoder": ("autoencoder-kl.yaml", AUTOENCODER, "autoencoder.safetensors")}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only waits


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return images_and_autoencoder(tmp_path_factory.mktemp("resume"))


def config_for(stage: str, data: Path, out: Path, *extra: str):
    file, overrides, _final = STAGES[stage]
    return load_experiment(TINY / file, [f"data.root={data / 'images'}", f"run.out_dir={out}",
                                         f"ldm.first_stage={data / 'ae.safetensors'}", "run.checkpoint_every=2",
                                         "run.keep_last=10", *overrides, *extra])


def train(stage: str, config) -> Path:
    if stage == "ldm":
        from latent_diffusion.training.ldm import train_ldm

        return train_ldm(config)
    from latent_diffusion.training.autoencoder import train_autoencoder

    return train_autoencoder(config)


def steps_saved(out: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in checkpointing.list_checkpoints(out)]


class Interrupted(Exception):
    pass


def stop_after_checkpoint(monkeypatch, step: int) -> None:
    """Make the run end right after writing the checkpoint of ``step``, as a kill at that moment would."""
    real = checkpointing.save_training_state

    def save_then_stop(out_dir, done, state, keep_last):
        path = real(out_dir, done, state, keep_last)
        if done == step:
            raise Interrupted
        return path

    monkeypatch.setattr(checkpointing, "save_training_state", save_then_stop)


@pytest.mark.parametrize("stage", STAGES)
def test_resumed_run_with_dropout_equals_the_uninterrupted_one_bitwise(stage, data, tmp_path, monkeypatch):
    final = STAGES[stage][2]
    straight = train(stage, config_for(stage, data, tmp_path / "straight", "run.max_steps=6"))

    interrupted = config_for(stage, data, tmp_path / "interrupted", "run.max_steps=6")
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 4)
        with pytest.raises(Interrupted):
            train(stage, interrupted)
    assert steps_saved(tmp_path / "interrupted") == [2, 4] and not (tmp_path / "interrupted" / final).exists()
    resumed = train(stage, interrupted)
    assert steps_saved(tmp_path / "interrupted") == [2, 4, 6]

    expected, got = read_state_dict(straight), read_state_dict(resumed)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, different


@pytest.mark.parametrize("stage, setting, old, new", [
    ("ldm", "ldm.unet.model_channels", 32, 64),
    ("autoencoder", "autoencoder.ch", 32, 64),
])
def test_resume_with_a_different_model_size_is_one_clear_error(stage, setting, old, new, data, tmp_path, capsys):
    from latent_diffusion.cli import main

    out = tmp_path / "run"
    train(stage, config_for(stage, data, out, "run.max_steps=2"))
    saved = (out / "checkpoints" / "step-00000002.pt").read_bytes()
    file, overrides, _final = STAGES[stage]
    status = main(["train", str(TINY / file), f"data.root={data / 'images'}", f"run.out_dir={out}",
                   f"ldm.first_stage={data / 'ae.safetensors'}", *overrides, "run.max_steps=4", f"{setting}={new}"])
    error = capsys.readouterr().err
    assert status == 2 and "Traceback" not in error
    assert f"{setting}: {old} in the checkpoint, {new} now" in error, error
    assert "made with a different model" in error and str(out) in error and "run.out_dir" in error, error
    assert (out / "checkpoints" / "step-00000002.pt").read_bytes() == saved


def test_unreadable_latest_checkpoint_is_set_aside_and_the_previous_one_used(data, tmp_path, caplog):
    out = tmp_path / "run"
    train("ldm", config_for("ldm", data, out, "run.max_steps=4"))
    latest = out / "checkpoints" / "step-00000004.pt"
    truncated = latest.read_bytes()[: latest.stat().st_size // 2]
    latest.write_bytes(truncated)

    with caplog.at_level(logging.INFO):
        train("ldm", config_for("ldm", data, out, "run.max_steps=6"))
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"checkpoint {latest} cannot be read" in warning and "step-00000002.pt" in warning, warning
    assert any(f"resuming from {out / 'checkpoints' / 'step-00000002.pt'}" in r.getMessage() for r in caplog.records)
    assert (out / "checkpoints" / "step-00000004.pt.corrupt").read_bytes() == truncated
    assert steps_saved(out) == [2, 4, 6]
    checkpointing.read_training_state(out / "checkpoints" / "step-00000004.pt")  # written anew, whole


def test_no_readable_checkpoint_is_a_clear_error_and_keeps_the_files(data, tmp_path):
    out = tmp_path / "run"
    train("ldm", config_for("ldm", data, out, "run.max_steps=4"))
    for path in checkpointing.list_checkpoints(out):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"no checkpoint in .*checkpoints can be read \(step-00000004.pt: .*step-00000002.pt"):
        train("ldm", config_for("ldm", data, out, "run.max_steps=6"))
    assert steps_saved(out) == [2, 4] and all(p.stat().st_size == 100 for p in checkpointing.list_checkpoints(out))


def test_temporary_files_of_an_interrupted_save_are_removed_on_the_next_start(data, tmp_path, caplog):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    orphans = [out / "checkpoints" / ".step-00000002.pt.k2x_9abc.tmp", out / ".model.safetensors.0a1b2c3d.tmp"]
    others = [out / "checkpoints" / "notes.tmp", out / ".autoencoder.safetensors.0a1b2c3d.tmp", out / "keep.pt.tmp",
              out / "checkpoints" / ".step-00000002.pt.tmp"]
    for path in orphans + others:
        path.write_bytes(b"partial")
    with caplog.at_level(logging.INFO):
        train("ldm", config_for("ldm", data, out, "run.max_steps=1"))
    assert not any(p.exists() for p in orphans)
    assert all(p.read_bytes() == b"partial" for p in others)
    note = "\n".join(r.getMessage() for r in caplog.records)
    assert "removed 2 unfinished temporary file(s)" in note and str(orphans[0]) in note, note


def test_changed_optimiser_settings_on_resume_are_named_and_used(data, tmp_path, caplog):
    from latent_diffusion.training.distributed import setup_distributed
    from latent_diffusion.training.ldm import LDMTrainer

    out = tmp_path / "run"
    train("ldm", config_for("ldm", data, out, "run.max_steps=2", "optim.lr=1e-3", "optim.weight_decay=0.0"))
    changed = config_for("ldm", data, out, "run.max_steps=4", "optim.lr=5e-4", "optim.weight_decay=0.1",
                         "optim.betas=[0.8, 0.99]", "run.log_every=3")
    with caplog.at_level(logging.WARNING):
        trainer = LDMTrainer(changed, setup_distributed("cpu"))
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "this start's values are used" in warning and "optim.lr: 0.001 in the checkpoint, 0.0005 now" in warning
    assert "optim.weight_decay: 0.0 in the checkpoint, 0.1 now" in warning and "run.log_every" not in warning, warning
    assert trainer.start_step == 2
    group = trainer.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1 and tuple(group["betas"]) == (0.8, 0.99)
    assert trainer.optimizer.state[trainer.trainable[0]]["step"].item() == 2  # the moments were restored
    trainer.train_step(2)
    assert group["lr"] == 5e-4
