"""The OpenVINO peer: diffusers' UNet or VAE decoder converted with ``openvino.convert_model`` and
compiled for the CPU, as the CPU front-ends that use OpenVINO run them.

A benchmark peer only: nothing in the package imports OpenVINO. Precision "f32" sets
``INFERENCE_PRECISION_HINT`` to f32; "default" leaves OpenVINO's own choice (bf16 where the CPU has
AMX or AVX512-BF16). Conversion and compilation are timed as the first call: what a user waits for
before the first image.
"""
from __future__ import annotations

import torch

PRECISIONS = {"f32": {"INFERENCE_PRECISION_HINT": "f32"}, "default": {}}


class _UNet(torch.nn.Module):
    """diffusers' UNet with positional inputs and a plain tensor output, as ``convert_model`` traces it."""

    def __init__(self, unet, added: dict | None) -> None:
        super().__init__()
        self.unet, self.added = unet, added

    def forward(self, x, t, context):
        return self.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=self.added, return_dict=False)[0]


class _Decoder(torch.nn.Module):
    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


def compile_for_cpu(module: torch.nn.Module, example: tuple[torch.Tensor, ...], precision: str, threads: int | None):
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    with torch.no_grad():
        model = ov.convert_model(module, example_input=example)
    config = dict(PRECISIONS[precision], **({"INFERENCE_NUM_THREADS": threads} if threads else {}))
    return ov.Core().compile_model(model, "CPU", config)


def run_openvino(case, args, spec, timer) -> tuple[list[float], torch.Tensor, list[float]]:
    """(seconds per timed call, output, [seconds of conversion + compilation + first call])."""
    from bench.inputs import adm_inputs, unet_inputs, vae_latents
    from bench.models import load_diffusers, load_diffusers_unet

    if case.kind == "unet":
        unet = load_diffusers_unet(args.weights, args.configs, "cpu", torch.float32)
        x, t, context = unet_inputs(case, spec, "cpu", torch.float32)
        added = None
        if case.model == "sdxl":
            _, pooled, time_ids = adm_inputs(spec, "cpu", torch.float32)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        module, example = _UNet(unet.eval(), added), (x, t, context)
    elif case.kind == "vae":
        pipe = load_diffusers(args.weights, args.configs, "cpu", torch.float32)
        module, example = _Decoder(pipe.vae.eval()), (vae_latents(case, spec),)
    else:
        raise SystemExit(f"the OpenVINO peer runs the unet and vae benchmarks, not {case.kind!r}")
    numpy_inputs = [tensor.numpy() for tensor in example]

    def first_call():
        compiled = compile_for_cpu(module, example, args.ov_precision, args.threads)
        compiled(numpy_inputs)
        return compiled

    first_seconds, compiled = timer(first_call)
    times = []
    for _ in range(case.runs):
        seconds, result = timer(lambda: compiled(numpy_inputs)[0])
        times.append(seconds)
    return times, torch.from_numpy(result.copy()), [first_seconds]
