"""Where a benchmark's table goes: printed, and kept under bench/results/ with the time it was made."""
from __future__ import annotations

import datetime
import sys
from pathlib import Path


def write_table(table: str, folder: Path, name: str) -> Path:
    """Prints ``table`` and writes it to ``folder/<stamp>-<name>.md``; returns that path."""
    print(table)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = folder / f"{stamp}-{name}.md"
    out.write_text(table + "\n")
    print(f"written to {out}", file=sys.stderr)
    return out
