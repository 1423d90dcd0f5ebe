"""describe_checkpoint: a summary from shapes and the schedule buffers, without loading weights."""
import json

import torch

from checkpoint_tiny import TINY_SD1, TINY_SD2, compvis_file_state_dict
from latent_diffusion.checkpoints.describe import describe_checkpoint, format_description
from latent_diffusion.checkpoints.io import save_safetensors
from latent_diffusion.checkpoints.load import load_checkpoint


def test_description_matches_what_loading_finds(tmp_path):
    state = compvis_file_state_dict(TINY_SD1)
    state = {k: v.half() if k.startswith("first_stage_model.") else v for k, v in state.items()}
    path = tmp_path / "m.safetensors"
    save_safetensors(state, path)
    d = describe_checkpoint(path)
    json.dumps(d)  # JSON-ready
    loaded = load_checkpoint(path)
    counts = loaded.model.component_parameter_counts()
    assert d["family"] == "sd1" and d["prediction"] == "eps"
    assert d["parameters"] == {"unet": counts["unet"], "vae": counts["vae"], "text_encoder": counts["cond"]}
    assert d["dtypes"]["vae"] == {"float16": len(loaded.model.first_stage_model.state_dict())}
    assert d["ema"]["present"] and d["ema"]["parameters"] == counts["unet"]
    assert d["schedule"]["source"] == "file buffers" and d["schedule"]["linear_end"] == 0.012
    assert d["file_size_bytes"] == path.stat().st_size
    text = format_description(d)
    assert "sd1" in text and "EMA weights: yes" in text


def test_prediction_override_and_no_buffers(tmp_path):
    state = compvis_file_state_dict(TINY_SD2, ema=False)
    for key in ("betas", "alphas_cumprod"):
        del state[key]
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": state}, path)
    d = describe_checkpoint(path, prediction="v")
    assert d["family"] == "sd2-v" and d["prediction"] == "v" and d["prediction_from"] == "argument"
    assert d["schedule"]["source"] == "family preset" and not d["ema"]["present"]
    assert d["format"] == "torch-zip"
