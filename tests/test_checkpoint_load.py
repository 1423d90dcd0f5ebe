"""Strict single-file loading: every tensor loaded or recognised, EMA, schedules, dtypes, YAML configs."""
import dataclasses

import pytest
import torch

from checkpoint_tiny import (
    TINY_LDM_INPAINT, TINY_SD1, TINY_SD2, TINY_X4, compvis_file_state_dict, schedule_buffers,
)
from latent_diffusion.checkpoints.io import CheckpointError, save_safetensors
from latent_diffusion.checkpoints.load import load_checkpoint
from latent_diffusion.config import ConfigError, ScheduleConfig


@pytest.fixture(scope="module")
def sd1_file_state():
    torch.manual_seed(0)
    return compvis_file_state_dict(TINY_SD1)


def _write(tmp_path, state, name="model.safetensors"):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_safetensors(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 7}, path)
    return path


def _assert_weights_equal(model, state, use_ema=False):
    for key, value in model.state_dict().items():
        expected = state[key]
        if use_ema and key.startswith("model.diffusion_model."):
            expected = state["model_ema." + key[len("model."):].replace(".", "")]
        assert torch.equal(value, expected.to(value.dtype)), key


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
def test_compvis_file_loads_strictly_with_extras_recognised(tmp_path, sd1_file_state, name):
    loaded = load_checkpoint(_write(tmp_path, sd1_file_state, name))
    assert loaded.spec.family == "sd1" and loaded.spec.unet == TINY_SD1.unet
    _assert_weights_equal(loaded.model, sd1_file_state)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert set(loaded.set_aside) == {
        "diffusion schedule buffers", "EMA weights", "text encoder position ids (always 0..N-1, recomputed)",
    }
    assert loaded.ema.present and not loaded.ema.used
    assert loaded.ema.decay == pytest.approx(0.9999) and loaded.ema.num_updates == 1234
    assert loaded.training_schedule.config == ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012)
    assert torch.allclose(loaded.training_schedule.alphas_cumprod,
                          sd1_file_state["alphas_cumprod"].double(), rtol=1e-6)
    assert not loaded.model.training


def test_safetensors_weights_are_assigned_without_a_copy(tmp_path, sd1_file_state):
    loaded = load_checkpoint(_write(tmp_path, sd1_file_state))
    # Every weight views the one memory-mapped file storage: no random init, no second copy.
    storages = {p.untyped_storage().data_ptr() for p in loaded.model.parameters()}
    assert len(storages) == 1


def test_use_ema_loads_the_averaged_unet(tmp_path, sd1_file_state):
    loaded = load_checkpoint(_write(tmp_path, sd1_file_state), use_ema=True)
    assert loaded.ema.used
    _assert_weights_equal(loaded.model, sd1_file_state, use_ema=True)


def test_use_ema_without_ema_weights_is_an_error(tmp_path):
    state = compvis_file_state_dict(TINY_SD1, ema=False)
    loaded = load_checkpoint(_write(tmp_path, state))
    assert not loaded.ema.present
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_checkpoint(tmp_path / "model.safetensors", use_ema=True)


def test_files_without_extras_load_too(tmp_path):
    state = compvis_file_state_dict(TINY_SD1, ema=False, position_ids=False)
    for key in schedule_buffers(TINY_SD1.schedule):
        del state[key]
    loaded = load_checkpoint(_write(tmp_path, state))
    assert loaded.training_schedule is None and loaded.set_aside == {}
    assert loaded.spec.schedule == TINY_SD1.schedule


def test_unexpected_and_missing_keys_are_named(tmp_path, sd1_file_state):
    extra = dict(sd1_file_state)
    extra["model.diffusion_model.surprise.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"'sd1'.*unexpected: model\.diffusion_model\.surprise\.weight"):
        load_checkpoint(_write(tmp_path, extra))
    missing = {k: v for k, v in sd1_file_state.items() if k != "first_stage_model.decoder.conv_out.bias"}
    with pytest.raises(CheckpointError, match=r"missing: first_stage_model\.decoder\.conv_out\.bias"):
        load_checkpoint(_write(tmp_path, missing))


def test_many_unexpected_keys_are_listed_with_a_count(tmp_path, sd1_file_state):
    extra = dict(sd1_file_state)
    extra.update({f"extra.layer{i}.weight": torch.zeros(1) for i in range(25)})
    with pytest.raises(CheckpointError, match=r"\(25 in all\)"):
        load_checkpoint(_write(tmp_path, extra))


def test_dtype_policy(tmp_path, sd1_file_state):
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd1_file_state.items()}
    path = _write(tmp_path, half)
    assert next(load_checkpoint(path).model.parameters()).dtype == torch.float32
    kept = load_checkpoint(path, dtype=torch.float16)
    assert {p.dtype for p in kept.model.parameters()} == {torch.float16}
    assert kept.file_dtypes["float16"] > 0
    assert {p.dtype for p in load_checkpoint(path, dtype="keep").model.parameters()} == {torch.float16}
    with pytest.raises(CheckpointError, match="dtype"):
        load_checkpoint(path, dtype=torch.int8)


def test_ldm_schedule_is_read_from_the_buffers(tmp_path):
    state = compvis_file_state_dict(TINY_SD1, ema=False)
    ldm_schedule = ScheduleConfig("scaled_linear", 1000, 0.0015, 0.0195)
    state.update(schedule_buffers(ldm_schedule))
    assert load_checkpoint(_write(tmp_path, state)).spec.schedule == ldm_schedule


def test_sd2_prediction_override(tmp_path):
    path = _write(tmp_path, compvis_file_state_dict(TINY_SD2, ema=False))
    assert load_checkpoint(path).spec.prediction == "eps"
    v_model = load_checkpoint(path, prediction="v")
    assert v_model.spec.prediction == "v" and v_model.spec.family == "sd2-v"


def test_x4_upscaler_low_scale_buffers_are_recognised(tmp_path):
    state = compvis_file_state_dict(TINY_X4, ema=False)
    state.update({f"low_scale_model.{k}": v for k, v in schedule_buffers(TINY_X4.noise_augmentation).items()})
    loaded = load_checkpoint(_write(tmp_path, state))
    assert loaded.spec.family == "sd2-x4-upscaler"
    assert loaded.spec.unet.disable_self_attentions == TINY_X4.unet.disable_self_attentions
    assert loaded.spec.noise_augmentation == TINY_X4.noise_augmentation
    assert "noise-augmentation schedule of the low-resolution image" in loaded.set_aside


def test_ldm_inpaint_second_copy_of_the_first_stage_is_set_aside(tmp_path):
    state = compvis_file_state_dict(TINY_LDM_INPAINT, ema=False)
    # CompVis "__is_first_stage__": the autoencoder is also saved as cond_stage_model.
    state.update({"cond_stage_model." + k[len("first_stage_model."):]: v
                  for k, v in list(state.items()) if k.startswith("first_stage_model.")})
    loaded = load_checkpoint(_write(tmp_path, state))
    assert loaded.spec.family == "ldm-inpaint" and loaded.model.cond_stage_model is None
    assert "second copy of the first stage (conditioning by the autoencoder)" in loaded.set_aside


TINY_SD1_YAML = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [1, 2]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 64
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def test_config_yaml_describes_the_model(tmp_path, sd1_file_state):
    path = _write(tmp_path, sd1_file_state)
    yaml_path = tmp_path / "tiny.yaml"
    # Text encoder sizes are not in CompVis YAMLs (they name a pretrained model), so this one is full size.
    yaml_path.write_text(TINY_SD1_YAML)
    with pytest.raises(CheckpointError, match="shapes do not fit|missing"):
        load_checkpoint(path, config_yaml=yaml_path)
    full_text = compvis_file_state_dict(
        dataclasses.replace(TINY_SD1, conditioner=dataclasses.replace(TINY_SD1.conditioner, vocab_size=49408,
                                                                      width=768, layers=12, heads=12)), ema=False)
    loaded = load_checkpoint(_write(tmp_path, full_text, "full_text.safetensors"), config_yaml=yaml_path)
    assert loaded.spec.unet.legacy is False and loaded.spec.family == "sd1"
    assert loaded.spec.unet.model_channels == 32 and loaded.spec.scale_factor == 0.18215


def test_config_yaml_unknown_keys_are_errors(tmp_path, sd1_file_state):
    path = _write(tmp_path, sd1_file_state)
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text(TINY_SD1_YAML.replace("        use_checkpoint: True", "        predict_everything: True"))
    with pytest.raises(ConfigError, match="predict_everything"):
        load_checkpoint(path, config_yaml=yaml_path)
    yaml_path.write_text(TINY_SD1_YAML.replace("        legacy: False", "        use_new_attention_order: True"))
    with pytest.raises(ConfigError, match="use_new_attention_order"):
        load_checkpoint(path, config_yaml=yaml_path)


_MEASURE_LOAD = """
import sys, torch
from latent_diffusion.checkpoints.load import load_checkpoint
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
before = status_kib("VmRSS")
loaded = load_checkpoint(sys.argv[1], dtype=torch.float16)
with torch.no_grad():
    total = sum(float(p.float().sum()) for p in loaded.model.parameters())  # touch every weight
peak = status_kib("VmHWM")  # not ru_maxrss: Linux carries the parent's peak across fork+exec
print(peak - before, loaded.spec.family)
"""


@pytest.mark.slow
def test_full_size_sd15_loads_strictly_without_doubling_memory(tmp_path):
    import subprocess
    import sys

    from latent_diffusion.config import SD1
    from latent_diffusion.models.ldm import LatentDiffusion

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LatentDiffusion(SD1).state_dict().items()}
    state = {k: torch.randn(s, dtype=torch.float16) for k, s in shapes.items()}
    state.update(schedule_buffers(SD1.schedule))
    path = tmp_path / "sd15_fp16.safetensors"
    save_safetensors(state, path)
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    del state
    result = subprocess.run([sys.executable, "-c", _MEASURE_LOAD, str(path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    growth_kib, family = result.stdout.split()
    assert family == "sd1"
    assert int(growth_kib) * 1024 < 1.5 * tensor_bytes, (int(growth_kib) * 1024, tensor_bytes)
