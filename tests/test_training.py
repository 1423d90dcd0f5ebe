"""Training both stages on generated images: configs, losses going down, resume after SIGKILL, DDP equivalence."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.config import AutoencoderConfig, ConfigError
from latent_diffusion.training.config import load_experiment

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"


def make_images(root: Path, count: int = 8, size: int = 16, seed: int = 0) -> Path:
    """Squares of two colours on grey, with captions and class sub-folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        name = ("red", "blue")[i % 2]
        image = np.full((size, size, 3), 40, np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        image[y : y + size // 2, x : x + size // 2] = (220, 40, 40) if name == "red" else (40, 40, 220)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {name} square")
    return root


def tiny_autoencoder(path: Path) -> Path:
    from latent_diffusion.models.autoencoder import AutoencoderKL
    from latent_diffusion.training.autoencoder import save_autoencoder

    torch.manual_seed(0)
    config = AutoencoderConfig(kind="kl", resolution=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)
    save_autoencoder(AutoencoderKL(config), path)
    return path


def losses(out_dir: Path) -> list[float]:
    with (out_dir / "metrics.csv").open() as handle:
        return [float(row["value"]) for row in csv.DictReader(handle) if row["name"] == "train/loss"]


def ldm_overrides(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return [f"data.root={tmp_path / 'images'}", f"run.out_dir={tmp_path / out}",
            f"ldm.first_stage={tmp_path / 'ae.safetensors'}", *extra]


def images_and_autoencoder(root: Path) -> Path:
    """``root`` with the training images in images/ and a random tiny stage-1 result in ae.safetensors."""
    make_images(root / "images")
    tiny_autoencoder(root / "ae.safetensors")
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return images_and_autoencoder(tmp_path)


# ------------------------------------------------------------------ bad configs fail before training


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_shipped_config_parses_and_validates(path):
    from latent_diffusion.training.config import validate_experiment

    validate_experiment(load_experiment(path, []))


def test_unknown_key_and_wrong_type_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_experiment(TINY / "autoencoder-kl.yaml", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="run.max_steps: expected an integer"):
        load_experiment(TINY / "autoencoder-kl.yaml", ["run.max_steps=ten"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: autoencoder\ndata: {root: x, sise: 3}\n")
    with pytest.raises(ConfigError, match="data.sise"):
        load_experiment(bad)
    config = load_experiment(TINY / "autoencoder-kl.yaml", ["optim.betas=[0.5, 0.9]", "loss.lpips_weights=null"])
    assert config.optim.betas == (0.5, 0.9) and config.loss.lpips_weights is None
    assert load_experiment(TINY / "autoencoder-kl.yaml", ["optim.lr=2e-3"]).optim.lr == 0.002
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        load_experiment(TINY / "autoencoder-kl.yaml", ["optim.lr=fast"])


def test_missing_folder_and_small_images_fail_before_training(tmp_path):
    from latent_diffusion.training.autoencoder import train_autoencoder

    config = load_experiment(TINY / "autoencoder-kl.yaml", [f"data.root={tmp_path / 'nope'}", f"run.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="not a folder"):
        train_autoencoder(config)
    make_images(tmp_path / "small", count=4, size=8)
    (tmp_path / "small" / "red" / "broken.png").write_bytes(b"not an image")
    config = load_experiment(TINY / "autoencoder-kl.yaml", [f"data.root={tmp_path / 'small'}", f"run.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="smaller than the 16px crop"):
        train_autoencoder(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unreadable_images_are_skipped(tmp_path):
    from latent_diffusion.training.data import scan_image_folder

    make_images(tmp_path / "images", count=4)
    (tmp_path / "images" / "red" / "broken.png").write_bytes(b"not an image")
    config = load_experiment(TINY / "autoencoder-kl.yaml", [f"data.root={tmp_path / 'images'}", "data.class_labels=true"])
    records, classes = scan_image_folder(config.data)
    assert len(records) == 4 and classes == ["blue", "red"]
    assert {r.caption for r in records} == {"a red square", "a blue square"}
    assert {r.label for r in records if "red" in r.caption} == {1}


# ------------------------------------------------------------------ both stages learn


def test_tiny_autoencoder_loss_goes_down(tmp_path):
    from latent_diffusion.training.autoencoder import train_autoencoder

    make_images(tmp_path / "images")
    config = load_experiment(TINY / "autoencoder-kl.yaml", [
        f"data.root={tmp_path / 'images'}", f"run.out_dir={tmp_path / 'run'}", "run.max_steps=24", "run.log_every=1",
        "data.validation_fraction=0.25", "run.validate_every=24", "run.sample_every=24",
    ])
    path = train_autoencoder(config)
    values = losses(tmp_path / "run")
    # Stated margin: the last four steps average under 60% of the first four.
    assert np.mean(values[-4:]) < 0.6 * np.mean(values[:4]), values
    assert path.is_file() and (tmp_path / "run" / "samples" / "step-00000024.png").is_file()
    rows = (tmp_path / "run" / "metrics.csv").read_text()
    assert "val/psnr" in rows and "val/ssim" in rows


def test_autoencoder_mse_loss_and_logvar_start(tmp_path):
    # The shapes-world recipe's options: an MSE term instead of L1, a small starting posterior std
    # and fewer GroupNorm groups. The loss logged is then the MSE (plus a tiny KL), and it falls.
    from latent_diffusion.models.autoencoder import AutoencoderKL
    from latent_diffusion.training.autoencoder import init_logvar, train_autoencoder

    make_images(tmp_path / "images")
    config = load_experiment(TINY / "autoencoder-kl.yaml", [
        f"data.root={tmp_path / 'images'}", f"run.out_dir={tmp_path / 'run'}", "run.max_steps=24", "run.log_every=1",
        "loss.l1_weight=0.0", "loss.l2_weight=1.0", "loss.logvar_init=-6.0", "autoencoder.norm_groups=8",
    ])
    train_autoencoder(config)
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle)]
    l2 = [float(r["value"]) for r in rows if r["name"] == "train/l2"]
    loss = [float(r["value"]) for r in rows if r["name"] == "train/loss"]
    assert len(l2) == 24 and all(total >= mse for total, mse in zip(loss, l2))
    assert np.mean(l2[-4:]) < 0.6 * np.mean(l2[:4]), l2

    model = AutoencoderKL(config.autoencoder)
    init_logvar(model, -6.0)
    posterior = model.encode(torch.rand(2, 3, config.data.size, config.data.size) * 2 - 1)
    assert torch.allclose(posterior.logvar, torch.full_like(posterior.logvar, -6.0))


def test_tiny_ldm_loss_goes_down_and_loads(data):
    from latent_diffusion.checkpoints.load import load_checkpoint
    from latent_diffusion.training.ldm import train_ldm

    config = load_experiment(TINY / "ldm-txt2img.yaml", ldm_overrides(data, "ldm", "run.max_steps=30", "run.log_every=1"))
    path = train_ldm(config)
    values = losses(data / "ldm")
    # Stated margin: the last eight steps average under 80% of the first eight.
    assert np.mean(values[-8:]) < 0.8 * np.mean(values[:8]), values
    loaded = load_checkpoint(path, config_yaml=path.with_suffix(".yaml"), use_ema=True)
    assert loaded.ema.present and loaded.spec.conditioning == "crossattn"
    # Without the YAML the spec stored in the file's header gives the same model.
    assert load_checkpoint(path, use_ema=True).spec == loaded.spec
    assert loaded.spec.scale_factor == pytest.approx(float(torch.load(sorted((data / "ldm" / "checkpoints").iterdir())[-1],
                                                                      weights_only=False)["scale_factor"]), rel=1e-6)


# ------------------------------------------------------------------ resume and distributed


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "latent_diffusion.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def _unet_weights(path: Path) -> dict[str, torch.Tensor]:
    from latent_diffusion.checkpoints.io import read_state_dict

    return {k: v.clone() for k, v in read_state_dict(path).items() if k.startswith("model.diffusion_model.")}


UNCOND = ["ldm.task=unconditional", "ldm.unet.context_dim=null", "ldm.unet.use_spatial_transformer=false",
          "ldm.conditioner.kind=none", "run.max_steps=8", "run.checkpoint_every=2"]


def test_sigkill_then_resume_matches_uninterrupted_run(data):
    config = str(TINY / "ldm-txt2img.yaml")
    reference = _run_cli([config, *ldm_overrides(data, "straight", *UNCOND)])
    assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()

    victim = _run_cli([config, *ldm_overrides(data, "killed", *UNCOND)])
    checkpoints = data / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not any(checkpoints.glob("step-*.pt")) and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # Whatever moment the kill hit, only complete state files carry the final name.
    for path in checkpoints.glob("step-*.pt"):
        torch.load(path, weights_only=False)
    resumed = _run_cli([config, *ldm_overrides(data, "killed", *UNCOND)])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()

    expected, got = _unet_weights(data / "straight" / "model.safetensors"), _unet_weights(data / "killed" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_torchrun_two_processes_match_one_process(data):
    config = str(TINY / "ldm-txt2img.yaml")
    common = ["run.max_steps=3", "run.batch_size=4", "optim.ema_decay=0"]
    single = _run_cli([config, *ldm_overrides(data, "one", *common)])
    assert single.wait(timeout=300) == 0, single.stdout.read().decode()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "latent_diffusion.cli", "train", config, *ldm_overrides(data, "two", *common)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]
    one, two = _unet_weights(data / "one" / "model.safetensors"), _unet_weights(data / "two" / "model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
