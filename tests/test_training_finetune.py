"""Fine-tuning an SD 1.x single file with configs/sd-finetune.yaml: the result is a single file other tools load."""
from __future__ import annotations

from pathlib import Path

import torch

from checkpoint_tiny import schedule_buffers
from latent_diffusion.checkpoints.io import read_state_dict, save_safetensors
from pipeline_tiny import TINY_SD1, random_state
from test_training import REPO, _run_cli, make_images


def sd1_single_file(path: Path) -> Path:
    """A tiny random SD 1 checkpoint laid out like a released one: weights, EMA, schedule buffers, position ids."""
    state = random_state(TINY_SD1)
    state.update(schedule_buffers(TINY_SD1.schedule))
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    for key, value in list(state.items()):
        if key.startswith("model.diffusion_model."):
            state["model_ema." + key[len("model."):].replace(".", "")] = value.clone()
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_safetensors(state, path)
    return path


def test_sd1_finetune_keeps_layout_trains_unet_only_and_generates(tmp_path):
    from latent_diffusion.checkpoints.load import load_checkpoint
    from latent_diffusion.pipelines import Pipeline

    original = sd1_single_file(tmp_path / "sd1.safetensors")
    make_images(tmp_path / "images", count=4, size=32)
    process = _run_cli([str(REPO / "configs" / "sd-finetune.yaml"), f"ldm.init_checkpoint={original}",
                        f"data.root={tmp_path / 'images'}", f"run.out_dir={tmp_path / 'run'}", "data.size=32",
                        "data.num_workers=0", "run.max_steps=3", "run.batch_size=4", "optim.grad_accum=2",
                        "optim.warmup_steps=0", "optim.lr=1e-3", "run.sample_every=0", "run.progress=false"])
    output = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 0, output[-3000:]
    result = Path(output.strip().splitlines()[-1])

    before, after = read_state_dict(original), read_state_dict(result)
    # (a) the original single-file layout: the same keys (EMA now of the fine-tuned UNet), plus the
    # latent scale factor as a tensor, which CompVis' ``scale_by_std`` models store too.
    assert set(before) <= set(after) and set(after) - set(before) <= {"scale_factor"}
    # (c) the UNet and its EMA moved; the frozen VAE and text encoder are bit-identical.
    unet_keys = [k for k in before if k.startswith("model.diffusion_model.")]
    assert sum(not torch.equal(before[k], after[k]) for k in unet_keys) > len(unet_keys) // 2
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model_ema.diffusion"))
    for key in before:
        if key.startswith(("first_stage_model.", "cond_stage_model.")):
            assert torch.equal(before[key], after[key]), key

    # (b) it loads as an SD 1 file (detected from its keys) and the pipeline generates an image.
    loaded = load_checkpoint(result)
    assert loaded.spec.family == "sd1"
    pipe = Pipeline.from_checkpoint(result, progress=False)
    image = pipe.txt2img("a red square", width=32, height=32, steps=2, seed=1).images[0]
    assert image.size == (32, 32)
