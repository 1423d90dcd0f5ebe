"""The compression study (ldm study compression): its models, equal-FLOPs budget, resume, report."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.models.unet import UNetModel
from latent_diffusion.studies.compression import StudyError, StudyPlan, check_same_plan, rescore_study, run_study
from latent_diffusion.studies.compression_models import (
    FACTORS, first_stage_config, latent_side, unet_config, unet_flops_per_image,
)
from latent_diffusion.studies.compression_report import write_report
from latent_diffusion.studies.plots import Series, plot

TINY = dict(vq_factors=(), first_stage_steps=2, ldm_steps=4, latent_pool=16, evaluations=2, eval_prompts=8,
            reconstruction_images=8, sample_steps=2)


def test_every_factor_has_a_first_stage_of_that_factor_and_unets_of_comparable_size():
    sizes = []
    for f in FACTORS:
        if f > 1:
            assert first_stage_config(f).downsampling_factor == f
        config = unet_config(f)
        unet = UNetModel(config)
        sizes.append(sum(p.numel() for p in unet.parameters()))
        lowest = latent_side(f) // 2 ** (len(config.channel_mult) - 1)
        assert lowest >= 2, f"f={f}: the UNet's lowest level is {lowest}x{lowest}"
    assert max(sizes) < 1.1 * min(sizes), sizes


@pytest.mark.parametrize("f", [2, 8, 32])
def test_each_step_costs_the_flops_of_the_pixel_step(f):
    from latent_diffusion.studies.compression_ldm import batch_for_equal_flops

    batch, per_latent = batch_for_equal_flops(f, pixel_batch=4)
    pixel = unet_flops_per_image(UNetModel(unet_config(1)), 1)
    assert abs(batch * per_latent - 4 * pixel) <= per_latent / 2
    assert batch > 4


def test_a_plan_cannot_change_under_a_study_folder(tmp_path):
    check_same_plan(tmp_path, StudyPlan(factors=(4,)))
    check_same_plan(tmp_path, StudyPlan(factors=(8,)))  # other factors, same plan: one study
    with pytest.raises(StudyError, match="ldm_steps: 450 there, 900 now"):
        check_same_plan(tmp_path, StudyPlan.for_budget(2.0))


def test_budget_scales_training_steps_and_refuses_nonsense():
    assert StudyPlan.for_budget(0.5).ldm_steps == StudyPlan().ldm_steps // 2
    with pytest.raises(ValueError, match="--budget"):
        StudyPlan.for_budget(0)


def test_study_runs_end_to_end_and_writes_table_and_plots(tmp_path):
    run_study(tmp_path, StudyPlan(factors=(1, 32), **TINY), log=lambda message: None)
    path = write_report(tmp_path, tmp_path / "report")
    text = path.read_text()
    assert "| 1 | none (pixels) | 3 x 64 x 64 | 12288 | 0 | lossless | 1.000 |" in text
    assert "| 32 | KL | 64 x 2 x 2 | 256 |" in text
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["f"] for r in results["ldms"]] == [1, 32]
    for ldm in results["ldms"]:
        assert [e["step"] for e in ldm["evaluations"]] == [2, 4] and ldm["complete"]
        last = ldm["evaluations"][-1]
        assert 0.0 <= last["scene_accuracy"] <= 1.0 and 0.0 <= last["attribute_accuracy"] <= 1.0
    for name in ("quality-vs-compute", "scenes-vs-compute", "fd-vs-compute", "quality-vs-throughput",
                 "reconstruction-vs-f"):
        assert Image.open(tmp_path / "report" / f"{name}.png").size == (720, 480)
        assert f"({name}.png)" in text
    # Every figure of an evaluation comes from the saved grid, so scoring the grids again changes nothing.
    before = [json.loads((tmp_path / "runs" / f"ldm-f{f}" / "results.json").read_text()) for f in (1, 32)]
    assert rescore_study(tmp_path) == 4
    assert [json.loads((tmp_path / "runs" / f"ldm-f{f}" / "results.json").read_text()) for f in (1, 32)] == before


def _ldm_run(folder, plan):
    from latent_diffusion.studies.compression_first_stage import build_first_stage
    from latent_diffusion.studies.compression_judge import Judge
    from latent_diffusion.studies.compression_ldm import LDMRun, TextEncoder, encode_pool

    torch.manual_seed(0)
    first_stage = build_first_stage(32, "kl").eval()
    text = TextEncoder.builtin()
    pool = encode_pool(first_stage, text, plan.latent_pool, plan.seed)
    return LDMRun(folder, 32, first_stage, pool, plan, text, Judge(plan.eval_prompts, plan.seed), log=lambda message: None)


def test_a_stopped_ldm_run_resumes_to_the_bitwise_result_of_an_unbroken_one(tmp_path, monkeypatch):
    from latent_diffusion.studies.compression_ldm import LDMRun

    plan = StudyPlan(factors=(32,), **TINY)
    unbroken = _ldm_run(tmp_path / "unbroken", plan)
    unbroken.train()

    original_step = LDMRun._step

    def stop_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt("killed")
        original_step(self, step)

    monkeypatch.setattr(LDMRun, "_step", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _ldm_run(tmp_path / "stopped", plan).train()
    state = torch.load(tmp_path / "stopped" / "state.pt", weights_only=True)
    assert state["step"] == 2  # stopped between the two evaluations, after the first was saved
    monkeypatch.setattr(LDMRun, "_step", original_step)
    resumed = _ldm_run(tmp_path / "stopped", plan)
    resumed.train()

    for name, value in unbroken.unet.state_dict().items():
        assert torch.equal(value, resumed.unet.state_dict()[name]), name
    figures = ("step", "train_flops", "scene_accuracy", "attribute_accuracy", "attributes", "frechet_distance")
    assert [{k: e[k] for k in figures} for e in resumed.results["evaluations"]] == \
        [{k: e[k] for k in figures} for e in unbroken.results["evaluations"]]


def test_report_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["study", "compression", "--out", str(tmp_path), "--report-only"]) == 2
    assert "no study results under" in capsys.readouterr().err


def test_plot_leaves_out_points_that_are_not_finite(tmp_path):
    path = plot(tmp_path / "p.png", [Series("a", (1e9, 1e10, 1e11), (0.1, float("nan"), 0.5)),
                                      Series("b", (2e9,), (float("inf"),), lines=False)],
                title="t", x_label="x", y_label="y", log_x=True)
    assert Image.open(path).size == (720, 480)
    with pytest.raises(ValueError, match="no finite point"):
        plot(tmp_path / "q.png", [Series("b", (1.0,), (float("nan"),))], title="t", x_label="x", y_label="y")


def test_rescoring_a_folder_without_a_study_is_a_clear_error(tmp_path, capsys):
    assert main(["study", "compression", "--out", str(tmp_path), "--rescore"]) == 2
    assert "holds no study (no plan.json)" in capsys.readouterr().err
