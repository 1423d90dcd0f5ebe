"""ControlNet training (``stage: controlnet``): only the ControlNet learns, it starts as the base model,
its file is the release's layout our loader reads strictly, and a killed run resumes exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from controlnet_tiny import randomize
from latent_diffusion.checkpoints.controlnet import CONTROL_PREFIX, load_controlnet
from latent_diffusion.checkpoints.io import read_state_dict
from latent_diffusion.config import ConfigError
from latent_diffusion.training.config import load_experiment
from latent_diffusion.training.controlnet import ControlNetTrainer, controlnet_from_unet, train_controlnet
from latent_diffusion.training.distributed import setup_distributed
from test_training import REPO, TINY, images_and_autoencoder
from test_training_resume import Interrupted, stop_after_checkpoint, steps_saved

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only waits


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Tiny images, and a tiny text-to-image base model with random weights everywhere (its zero-initialised
    output convolutions too, so the base predicts something a ControlNet could change)."""
    from latent_diffusion.training.ldm_model import build_training_model, export_single_file

    root = images_and_autoencoder(tmp_path_factory.mktemp("controlnet"))
    config = load_experiment(TINY / "ldm-txt2img.yaml", [f"ldm.first_stage={root / 'ae.safetensors'}",
                                                         "ldm.scale_factor=0.7"])
    torch.manual_seed(0)
    model, _ = build_training_model(config)
    randomize(model.unet, seed=1)
    export_single_file(model, None, (0.0, 0), root / "base.safetensors")
    return root


def config_overrides(data: Path, out: Path) -> list[str]:
    return ["stage=controlnet", f"controlnet.base_model={data / 'base.safetensors'}", f"data.root={data / 'images'}",
            "data.size=16", "data.crop=center", "data.flip=false", f"run.out_dir={out}", "run.batch_size=4",
            "run.checkpoint_every=2", "run.keep_last=10", "run.progress=false", "run.log_every=1",
            "optim.lr=1e-3", "optim.warmup_steps=0", "optim.precision=fp32", "ldm.conditioner.drop_prob=0.5"]


def config_for(data: Path, out: Path, *extra: str):
    return load_experiment(None, [*config_overrides(data, out), *extra])


def trainer_for(config) -> ControlNetTrainer:
    return ControlNetTrainer(config, setup_distributed("cpu"))


def test_training_changes_only_the_controlnet(data, tmp_path):
    trainer = trainer_for(config_for(data, tmp_path / "run", "run.max_steps=3", "optim.ema_decay=0"))
    base_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    control_before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    for step in range(3):
        trainer.train_step(step)
    assert all(torch.equal(v, base_before[k]) for k, v in trainer.model.state_dict().items())
    after = trainer.network.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, control_before[k])}
    assert "zero_convs.0.0.weight" in changed and "middle_block_out.0.weight" in changed
    assert any(k.startswith("input_hint_block.") for k in changed) and any(k.startswith("input_blocks.") for k in changed)
    assert not any(p.requires_grad for p in trainer.model.parameters())


def test_the_initial_controlnet_copies_the_encoder_and_leaves_the_base_output_unchanged(data):
    from latent_diffusion.checkpoints.load import load_checkpoint

    loaded = load_checkpoint(data / "base.safetensors")
    unet, spec = loaded.model.unet, loaded.spec
    settings = config_for(data, data / "unused").controlnet
    controlnet = controlnet_from_unet(unet, spec, settings)
    copied = {k: v for k, v in controlnet.state_dict().items() if k in unet.state_dict()}
    assert "input_blocks.1.0.in_layers.2.weight" in copied and "middle_block.1.proj_in.weight" in copied
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in copied.items())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=generator)
    context = torch.randn(2, 16, 64, generator=generator)
    hint = torch.rand(2, 3, 16, 16, generator=generator)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        plain = unet(x, t, context=context)
        controlled = unet(x, t, context=context, control=controlnet(x, hint, t, context))
        # The same ControlNet with its zero convolutions randomised does steer: the equality above is no accident.
        steered = unet(x, t, context=context, control=randomize(controlnet, seed=3)(x, hint, t, context))
    assert plain.abs().mean() > 0.01
    assert torch.equal(controlled, plain)
    assert not torch.allclose(steered, plain, atol=1e-3)


def _residuals(model, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x, hint = torch.randn(1, 4, 4, 4, generator=generator), torch.rand(1, 3, 16, 16, generator=generator)
    with torch.no_grad():
        return model(x, hint, torch.tensor([500.0]), torch.randn(1, 16, 64, generator=generator))


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_the_saved_file_loads_strictly_and_gives_the_trained_residuals(data, tmp_path, ema):
    trainer = trainer_for(config_for(data, tmp_path / "run", "run.max_steps=2", f"optim.ema_decay={ema}"))
    for step in range(2):
        trainer.train_step(step)
    expected = trainer.ema.shadow if trainer.ema is not None else dict(trainer.network.named_parameters())
    expected = {k: v.detach().clone() for k, v in expected.items()}
    path = trainer.finish()
    assert path == tmp_path / "run" / "controlnet.safetensors"
    assert all(key.startswith(CONTROL_PREFIX) for key in read_state_dict(path))
    loaded = load_controlnet(path)
    assert loaded.layout == "original" and loaded.config == trainer.network.control_config
    assert all(torch.equal(p, expected[k]) for k, p in loaded.model.named_parameters())
    trainer.network.eval()
    ours, theirs = _residuals(trainer.network), _residuals(loaded.model)
    assert max(r.abs().max() for r in ours) > 0
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_the_trained_controlnet_steers_the_base_model_in_txt2img(data, tmp_path):
    from PIL import Image

    from latent_diffusion.pipelines.common import Pipeline
    from latent_diffusion.pipelines.control import ControlUnit, load_controlnet_for

    path = train_controlnet(config_for(data, tmp_path / "run", "run.max_steps=4", "optim.ema_decay=0", "optim.lr=1e-2"))
    pipe = Pipeline.from_checkpoint(str(data / "base.safetensors"), progress=False)
    unit = ControlUnit(load_controlnet_for(pipe, path), Image.new("RGB", (16, 16), "white"), weight=2.0)
    options = dict(width=16, height=16, steps=2, seed=0, guidance_scale=1.0)
    plain = pipe.txt2img("a red square", **options).images[0]
    controlled = pipe.txt2img("a red square", control=[unit], **options).images[0]
    assert plain.size == controlled.size == (16, 16)
    assert plain.tobytes() != controlled.tobytes()


def test_a_killed_run_resumes_to_the_uninterrupted_result_bitwise(data, tmp_path, monkeypatch):
    straight = train_controlnet(config_for(data, tmp_path / "straight", "run.max_steps=6", "optim.ema_decay=0.9"))
    interrupted = config_for(data, tmp_path / "interrupted", "run.max_steps=6", "optim.ema_decay=0.9")
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 4)
        with pytest.raises(Interrupted):
            train_controlnet(interrupted)
    assert steps_saved(tmp_path / "interrupted") == [2, 4]
    assert not (tmp_path / "interrupted" / "controlnet.safetensors").exists()
    resumed = train_controlnet(interrupted)
    assert steps_saved(tmp_path / "interrupted") == [2, 4, 6]
    first, second = read_state_dict(straight), read_state_dict(resumed)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # Not a run that did nothing: the zero convolutions have learned.
    assert first[CONTROL_PREFIX + "zero_convs.0.0.weight"].abs().max() > 0


@pytest.mark.parametrize("override, message", [
    ("controlnet.base_model=", "controlnet.base_model: set the model"),
    ("controlnet.base_model=/no/such/model.safetensors", "/no/such/model.safetensors is not a file"),
    ("controlnet.threshold_a=300", r"controlnet.threshold_a=300 lies outside .* \[1, 255\]"),
    ("controlnet.preprocessor=blur", "controlnet.preprocessor: 'blur' is not one of"),
    ("ldm.latent_cache=cache.safetensors", "ldm.latent_cache: a ControlNet run makes its control maps"),
    ("run.sample_every=5", "run.sample_every: a ControlNet run makes no sample grids"),
    ("ldm.init_checkpoint=x.safetensors", "ldm.init_checkpoint: a ControlNet run takes the model"),
    ("ldm.conditioner.drop_prob=1.0", r"drop_prob must lie in \[0, 1\)"),
])
def test_bad_config_values_are_clear_errors(data, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train_controlnet(config_for(data, tmp_path / "run", override))
    assert not (tmp_path / "run").exists()


def test_hint_widths_that_do_not_fit_the_autoencoder_are_a_clear_error(data, tmp_path):
    with pytest.raises(ConfigError, match=r"hint_widths=\[16, 32, 96, 256\].*downsamples 4x.*3 widths"):
        train_controlnet(config_for(data, tmp_path / "run", "controlnet.hint_widths=[16, 32, 96, 256]"))


def test_resuming_with_another_hint_encoder_names_the_setting(data, tmp_path):
    train_controlnet(config_for(data, tmp_path / "run", "run.max_steps=2"))
    with pytest.raises(ConfigError, match=r"controlnet.hint_widths: None in the checkpoint, \[8, 16, 32\] now"):
        train_controlnet(config_for(data, tmp_path / "run", "run.max_steps=4", "controlnet.hint_widths=[8, 16, 32]"))


def test_a_stage2_checkpoint_from_before_the_controlnet_section_resumes_without_a_warning_about_it(data, tmp_path):
    from latent_diffusion.training.config import to_plain
    from latent_diffusion.training.resume import changed_settings

    config = load_experiment(TINY / "ldm-txt2img.yaml", [f"ldm.first_stage={data / 'ae.safetensors'}"])
    saved = {k: v for k, v in to_plain(config).items() if k != "controlnet"}
    assert changed_settings(saved, config) == {}
    controlnet_run = config_for(data, tmp_path / "run")
    saved = to_plain(controlnet_run)
    assert changed_settings(saved, config_for(data, tmp_path / "run", "controlnet.threshold_b=150")) == {
        "controlnet.threshold_b": (None, 150.0)}


def test_gradient_checkpointing_trains_the_same_controlnet(data, tmp_path):
    results = []
    for checkpointing in (False, True):
        trainer = trainer_for(config_for(data, tmp_path / f"run-{checkpointing}", "run.max_steps=2", "optim.ema_decay=0",
                                         f"optim.gradient_checkpointing={str(checkpointing).lower()}"))
        for step in range(2):
            trainer.train_step(step)
        results.append(trainer.network.state_dict())
    plain, checkpointed = results
    assert not torch.equal(plain["zero_convs.0.0.weight"], torch.zeros_like(plain["zero_convs.0.0.weight"]))
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_ldm_train_writes_a_controlnet_that_ldm_txt2img_uses(data, tmp_path, capsys):
    from PIL import Image

    from latent_diffusion import cli

    out = tmp_path / "run"
    overrides = [a for a in config_overrides(data, out) if not a.startswith("stage=")]
    code = cli.main(["train", str(REPO / "configs" / "shapes" / "controlnet-canny.yaml"), *overrides,
                     "run.max_steps=2", "data.num_workers=0"])
    assert code == 0 and capsys.readouterr().out.strip().endswith(str(out / "controlnet.safetensors"))
    Image.new("RGB", (16, 16), "black").save(tmp_path / "map.png")
    code = cli.main(["txt2img", "a red square", "--checkpoint", str(data / "base.safetensors"), "-W", "16", "-H", "16",
                     "--steps", "2", "--control", f"{out / 'controlnet.safetensors'}:{tmp_path / 'map.png'}",
                     "--outdir", str(tmp_path / "images"), "--quiet"])
    assert code == 0 and len(list((tmp_path / "images").glob("*.png"))) == 1
