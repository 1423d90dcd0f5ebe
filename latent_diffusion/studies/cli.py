"""``ldm study compression``: the paper's LDM-{1..32} experiment, trained, measured and plotted."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("runs") / "compression-study"


def _command_line(args: argparse.Namespace) -> str:
    """The command as it ran, rebuilt from its options (sys.argv is not this command's in-process)."""
    words = ["ldm", "study", "compression", "--out", args.out]
    if args.rescore or args.report_only:
        words.append("--rescore" if args.rescore else "--report-only")
    else:
        words += ["--budget", f"{args.budget:g}", "--seed", str(args.seed), "--factors", *map(str, sorted(set(args.factors)))]
    return shlex.join(words)


def _cmd_compression(args: argparse.Namespace) -> None:
    from latent_diffusion.studies.compression import StudyPlan, record_command, rescore_study, run_study
    from latent_diffusion.studies.compression_report import write_report

    out = Path(args.out)
    report = Path(args.report) if args.report else out / "report"
    if args.rescore:
        print(f"scored {rescore_study(out)} saved evaluations again", file=sys.stderr)
        record_command(out, _command_line(args))
    elif not args.report_only:
        factors = tuple(sorted(set(args.factors)))
        plan = StudyPlan.for_budget(args.budget, factors=factors, seed=args.seed,
                                    vq_factors=tuple(f for f in StudyPlan.vq_factors if f in factors))
        started = time.perf_counter()

        def log(message: str) -> None:
            print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", file=sys.stderr, flush=True)

        record_command(out, _command_line(args))
        run_study(out, plan, log=log)
    print(write_report(out, report))


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``study`` and its one study, ``compression``."""
    from latent_diffusion.studies.compression_models import FACTORS

    study = subparsers.add_parser("study", help="Rerun one of the paper's experiments on the shapes world.",
                                  description="Rerun one of the paper's experiments on the shapes world.")
    kinds = study.add_subparsers(dest="study", required=True, metavar="STUDY")
    compression = kinds.add_parser(
        "compression", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="How much to compress before diffusing: first stages and LDMs at f = 1..32, equal training FLOPs.",
        description="For each downsampling factor f, train a first stage (KL; VQ too at f = 4 and 8) and a "
        "text-to-image LDM with the same training FLOPs, evaluate them, and write a Markdown table and PNG plots. "
        "The default budget takes about an hour on 2 CPU cores; runs resume where they stopped, and "
        "processes given different --factors can share one --out.",
    )
    compression.add_argument("--out", default=str(DEFAULT_OUT), help="folder for runs, checkpoints and results")
    compression.add_argument("--report", default=None, help="folder for the table and plots (default: OUT/report)")
    compression.add_argument("--budget", type=float, default=1.0,
                             help="scales every run's training steps (0.5: half the steps, the time and the FLOPs)")
    compression.add_argument("--factors", type=int, nargs="+", default=list(FACTORS), choices=FACTORS,
                             help="the downsampling factors to run in this process")
    compression.add_argument("--seed", type=int, default=0, help="seed of every run's weights, data and noise")
    compression.add_argument("--report-only", action="store_true",
                             help="train nothing: gather the results already in OUT into the report")
    compression.add_argument("--rescore", action="store_true",
                             help="train nothing: read every saved evaluation grid in OUT with the judge again "
                             "(after a change to the judge or the metrics), then write the report")
    compression.set_defaults(func=_cmd_compression, command_parser=compression)
    return study
