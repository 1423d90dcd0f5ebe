"""Training a LoRA (configs/lora-sd15.yaml) on a tiny SD 1 file: only the factors change, the kohya file it
writes merges back to the trained model, diffusers loads it, and an interrupted run resumes exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_close_to_reference
from latent_diffusion.addons.lora_file import read_lora_file
from latent_diffusion.addons.lora_merge import LoraUse, MergedLoras
from latent_diffusion.checkpoints.io import read_safetensors_metadata, read_state_dict
from latent_diffusion.checkpoints.load import load_checkpoint
from latent_diffusion.training.config import load_experiment
from latent_diffusion.training.distributed import setup_distributed
from latent_diffusion.training.lora_trainer import LoraTrainer, train_lora
from pipeline_tiny import TINY_SD1, diffusers_components, diffusers_folder, write_checkpoint
from test_training import REPO, make_images
from test_training_resume import Interrupted, steps_saved, stop_after_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

EVERY_KIND = "[to_q, to_k, to_v, to_out, ff]"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lora-train")
    return write_checkpoint(TINY_SD1, folder / "sd1.safetensors"), make_images(folder / "images", count=4, size=32)


def lora_config(sd1, out: Path, *extra: str):
    checkpoint, images = sd1
    return load_experiment(REPO / "configs" / "lora-sd15.yaml", [
        f"ldm.init_checkpoint={checkpoint}", f"data.root={images}", f"run.out_dir={out}", "data.size=32",
        "data.num_workers=0", "run.batch_size=2", "optim.warmup_steps=0", "optim.lr=1e-2", "run.sample_every=0",
        "run.progress=false", "run.checkpoint_every=2", "run.max_steps=3", "optim.precision=fp32", "lora.rank=4",
        *extra])


@pytest.fixture(scope="module")
def trained(sd1, tmp_path_factory):
    """A LoRA on every kind of UNet and text-encoder layer, trained 3 steps in process: (trainer, file)."""
    config = lora_config(sd1, tmp_path_factory.mktemp("run"), f"lora.targets={EVERY_KIND}",
                         f"lora.text_targets={EVERY_KIND}", "ldm.conditioner.drop_prob=0.2")
    trainer = LoraTrainer(config, setup_distributed("cpu"))
    for step in range(config.run.max_steps):
        trainer.train_step(step)
    path = trainer.finish()
    trainer.model.eval()
    return trainer, path


def _unet_inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([417, 31]),
            torch.randn(2, 7, TINY_SD1.unet.context_dim, generator=generator))


def _tokens() -> torch.Tensor:
    tokens = torch.randint(1, TINY_SD1.conditioner.vocab_size - 1, (2, 77), generator=torch.Generator().manual_seed(2))
    tokens[:, 0], tokens[:, 40] = 0, TINY_SD1.conditioner.vocab_size - 1
    return tokens


@torch.no_grad()
def _outputs(model, text_encoder=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet output, text-encoder output) of our model for fixed inputs."""
    x, t, context = _unet_inputs()
    return model.unet(x, t, context=context), model.condition_encoder(_tokens())


def test_training_changes_only_the_lora_factors(sd1, trained):
    trainer, _path = trained
    base = read_state_dict(sd1[0])
    state = trainer.model.state_dict()
    assert set(state) <= set(base)
    changed = [key for key in state if not torch.equal(state[key], base[key])]
    assert not changed, changed[:5]
    trained_names = [name for name, p in trainer.network.named_parameters() if p.requires_grad]
    assert trained_names and all(name.startswith("lora.layers.") for name in trained_names)
    ups = [adapter.lora_up.weight for adapter in trainer.lora.layers.values()]
    assert all(up.abs().max() > 0 for up in ups)  # every factor moved from its zero start
    # per transformer block 4 projections x 2 attentions + 2 feed-forward layers; per text layer 4 + 2
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in trainer.model.unet.modules())
    assert blocks > 0 and len(trainer.lora.layers) == 10 * blocks + 6 * TINY_SD1.conditioner.layers


def test_written_file_merged_at_weight_one_is_the_trained_model(sd1, trained):
    trainer, path = trained
    lora = read_lora_file(path)
    assert {layer.prefix for layer in lora.layers} == {"lora_unet_", "lora_te_"}
    assert all(layer.kind == "lora" and layer.alpha == 8.0 for layer in lora.layers)
    metadata = read_safetensors_metadata(path)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_base_model_version"]) == \
        ("4", "8.0", "sd_v1")
    loaded = load_checkpoint(sd1[0])
    base_unet, base_text = _outputs(loaded.model)
    changed, warnings = MergedLoras(loaded.model, loaded.family, loaded.spec).apply([LoraUse(lora, 1.0, 1.0)])
    assert changed and warnings == []
    merged_unet, merged_text = _outputs(loaded.model)
    wrapped_unet, wrapped_text = _outputs(trainer.model)
    assert (wrapped_unet - base_unet).abs().max() > 0.01 * wrapped_unet.abs().max()
    assert (wrapped_text - base_text).abs().max() > 0.01 * wrapped_text.abs().max()
    assert_close_to_reference(merged_unet, wrapped_unet, rel=1e-5)
    assert_close_to_reference(merged_text, wrapped_text, rel=1e-5)


def test_written_file_loads_in_diffusers_with_the_same_outputs(sd1, trained, tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipeline_tiny import SD_SCHEDULER

    trainer, path = trained
    reference = StableDiffusionPipeline(**diffusers_components(diffusers_folder(sd1[0], tmp_path / "diffusers")),
                                        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    x, t, context = _unet_inputs()
    with torch.no_grad():
        base = reference.unet(x, t, encoder_hidden_states=context).sample
        reference.load_lora_weights(str(path.parent), weight_name=path.name)
        theirs_unet = reference.unet(x, t, encoder_hidden_states=context).sample
        theirs_text = reference.text_encoder(_tokens()).last_hidden_state
    ours_unet, ours_text = _outputs(trainer.model)
    assert (theirs_unet - base).abs().max() > 0.01 * theirs_unet.abs().max()  # diffusers applied the LoRA
    assert_close_to_reference(ours_unet, theirs_unet)
    assert_close_to_reference(ours_text, theirs_text)


def test_killed_and_resumed_run_gives_the_factors_of_an_uninterrupted_one(sd1, tmp_path, monkeypatch):
    extra = ("run.max_steps=4", "ldm.conditioner.drop_prob=0.5", "optim.ema_decay=0.9", "run.keep_last=10")
    straight = train_lora(lora_config(sd1, tmp_path / "straight", *extra))
    assert straight.name == "lora.safetensors"  # the LoRA trainer ran, not the whole-model one

    interrupted = lora_config(sd1, tmp_path / "interrupted", *extra)
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 2)
        with pytest.raises(Interrupted):
            train_lora(interrupted)
    assert steps_saved(tmp_path / "interrupted") == [2] and not (tmp_path / "interrupted" / "lora.safetensors").exists()
    resumed = train_lora(interrupted)
    assert steps_saved(tmp_path / "interrupted") == [2, 4]

    expected, got = read_state_dict(straight), read_state_dict(resumed)
    assert expected.keys() == got.keys()
    assert not [key for key in expected if not torch.equal(expected[key], got[key])]
    # a checkpoint holds the factors, not the frozen model
    state = torch.load(tmp_path / "interrupted" / "checkpoints" / "step-00000004.pt", weights_only=False)
    assert all(".lora_" in key for key in state["network"])


@pytest.mark.parametrize("setting, message", [
    ("lora.rank=0", "lora.rank must be >= 1, got 0"),
    ("lora.alpha=-1", "lora.alpha must be a positive number, got -1.0"),
    ("lora.targets=[to_q, attn]", "lora.targets: unknown layer kind 'attn'; known: ['ff', 'to_k', 'to_out', 'to_q', 'to_v']"),
    ("lora.text_targets=[mlp]", "lora.text_targets: unknown layer kind 'mlp'"),
    ("lora.targets=[]", "lora.targets and lora.text_targets are both empty"),
])
def test_bad_lora_settings_are_clear_errors(sd1, tmp_path, capsys, setting, message):
    from latent_diffusion.cli import main

    checkpoint, images = sd1
    status = main(["train", str(REPO / "configs" / "lora-sd15.yaml"), f"ldm.init_checkpoint={checkpoint}",
                   f"data.root={images}", f"run.out_dir={tmp_path / 'run'}", setting])
    error = capsys.readouterr().err
    assert status == 2 and "Traceback" not in error and message in error, error
    assert not (tmp_path / "run").exists()


def test_a_kind_the_model_lacks_is_named(sd1, tmp_path):
    from checkpoint_tiny import TINY_SD2
    from latent_diffusion.config import ConfigError

    # OpenCLIP computes q, k and v in one fused product: no layer of its own to adapt
    checkpoint = write_checkpoint(TINY_SD2, tmp_path / "sd2.safetensors")
    config = load_experiment(REPO / "configs" / "lora-sd15.yaml", [
        f"ldm.init_checkpoint={checkpoint}", f"data.root={sd1[1]}", f"run.out_dir={tmp_path / 'run'}",
        "data.size=32", "lora.text_targets=[to_out, to_q]"])
    with pytest.raises(ConfigError, match="lora.text_targets: 'to_q' matches no layer of this model's text encoder"):
        LoraTrainer(config, setup_distributed("cpu"))


def test_eval_shapes_applies_a_lora_to_every_prompt(sd1, trained, tmp_path):
    import json
    import shutil

    from test_cli import ldm

    (tmp_path / "loras").mkdir()
    shutil.copy(trained[1], tmp_path / "loras" / "mine.safetensors")
    common = ["eval-shapes", "-c", sd1[0], "--prompts-per-group", 1, "--steps", 2, "--size", 64, "--json", "-q",
              "--lora-dir", tmp_path / "loras"]
    plain, with_lora = ldm(*common), ldm(*common, "--lora", "mine:1")
    assert plain.returncode == 0 and with_lora.returncode == 0, plain.stderr + with_lora.stderr
    assert json.loads(plain.stdout)["frechet_distance"] != json.loads(with_lora.stdout)["frechet_distance"]
    missing = ldm(*common, "--lora", "absent:1")
    assert missing.returncode == 2 and "absent" in missing.stderr and "Traceback" not in missing.stderr, missing.stderr
