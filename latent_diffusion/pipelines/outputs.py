"""Where generated images go: the output folder, checked before any work, and the numbered PNG files.

A run's images are written as each batch is done, so a failure later (a full disk, an interrupt)
keeps every image written before it.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path


class OutputError(OSError):
    """The output folder cannot take the images; the message names the path and the reason."""


def check_output_folder(folder: str | os.PathLike) -> None:
    """Refuse a folder that cannot take files: a file in its place, no permission, a read-only or full disk.

    A file is test-written in the folder, or in the nearest existing folder above it when it does not
    exist yet, so that nothing is created before the run (the first image creates the folder).
    """
    folder = Path(folder)
    existing = folder
    while not existing.is_dir():
        if existing.exists() or existing.is_symlink():
            what = "a file" if existing.is_file() else "not a folder"
            raise OutputError(f"output folder {folder}: {existing} is {what}")
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".ldm-write-test-") as probe:
            # A few blocks and fsync, so that a full disk shows now rather than at the first image.
            probe.write(b"\0" * 16384)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise OutputError(f"output folder {folder}: cannot write in {existing} ({error.strerror or error})") from None


def _next_index(outdir: Path) -> int:
    numbers = [int(m.group(1)) for p in outdir.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


class Writer:
    """Saves images as they come: ``OUTDIR/NNNNN-SEED.png``, numbered after the files already there."""

    def __init__(self, outdir: str | os.PathLike, quiet: bool) -> None:
        self.outdir = Path(outdir)
        self.quiet = quiet
        self.images: list = []
        self.first_parameters: str | None = None
        self.first_index: int | None = None
        self.index: int | None = None

    def save(self, result) -> None:
        from latent_diffusion.pipelines.png_info import save_png

        if self.index is None:
            self._write(lambda: self.outdir.mkdir(parents=True, exist_ok=True), self.outdir)
            self.index = self.first_index = _next_index(self.outdir)
        for image, parameters, seed in zip(result.images, result.parameters, result.seeds):
            path = self.outdir / f"{self.index:05d}-{seed}.png"
            self._write(lambda: save_png(image, path, parameters), path)
            self.index += 1
            self.images.append(image)
            self.first_parameters = self.first_parameters or parameters
            if not self.quiet:
                print(path)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)

    def save_grid(self) -> None:
        """All images of the run in one picture, ``grid-FIRST-LAST.png`` after the numbers of the first and last."""
        from latent_diffusion.pipelines.images import make_grid
        from latent_diffusion.pipelines.png_info import save_png

        if len(self.images) > 1 and len({image.size for image in self.images}) == 1:
            path = self.outdir / f"grid-{self.first_index:05d}-{self.index - 1:05d}.png"
            self._write(lambda: save_png(make_grid(self.images), path, self.first_parameters or ""), path)
            if not self.quiet:
                print(path)

    def _write(self, write, path: Path) -> None:
        try:
            write()
        except OSError as error:
            kept = len(self.images)
            done = (f"the {kept} image{'s' if kept != 1 else ''} written before it stay in {self.outdir}"
                    if kept else "no image was written")
            raise OutputError(f"could not write {path} ({error.strerror or error}); {done}") from None
