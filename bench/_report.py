"""Shared tail of the benchmark scripts: print the markdown table, write the JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], markdown: Callable[[dict[str, Any]], str], out: Path | None) -> None:
    """Adds ``report["markdown"]``, prints it, and writes the whole report as JSON to ``out``."""
    report["markdown"] = markdown(report)
    print(report["markdown"])
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out}", file=sys.stderr)
