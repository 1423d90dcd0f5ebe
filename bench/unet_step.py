"""One UNet step of a model at the inputs its txt2img calls it with, per engine, in one process.

Engines: ``exact`` (ours, fp32, eager), ``ours-bf16``, ``ours-compiled`` (``--compile``: packages
from the disk cache, compiled first where missing), ``ours-bf16-compiled`` (both), ``openvino``
(our UNet converted, OpenVINO's default precision: bf16 where the CPU has it) and ``openvino-f32``. The engines take turns, round
after round, so a busy moment of the machine falls on all of them; the median of the rounds is
reported with each engine's relative difference to the exact output. Reported, not asserted.

    python bench/unet_step.py                         # the built-in model, 64 px (batch 2, 16x16 latents)
    python bench/unet_step.py --model sd15 --size 256 # full-size SD 1.5, random weights (32x32 latents)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.fast_quality import checkpoint_path, openvino_unet  # noqa: E402
from bench.results_file import write_table  # noqa: E402

ENGINES = ("exact", "ours-bf16", "ours-compiled", "ours-bf16-compiled", "openvino", "openvino-f32")


def captured_inputs(pipe, size: int, prompt: str, guidance: float) -> tuple:
    """The (x, t, context) of ``pipe``'s first UNet call in a txt2img of ``size`` pixels."""
    captured, network = {}, pipe.unet_forward

    def capture(x, t, context=None, y=None):
        captured.setdefault("inputs", (x, t, context))
        return network(x, t, context, y)

    pipe.unet_forward = capture
    pipe.txt2img(prompt, steps=1, width=size, height=size, seed=0, sampler="euler", guidance_scale=guidance)
    pipe.unet_forward = network
    return captured["inputs"]


def engine(name: str, path: Path | None, size: int, prompt: str, notes: list[str]):
    """A callable (x, t, context) -> output for one engine and the inputs it was first called with,
    or None where it cannot run here."""
    from latent_diffusion.pipelines.common import Pipeline

    started = time.perf_counter()
    if name.startswith("openvino"):
        try:
            import openvino  # noqa: F401
        except ImportError:
            notes.append(f"{name}: openvino is not installed")
            return None
        pipe = Pipeline.from_checkpoint(path, progress=False, packed=False)
        call, _ = openvino_unet(pipe, "f32" if name == "openvino-f32" else "default", size, prompt)
    else:
        pipe = Pipeline.from_checkpoint(path, progress=False, bf16="bf16" in name, compile_unet="compiled" in name)
        notes += [f"{name}: {warning}" for warning in pipe.mode_warnings]
        call = pipe.unet_forward
    inputs = captured_inputs(pipe, size, prompt, 2.0)
    with torch.no_grad():
        call(*inputs)  # first call: a compile or the package's load, where there is one
    notes.append(f"{name}: loaded and first call in {time.perf_counter() - started:.1f} s")
    return call, inputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["builtin", "sd15"], default="builtin")
    parser.add_argument("--checkpoint", type=Path, default=None, help="any model file instead")
    parser.add_argument("--size", type=int, default=64, help="image side the inputs are for")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="calls timed per engine and round")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    path, notes, prompt = checkpoint_path(args), [], "a red circle left of a blue square"
    made = {name: made for name in dict.fromkeys(["exact", *args.engines])
            if (made := engine(name, path, args.size, prompt, notes)) is not None}
    engines, inputs = {name: call for name, (call, _) in made.items()}, made["exact"][1]  # every engine, exact's inputs
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    with torch.no_grad():
        outputs = {name: call(*inputs).float() for name, call in engines.items()}
        for _ in range(args.rounds):
            for name, call in engines.items():
                started = time.perf_counter()
                for _ in range(args.calls):
                    call(*inputs)
                seconds[name].append((time.perf_counter() - started) / args.calls)
    exact = outputs["exact"]
    model = f"`{args.checkpoint.name}`" if args.checkpoint else (
        "the built-in model" if args.model == "builtin" else "full-size SD 1.5, random weights")
    lines = [f"## UNet step: {model}, inputs of a {args.size}x{args.size} txt2img "
             f"(x {tuple(inputs[0].shape)}, context {tuple(inputs[2].shape)})", "",
             f"Median of {args.rounds} rounds of {args.calls} calls, engines alternating; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, load average at the end {os.getloadavg()[0]:.1f}.", "",
             "| engine | ms per step | vs openvino | rel. difference to exact |", "|---|---|---|---|"]
    reference = statistics.median(seconds["openvino"]) if "openvino" in seconds else None
    for name, values in seconds.items():
        step = statistics.median(values)
        ratio = f"{step / reference:.2f}" if reference else "-"
        difference = float((outputs[name] - exact).norm() / exact.norm())
        lines.append(f"| {name} | {1000 * step:.2f} | {ratio} | {difference:.1e} |")
    lines += [""] + [f"- {note}" for note in notes]
    write_table("\n".join(lines), args.results, f"unet-step-{'checkpoint' if args.checkpoint else args.model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
