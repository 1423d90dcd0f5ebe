"""The compression study's report: Markdown tables and PNG plots from the results its runs wrote."""
from __future__ import annotations

import json
import math
from pathlib import Path

from latent_diffusion.studies.plots import Series, plot

REPORT_NAME = "results.md"


def _read(out: Path, pattern: str) -> list[dict]:
    found = [json.loads(path.read_text()) for path in sorted((out / "runs").glob(f"{pattern}/results.json"))]
    return sorted(found, key=lambda r: (r["f"], r.get("kind", "")))


def _format_psnr(value: float) -> str:
    return "lossless" if math.isinf(value) else f"{value:.2f}"


def first_stage_table(stages: list[dict]) -> list[str]:
    lines = ["| f | regulariser | latent (c x h x w) | numbers per image | parameters | PSNR (dB) | "
             "judge: attributes | judge: whole scene | Fréchet distance to originals |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in stages:
        c, h, w = r["latent"]
        lines.append(f"| {r['f']} | {r['kind'].upper() if r['kind'] != 'none' else 'none (pixels)'} | {c} x {h} x {w} | "
                     f"{c * h * w} | {r['parameters']:,} | {_format_psnr(r['psnr'])} | {r['attribute_accuracy']:.3f} | "
                     f"{r['scene_accuracy']:.3f} | {r['frechet_distance']:.2f} |")
    return lines


def _quality(evaluation: dict) -> str:
    return f"{evaluation.get('attribute_accuracy', float('nan')):.3f} / {evaluation['scene_accuracy']:.3f}"


def ldm_table(ldms: list[dict]) -> list[str]:
    fractions = max((len(r["evaluations"]) for r in ldms), default=0)
    head = " | ".join(f"at {i + 1}/{fractions}" for i in range(fractions))
    lines = [f"| f | latent | UNet parameters | forward MFLOP / latent | batch | training PFLOP | {head} | "
             "Fréchet distance (end) | sampling images/s | minutes |",
             "|---|---|---|---|---|---|" + "---|" * fractions + "---|---|---|"]
    for r in ldms:
        evaluations = r["evaluations"]
        qualities = [_quality(e) for e in evaluations] + ["-"] * (fractions - len(evaluations))
        last = evaluations[-1] if evaluations else None
        c, h, w = r["latent"]
        lines.append(
            f"| {r['f']} | {c} x {h} x {w} | {r['unet_parameters']:,} | {r['unet_forward_flops_per_image'] / 1e6:.1f} | "
            f"{r['batch']} | {r['train_flops_per_step'] * r['steps'] / 1e15:.3f} | {' | '.join(qualities)} | "
            f"{last['frechet_distance']:.2f} | {r.get('images_per_second', last['images_per_second']):.2f} | "
            f"{r['wall_seconds'] / 60:.1f} |"
            if last else f"| {r['f']} | {c} x {h} x {w} | - | - | - | - | {' | '.join(qualities)} | - | - | - |")
    return lines


_CURVES = (("attribute_accuracy", "quality-vs-compute.png", "attribute accuracy (shapes judge)", (0.0, 1.0)),
           ("scene_accuracy", "scenes-vs-compute.png", "scene accuracy (all of a scene right)", (0.0, 1.0)),
           # ASCII: Pillow's default font has no é.
           ("frechet_distance", "fd-vs-compute.png", "Frechet distance (lower is better)", None))


def write_plots(report: Path, stages: list[dict], ldms: list[dict]) -> list[Path]:
    written = []
    ldms = [r for r in ldms if r["evaluations"]]
    nan = float("nan")
    if ldms:
        for key, name, label, y_range in _CURVES:
            series = [Series(f"f={r['f']}", tuple(e["train_flops"] for e in r["evaluations"]),
                             tuple(e.get(key, nan) for e in r["evaluations"])) for r in ldms]
            written.append(plot(report / name, series, title=f"LDM-f: {label} against training compute",
                                x_label="training FLOPs", y_label=label, log_x=True, y_range=y_range))
        points = [Series(f"f={r['f']}", (r.get("images_per_second", r["evaluations"][-1]["images_per_second"]),),
                         (r["evaluations"][-1].get("attribute_accuracy", nan),), lines=False, labels=(f"f={r['f']}",))
                  for r in ldms]
        written.append(plot(report / "quality-vs-throughput.png", points, log_x=True, y_range=(0.0, 1.0),
                            title="LDM-f at the end of the budget: quality against sampling speed",
                            x_label="images per second (DDIM 20 steps, CFG, decoding included)",
                            y_label="attribute accuracy"))
    by_kind = {}
    for r in stages:
        if r["kind"] != "none":
            by_kind.setdefault(r["kind"], []).append(r)
    if by_kind:
        series = [Series(kind.upper(), tuple(r["f"] for r in rows), tuple(r["psnr"] for r in rows))
                  for kind, rows in sorted(by_kind.items())]
        written.append(plot(report / "reconstruction-vs-f.png", series, log_x=True,
                            title="First stage: reconstruction against the downsampling factor",
                            x_label="downsampling factor f", y_label="PSNR (dB)",
                            x_ticks=tuple(sorted({r["f"] for r in stages if r["kind"] != "none"}))))
    return written


def _commands(out: Path) -> list[str]:
    path = out / "commands.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else ["(not recorded)"]


def write_report(out: Path, report: Path) -> Path:
    """Gather the results under ``out`` into ``report``/results.md and its plots; returns the Markdown file."""
    stages, ldms = _read(out, "*-f*[0-9]"), _read(out, "ldm-f*")
    stages = [r for r in stages if "psnr" in r]
    if not stages and not ldms:
        raise FileNotFoundError(f"no study results under {out / 'runs'}: run the study first")
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").is_file() else {}
    report.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, stages, ldms)
    lines = [
        "# Compression study: results", "",
        "Made by:", "", "```bash", *_commands(out), "```", "",
        "Plan: " + ", ".join(f"{k} {v}" for k, v in plan.items()) + ".", "",
        "## First stages (reconstructions of held-out scenes)", "", *first_stage_table(stages), "",
        "## LDMs (equal training FLOPs per step for every f)", "",
        "Each evaluation: attribute accuracy / scene accuracy of the shapes judge.", "", *ldm_table(ldms), "",
        *[f"![{path.stem}]({path.name})" for path in plots], "",
    ]
    (report / "results.json").write_text(json.dumps({"plan": plan, "first_stages": stages, "ldms": ldms}, indent=1) + "\n")
    path = report / REPORT_NAME
    path.write_text("\n".join(lines))
    return path
