"""Speed and memory of our Stable Diffusion code against diffusers (and OpenVINO) on the same weights.

    python bench/run.py                       # everything, full-size SD 1.5 random weights (long)
    python bench/run.py --only unet32 --repeats 3
    python bench/run.py --only unet32 unet64 --engines ours ours-bf16 diffusers diffusers-bf16 openvino-f32 openvino
    python bench/run.py --quick               # tiny models: the harness end to end in seconds
    python bench/run.py --device cuda --dtype float16

Random SD 1.5 weights are written once to ``bench/.cache`` as an original-layout ``.safetensors``;
our loader and diffusers' ``from_single_file`` both read that file. Every measurement runs in a fresh
process, the two sides alternating, and each benchmark's outputs are compared, so that a speed-up
cannot hide a wrong answer. The table goes to stdout and to ``bench/results/``. Its "first call"
column is, for UNet rows, the first call (packing, compiling or converting included) and, for
txt2img rows, loading plus the first image: what a user waits for after starting.

Engines: ``ours`` (with ``--ours-option``; on a CPU in fp32 its weights are packed, nn/packed.py),
``ours-plain`` (eager layers on plain weights, as before packing), ``ours-bf16``, ``ours-compiled`` (the UNet through
``torch.compile`` with frozen weights; the first call compiles), ``diffusers`` (the reference every ratio
and difference is taken against), ``diffusers-bf16`` (weights and inputs in bf16), ``openvino-f32``
and ``openvino`` (diffusers' modules converted by ``openvino.convert_model``, f32 precision hint or
OpenVINO's default; UNet and VAE benchmarks only; ``pip install openvino``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.cases import CASES, Case  # noqa: E402
from bench.models import spec_for, write_diffusers_configs, write_weights  # noqa: E402
from bench.results_file import write_table  # noqa: E402

GIB = 2**30
# Agreement rules of the core issue: relative 1e-4 for tensors, 2/255 per pixel for finished images.
RELATIVE_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 2 / 255
LEAN_PSNR = 30.0
TILED_PSNR = 35.0


@dataclass(frozen=True)
class Engine:
    """One way of running a benchmark: a worker side, its dtype and options."""

    name: str
    side: str  # bench/worker.py --side
    dtype: str | None = None  # None: the run's --dtype
    options: tuple[str, ...] = ()  # our Pipeline options (ours only)
    ov_precision: str | None = None
    kinds: tuple[str, ...] = ("load", "unet", "vae", "txt2img")  # the benchmark kinds it runs

    def command(self, run_options: Sequence[str]) -> list[str]:
        command = ["--side", self.side]
        for option in (*run_options, *self.options) if self.side == "ours" else ():
            command += ["--ours-option", option]
        if self.ov_precision:
            command += ["--ov-precision", self.ov_precision]
        return command


REFERENCE = "diffusers"
ENGINES = {engine.name: engine for engine in [
    Engine("ours", "ours"),
    Engine("ours-plain", "ours", options=("plain",)),
    Engine("ours-bf16", "ours", options=("bf16",)),
    Engine("ours-compiled", "ours", options=("compile_unet",), kinds=("load", "unet", "txt2img")),
    Engine(REFERENCE, "diffusers"),
    Engine("diffusers-bf16", "diffusers", dtype="bfloat16"),
    Engine("openvino-f32", "openvino", ov_precision="f32", kinds=("unet", "vae")),
    Engine("openvino", "openvino", ov_precision="default", kinds=("unet", "vae")),
]}


def prepare_files(quick: bool, cache: Path, model: str = "sd15") -> tuple[Path, Path]:
    spec = spec_for(quick, model)
    stem = f"quick-{model}" if quick else f"{model}-random"
    weights = cache / f"{stem}.safetensors"
    if not weights.is_file():
        print(f"writing random {spec.family} weights to {weights} (once)", file=sys.stderr)
        write_weights(spec, weights)
    configs = write_diffusers_configs(spec, cache / f"{stem}-diffusers-configs")
    return weights, configs


def run_child(command: list[str], log: Path) -> dict:
    completed = subprocess.run(command, capture_output=True, text=True)
    log.write_text(completed.stderr)
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{tail}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def compare(case: Case, output: Path, reference: Path) -> dict | None:
    """How far one engine's output is from the reference's: relative max difference, pixels, PSNR."""
    if case.check == "none" or not output.is_file() or not reference.is_file():
        return None
    a, b = torch.load(output).float(), torch.load(reference).float()
    if a.shape != b.shape:
        return {"error": f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"}
    peak = (b.max() - b.min()).item()
    difference = (a - b).abs().max().item()
    return {"relative": difference / max(b.abs().max().item(), 1e-30), "pixels": difference * 255,
            "psnr": 10 * math.log10(peak**2 / max((a - b).square().mean().item(), 1e-30))}


def verdict(case: Case, engine: Engine, figures: dict | None, ours_options: Sequence[str]) -> bool | None:
    """Whether our output agrees with the reference (peers get no verdict, only their figures).

    Exact modes: relative 1e-4 for tensors, 2/255 for images. Lean mode rounds the weights to fp16
    and bf16 mode computes in bf16, so they are held to PSNR >= 30 dB; a tiled VAE decode to 35 dB.
    """
    if figures is None or engine.side != "ours":
        return None
    if "error" in figures:
        return False
    options = set(ours_options) | set(engine.options)
    if options & {"lean", "bf16"}:
        return figures["psnr"] >= LEAN_PSNR
    if "tiled_vae" in options and case.kind == "vae":
        return figures["psnr"] >= TILED_PSNR
    if case.check == "pixels":
        return figures["pixels"] <= PIXEL_TOLERANCE * 255
    return figures["relative"] <= RELATIVE_TOLERANCE


def describe(case: Case, figures: dict | None) -> str:
    if figures is None:
        return "-"
    if "error" in figures:
        return figures["error"]
    closeness = f"max {figures['pixels']:.2f}/255" if case.check == "pixels" else f"rel {figures['relative']:.1e}"
    return f"{closeness}, PSNR {figures['psnr']:.1f} dB"


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def measure(case: Case, engines: list[Engine], args, common: list[str],
            scratch: Path) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Each engine ``args.repeats`` times in fresh processes, the order rotating between repeats so
    that drift in the machine's load hits every engine alike.

    Returns the reports by engine and, for an engine whose worker failed, why: it is not run again,
    and the others go on (one peer that cannot run a case should not cost the whole table).
    """
    weights, configs = prepare_files(args.quick, args.cache, case.model)
    runnable = [engine for engine in engines if case.kind in engine.kinds]
    measured: dict[str, list[dict]] = {engine.name: [] for engine in runnable}
    failed: dict[str, str] = {}
    for repeat in range(args.repeats):
        shift = repeat % len(runnable)
        for engine in runnable[shift:] + runnable[:shift]:
            if engine.name in failed:
                continue
            command = [sys.executable, str(HERE / "worker.py"), "--case", case.name, *engine.command(args.ours_option),
                       "--output", str(scratch / f"{case.name}-{engine.name}.pt"), "--weights", str(weights),
                       "--configs", str(configs), "--dtype", engine.dtype or args.dtype, *common]
            try:
                report = run_child(command, scratch / f"{case.name}-{engine.name}-{repeat}.log")
            except RuntimeError as error:
                failed[engine.name] = str(error).strip().splitlines()[-1]
                print(f"{case.name:12s} {engine.name:15s} run {repeat + 1} FAILED:\n{error}", file=sys.stderr)
                continue
            measured[engine.name].append(report)
            print(f"{case.name:12s} {engine.name:15s} run {repeat + 1}: {min(report['seconds']):.3f} s, "
                  f"peak RSS {report['peak_rss'] / GIB:.2f} GiB", file=sys.stderr)
    return {name: reports for name, reports in measured.items() if reports}, failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="benchmarks to run (default: all)")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=["ours", REFERENCE],
                        help=f"what to measure; ratios and differences are against {REFERENCE!r} (fp32)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per engine and benchmark")
    parser.add_argument("--quick", action="store_true", help="tiny models, to smoke-test the harness")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), float16 (CUDA default), bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="threads in each child (torch and OpenVINO)")
    parser.add_argument("--ours-option", action="append", default=[], choices=["lean", "tiled_vae", "compile_unet", "bf16", "plain"],
                        help="run the 'ours' engine with this Pipeline option")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling and FLOP count")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    engines = [ENGINES[name] for name in dict.fromkeys(args.engines)]
    cases = [CASES[name] for name in (args.only or CASES)]
    common = ["--device", args.device, *(["--quick"] if args.quick else []),
              *(["--threads", str(args.threads)] if args.threads else [])]

    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as scratch:
        scratch = Path(scratch)
        for case in cases:
            measured, failed = measure(case, engines, args, common, scratch)
            compared = {}
            for name in measured:
                figures = None if name == REFERENCE else compare(case, scratch / f"{case.name}-{name}.pt",
                                                                 scratch / f"{case.name}-{REFERENCE}.pt")
                compared[name] = (figures, verdict(case, ENGINES[name], figures, args.ours_option))
            rows.append((case, measured, compared, failed))
        ceiling = None
        if not args.no_ceiling:
            command = [sys.executable, str(HERE / "ceiling.py"), "--device", args.device, "--dtype", args.dtype]
            command += ["--quick"] if args.quick else []
            command += ["--threads", str(args.threads)] if args.threads else []
            ceiling = run_child(command, scratch / "ceiling.log")

    table = render(rows, ceiling, args)
    write_table(table, args.results, f"{args.device.replace(':', '')}-{args.dtype}{'-quick' if args.quick else ''}")
    agreed = all(ok is not False for _, _, compared, _ in rows for _, ok in compared.values())
    return 0 if agreed and not any(failed for *_, failed in rows) else 1


def _seconds(reports: list[dict]) -> list[float]:
    return [min(r["seconds"]) for r in reports]


def _memory(reports: list[dict]) -> list[float]:
    return [r.get("peak_gpu", r["peak_rss"]) / GIB for r in reports]


def _ratio(values: list[float], reference: list[float] | None) -> str:
    return f"{statistics.median(values) / statistics.median(reference):.2f}" if reference else "-"


def render(rows, ceiling, args) -> str:
    memory_name = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS"
    lines = [
        f"## {', '.join(dict.fromkeys(args.engines))}: "
        f"{'tiny --quick models' if args.quick else 'full-size random weights'}, {args.device} {args.dtype}",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.repeats} fresh processes per engine, median (min-max); "
        f"options of 'ours': {', '.join(args.ours_option) or 'none'}; load average at the end "
        f"{os.getloadavg()[0]:.1f}. Ratios and differences against {REFERENCE} {args.dtype}.",
        "",
        f"| benchmark | engine | s | time ratio | first call s | {memory_name} GiB | memory ratio | difference | agrees |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, measured, compared, failed in rows:
        label = case.label if not args.quick else f"{case.label} [quick: size {case.quick_size}]"
        reference = measured.get(REFERENCE)
        for name, reports in measured.items():
            figures, ok = compared[name]
            first = [max(r["warmup_seconds"]) for r in reports if r.get("warmup_seconds")]
            lines.append(
                f"| {label} | {name} | {summary(_seconds(reports))} | {_ratio(_seconds(reports), reference and _seconds(reference))} | "
                f"{summary(first) if first else '-'} | {summary(_memory(reports))} | "
                f"{_ratio(_memory(reports), reference and _memory(reference))} | {describe(case, figures)} | "
                f"{'-' if ok is None else 'yes' if ok else 'NO'} |")
        for name, why in failed.items():
            lines.append(f"| {label} | {name} | failed: {why.replace('|', '/')} | - | - | - | - | - | - |")
    if ceiling:
        lines += ["", f"Matmul ceiling ({ceiling['matmul_size']}^2 fp32 mm): {ceiling['gflops_median']:.1f} GFLOP/s "
                  f"(min-max {min(ceiling['gflops']):.1f}-{max(ceiling['gflops']):.1f})."]
        for case, measured, *_ in rows:
            flops = ceiling["unet_flops"].get(str(case.scaled(args.quick).size)) if case.kind == "unet" else None
            if not flops:
                continue
            rates = {name: flops / statistics.median(_seconds(reports)) / 1e9 for name, reports in measured.items()}
            lines.append(f"{case.label}: {flops / 1e9:.1f} GFLOP counted; " + ", ".join(
                f"{name} {rate:.1f} GFLOP/s ({rate / ceiling['gflops_median']:.0%} of the ceiling)"
                for name, rate in rates.items()) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
