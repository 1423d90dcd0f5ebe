"""One measurement in a fresh process: load one side, run one benchmark, report time, memory, output.

Run by ``bench/run.py``; prints one JSON line and saves the output tensor for the agreement check.
Peak memory is ``VmHWM`` of this process (``ru_maxrss`` would inherit the parent's peak across
fork+exec on Linux).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cases import CASES, Case  # noqa: E402
from bench.inputs import PROMPT, SEED, adm_inputs, unet_inputs, vae_latents  # noqa: E402
from bench.models import load_diffusers, load_diffusers_unet, load_ours, spec_for  # noqa: E402



def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Timer:
    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, work):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = work()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, result




def dpmpp_2m_settings():
    """DPM++ 2M on trailing timesteps, the spacing where it matches diffusers' DPMSolverMultistepScheduler."""
    from latent_diffusion.diffusion.registry import get_sampler
    from latent_diffusion.pipelines.common import SamplingSettings

    return SamplingSettings(dataclasses.replace(get_sampler("dpmpp_2m"), spacing="trailing"), 20, 7.5)


def run_ours(case: Case, args, spec, timer: Timer):
    dtype = getattr(torch, args.dtype)
    options = {k: True for k in args.ours_option}
    load_seconds, pipe = timer(lambda: load_ours(args.weights, args.device, dtype, **options))
    if case.kind == "load":
        return [load_seconds], None, []
    times, warmup = [], []
    with torch.no_grad():
        if case.kind == "unet":
            x, t, context = unet_inputs(case, spec, args.device, pipe.dtype)
            y = adm_inputs(spec, args.device, pipe.dtype)[0] if case.model == "sdxl" else None
            unet = pipe.unet_forward  # the compiled UNet under compile_unet
            for _ in range(case.warmup):
                seconds, _ = timer(lambda: unet(x, t, context, y))
                warmup.append(seconds)
            for _ in range(case.runs):
                seconds, out = timer(lambda: unet(x, t, context, y))
                times.append(seconds)
        elif case.kind == "vae":
            latents = vae_latents(case, spec).to(args.device, pipe.dtype)
            seconds, out = timer(lambda: pipe.decode(latents))
            times.append(seconds)
        else:
            from latent_diffusion.diffusion.sampling import BatchNoise, make_generators

            settings = dpmpp_2m_settings()

            def generate():
                # What Pipeline.txt2img does for one image, with the sampler spacing set explicitly.
                cond, uncond = pipe.text_conditioning(PROMPT, "", 1, None, width=case.size, height=case.size)
                latents = pipe.sample_latents(settings, BatchNoise(make_generators(SEED, 1)), cond, uncond,
                                              shape=pipe.latent_shape(1, case.size, case.size))
                return (pipe.decode(latents) + 1) / 2

            seconds, out = timer(generate)
            times.append(seconds)
            warmup.append(load_seconds + seconds)  # the first image after start
            out = out.clamp(0, 1).permute(0, 2, 3, 1)
    return times, out, warmup




def run_diffusers(case: Case, args, spec, timer: Timer):
    dtype = getattr(torch, args.dtype)
    if case.model == "sdxl":
        return run_diffusers_sdxl_unet(case, args, spec, timer, dtype)
    load_seconds, pipe = timer(lambda: load_diffusers(args.weights, args.configs, args.device, dtype))
    if case.kind == "load":
        return [load_seconds], None, []
    times, first = [], []
    with torch.no_grad():
        if case.kind == "unet":
            x, t, context = unet_inputs(case, spec, args.device, dtype)
            unet = pipe.unet
            for _ in range(case.warmup):
                unet(x, t, encoder_hidden_states=context)
            for _ in range(case.runs):
                seconds, out = timer(lambda: unet(x, t, encoder_hidden_states=context).sample)
                times.append(seconds)
        elif case.kind == "vae":
            latents = vae_latents(case, spec).to(args.device, dtype)
            seconds, out = timer(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)
            times.append(seconds)
        else:
            from diffusers import DPMSolverMultistepScheduler

            from latent_diffusion.diffusion.sampling import BatchNoise, make_generators

            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                                     steps_offset=0)
            side = case.size // spec.downsampling_factor
            latents = BatchNoise(make_generators(SEED, 1)).randn((1, spec.latent_channels, side, side))

            def generate():
                return pipe(PROMPT, negative_prompt="", height=case.size, width=case.size, num_inference_steps=20,
                            guidance_scale=7.5, latents=latents.to(args.device, dtype), output_type="pt").images

            seconds, out = timer(generate)
            times.append(seconds)
            first.append(load_seconds + seconds)  # the first image after start
            out = out.float().cpu().permute(0, 2, 3, 1)
    return times, out, first


def run_diffusers_sdxl_unet(case: Case, args, spec, timer: Timer, dtype: torch.dtype):
    unet = load_diffusers_unet(args.weights, args.configs, args.device, dtype)
    x, t, context = unet_inputs(case, spec, args.device, dtype)
    _, pooled, time_ids = adm_inputs(spec, args.device, dtype)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    times = []
    with torch.no_grad():
        for _ in range(case.warmup):
            unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added)
        for _ in range(case.runs):
            seconds, out = timer(lambda: unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample)
            times.append(seconds)
    return times, out, []


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", required=True, choices=sorted(CASES))
    parser.add_argument("--side", required=True, choices=["ours", "diffusers", "openvino"])
    parser.add_argument("--ov-precision", default="f32", choices=["f32", "default"],
                        help="OpenVINO side: f32 precision hint, or OpenVINO's default (bf16 where the CPU has it)")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--configs", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ours-option", action="append", default=[], help="Pipeline flag set for our side (lean, tiled_vae, compile_unet)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    case = CASES[args.case].scaled(args.quick)
    spec = spec_for(args.quick, case.model)
    timer = Timer(args.device)
    if args.side == "openvino":
        from bench.openvino_side import run_openvino as run
    else:
        run = run_ours if args.side == "ours" else run_diffusers
    times, out, warmup = run(case, args, spec, timer)
    report = {"seconds": times, "warmup_seconds": warmup, "peak_rss": peak_rss_bytes(),
              "threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        report["peak_gpu"] = torch.cuda.max_memory_allocated()
    if out is not None:
        torch.save(out.detach().float().cpu(), args.output)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
