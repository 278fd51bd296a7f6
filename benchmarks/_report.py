"""What the benchmark scripts share: writing their Markdown result with the machine it came from."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent


def write_markdown(name: str, lines: list[str], machine_note: str = "") -> Path:
    """Write benchmarks/<name>.md (lines + a footer naming the machine) and print it."""
    import torch

    footer = f"Machine: {os.cpu_count()} cores shared with other jobs, {sys.platform}, torch {torch.__version__}; one run of this script."
    text = "\n".join([*lines, "", footer + (f" {machine_note}" if machine_note else "")]) + "\n"
    out = BENCHMARKS / f"{name}.md"
    out.write_text(text)
    print(text, end="")
    return out
