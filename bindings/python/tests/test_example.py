"""The example a reader runs: two agents sharing memory through a server."""

import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "shared_memory.py"


def test_the_shared_memory_example_runs():
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ada now knows from the other agent: 'call the billing API'" in out.stdout
    assert "bob now knows from the other agent: 'parse the CSV export'" in out.stdout
    assert "finds bob's note" in out.stdout
