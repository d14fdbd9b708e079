"""The benchmark scripts start: each one's ``--help`` runs its imports and its argument parser.

``make bench`` runs only some of them, and the one-off studies (``bench/light_segmenter.py``,
``bench/deploy_resources.py``) run rarely: a script that lost a module it imports (as both once did,
when the helper they shared moved into ``bench/common.py``) would otherwise be found only by the next
person who needs its numbers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py")
                 if not p.name.startswith("test_") and 'if __name__ == "__main__":' in p.read_text())


def test_the_scripts_are_found() -> None:
    assert {"run.py", "floor.py", "e2e.py", "deploy_resources.py", "light_segmenter.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_starts(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=BENCH.parent, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower(), done.stdout[-2000:]
