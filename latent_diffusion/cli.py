"""The ``ldm`` command.

Each sub-command is one small function; heavy imports happen inside them so that ``ldm --help``,
``ldm samplers`` and ``ldm png-info`` answer without loading PyTorch. User errors (bad file, bad
option, a size that cannot fit, a full disk) end as one clear line and exit code 2; output into a
reader that has gone (``| head``) is dropped quietly while the command finishes its work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence


class UsageError(Exception):
    """An error in what the user asked for; printed as one line, no traceback."""


def _cmd_info(args: argparse.Namespace) -> None:
    from latent_diffusion.checkpoints.load import describe_checkpoint, format_description

    from latent_diffusion.pipelines.common import default_checkpoint_path

    path = args.checkpoint if args.checkpoint is not None else default_checkpoint_path()
    if _is_controlnet(path):
        from latent_diffusion.checkpoints.controlnet import describe_controlnet, format_controlnet_description

        description = describe_controlnet(path)
        print(json.dumps(description, indent=2, default=str) if args.json else format_controlnet_description(description))
        return
    description = describe_checkpoint(path, prediction=args.prediction)
    print(json.dumps(description, indent=2, default=str) if args.json else format_description(description))


def _is_controlnet(path) -> bool:
    from latent_diffusion.checkpoints.controlnet import is_controlnet
    from latent_diffusion.checkpoints.io import CheckpointError

    try:
        return is_controlnet(path)
    except CheckpointError:
        return False  # not a weight file at all: describe_checkpoint says what it is


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _own_schedule(spec) -> str:
    """A sampler's own schedule in scheduler terms (the spacings are named in diffusion/schedules.py)."""
    name = {"linspace": "uniform", "uniform": "ddim"}.get(spec.spacing, spec.spacing)
    return name + (", ending at sigma_min" if spec.final == "sigma_min" else "")


def _cmd_samplers(args: argparse.Namespace) -> None:
    from latent_diffusion.diffusion.registry import SAMPLERS
    from latent_diffusion.diffusion.schedulers import SCHEDULERS

    samplers = [("SAMPLER", "A1111 NAME", "STEPS", "KIND", "AUTOMATIC SCHEDULE")]
    for spec in SAMPLERS.values():
        kind = "stochastic" if spec.stochastic else "deterministic"
        samplers.append((spec.name, spec.label, str(spec.default_steps), kind, _own_schedule(spec)))
    schedulers = [("SCHEDULER", "A1111 NAME", "ALIASES")]
    for scheduler in SCHEDULERS.values():
        schedulers.append((scheduler.name, scheduler.label, ", ".join(scheduler.aliases)))
    note = ("--scheduler picks the sigma schedule apart from the sampler (automatic: the sampler's own); "
            "combined names such as 'DPM++ 2M Karras' or dpmpp_2m_karras pick both.")
    print("\n".join([*_table(samplers), "", *_table(schedulers), "", note]))


def _listed(describe: Callable[[str], dict], name: str) -> dict:
    """A folder entry described, or the reason it cannot be (one bad file does not hide the others)."""
    try:
        return describe(name)
    except ValueError as error:
        return {"name": name, "error": str(error)}


def _cmd_loras(args: argparse.Namespace) -> None:
    from latent_diffusion.addons.library import LoraLibrary

    library = LoraLibrary(args.lora_dir)
    entries = [_listed(library.describe, name) for name in library.names()]
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
        return
    rows = [("NAME", "FAMILY", "FILE")] + [(e["name"], e.get("family") or "unknown", e.get("path", e.get("error")))
                                           for e in entries]
    print("\n".join(_table(rows)) if entries else f"no LoRA files in {library.folder}")


def _cmd_embeddings(args: argparse.Namespace) -> None:
    from latent_diffusion.addons.embeddings import EmbeddingLibrary, made_for

    library = EmbeddingLibrary(args.embeddings_dir)
    def describe(name: str) -> dict:
        embedding = library.read(name)
        return {"name": name, "family": made_for(embedding), "vectors": len(next(iter(embedding.vectors.values()))),
                "widths": {key or "": v.shape[1] for key, v in embedding.vectors.items()},
                "path": embedding.path.relative_to(library.folder).as_posix(), **embedding.info}

    entries = [_listed(describe, name) for name in library.names()]
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
        return
    rows = [("NAME", "FAMILY", "VECTORS", "WIDTH", "FILE")] + [
        (e["name"], e.get("family") or "unknown", str(e.get("vectors", "-")),
         " + ".join(f"{k}: {w}" if k else str(w) for k, w in e.get("widths", {}).items()) or "-",
         e.get("path", e.get("error"))) for e in entries]
    print("\n".join(_table(rows)) if entries else f"no embeddings in {library.folder}")


def _cmd_png_info(args: argparse.Namespace) -> None:
    from latent_diffusion.pipelines.png_info import parse_parameters, read_png_parameters

    text = read_png_parameters(args.file)
    if text is None:
        raise UsageError(f"{args.file} holds no generation parameters")
    if args.json:
        prompt, negative, settings = parse_parameters(text)
        print(json.dumps({"prompt": prompt, "negative_prompt": negative, **settings}, indent=2, ensure_ascii=False))
    else:
        print(text)


def _cmd_convert(args: argparse.Namespace) -> None:
    from pathlib import Path

    from latent_diffusion.checkpoints.convert import load_diffusers_folder, save_diffusers_folder, save_single_file
    from latent_diffusion.checkpoints.load import load_checkpoint

    source, target = Path(args.source), Path(args.target)
    if not source.exists():
        raise FileNotFoundError(f"no such checkpoint: {source}")
    if target.exists() and not args.overwrite:
        raise UsageError(f"{target} exists; pass --overwrite to replace it")
    dtype = "float16" if args.half else "keep"
    if source.is_dir():
        save_single_file(load_diffusers_folder(source, dtype=dtype), target)
    else:
        save_diffusers_folder(load_checkpoint(source, config_yaml=args.config, dtype=dtype), target)
    print(target)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Latent Diffusion / Stable Diffusion in plain PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        sub.set_defaults(func=func, command_parser=sub)
        return sub

    info = add("info", _cmd_info, "Say what a checkpoint file is: family, parameter counts, dtype, EMA.")
    info.add_argument("checkpoint", nargs="?", default=None,
                      help=".safetensors / .ckpt file or diffusers folder; default: the built-in model")
    info.add_argument(
        "--prediction", choices=["eps", "v", "x0"], default=None,
        help="override the prediction type where keys cannot tell (SD 2 512 eps vs 768 v)",
    )
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")

    add("samplers", _cmd_samplers, "List the samplers with the names A1111/ComfyUI users know.")

    loras = add("loras", _cmd_loras, "List the LoRA / LyCORIS files that prompts can name, with the family each is for.")
    embeddings = add("embeddings", _cmd_embeddings,
                     "List the textual-inversion embeddings that prompts can name, with the family each fits.")
    from latent_diffusion.pipelines.commands import add_addon_options

    for listing in (loras, embeddings):
        add_addon_options(listing)
        listing.add_argument("--json", action="store_true", help="print machine-readable JSON")

    from latent_diffusion.pipelines.commands import add_task_parsers

    add_task_parsers(add)

    png_info = add("png-info", _cmd_png_info, "Print the generation parameters stored in a PNG (A1111 format).")
    png_info.add_argument("file", help="PNG file written by ldm, A1111 or a compatible tool")
    png_info.add_argument("--json", action="store_true", help="print prompt, negative prompt and settings as JSON")

    convert = add("convert", _cmd_convert,
                  "Convert a single-file checkpoint to a diffusers folder, or a diffusers folder to a single file.")
    convert.add_argument("source", help=".safetensors/.ckpt file, or diffusers folder")
    convert.add_argument("target", help="diffusers folder (from a file) or .safetensors file (from a folder)")
    convert.add_argument("--config", default=None, help="CompVis YAML describing the source file")
    convert.add_argument("--half", action="store_true", help="store float16 weights; default: keep the source's")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing target")
    from latent_diffusion.training.cli import add_cache_latents_parser, add_train_parser
    add_train_parser(commands), add_cache_latents_parser(commands)
    from latent_diffusion.server.serve import add_serve_parser
    add_serve_parser(commands)
    from latent_diffusion.studies.cli import add_study_parser
    add_study_parser(commands)
    return parser


class _ReaderMayLeave:
    """sys.stdout / sys.stderr during a command: once the reader has gone (``ldm info | head -3``)
    further output is dropped and the command carries on, so a generation still writes all its images."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._reader_gone = False

    def write(self, text: str) -> int:
        self._guarded(self._stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def _guarded(self, call: Callable, *args) -> None:
        if self._reader_gone:
            return
        try:
            call(*args)
        except BrokenPipeError:
            self._reader_gone = True
            # Point the descriptor at /dev/null, so that the interpreter's own flush at exit succeeds.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _is_out_of_memory(error: BaseException) -> bool:
    # PyTorch reports a failed allocation as a RuntimeError (torch.OutOfMemoryError on GPUs).
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "not enough memory" in str(error)))


def _is_compile_error(error: BaseException) -> bool:
    if not isinstance(error, RuntimeError):
        return False
    from latent_diffusion.nn.compiled import CompileError  # torch is loaded by now: it raised the error

    return isinstance(error, CompileError)


def _error_line(error: BaseException) -> str:
    if _is_compile_error(error):  # it names its own cause and remedy
        return str(error)
    if _is_out_of_memory(error):
        return (f"ran out of memory ({str(error).splitlines()[0] if str(error) else 'MemoryError'}); "
                "try --tiled-vae, a smaller size or a smaller --batch-size")
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except (UsageError, ValueError, OSError, FloatingPointError, MemoryError, RuntimeError) as error:
        # Our loaders and validators raise ValueError subclasses with a message meant for users.
        expected = not isinstance(error, RuntimeError) or _is_out_of_memory(error) or _is_compile_error(error)
        if os.environ.get("LDM_DEBUG") or not expected:
            raise
        print(f"ldm {args.command}: error: {_error_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the command's own usage line, not the top-level one
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_ReaderMayLeave(stream) for stream in streams)
    try:
        return _run(args)
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
