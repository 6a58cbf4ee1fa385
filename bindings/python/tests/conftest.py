"""Shared fixtures: temporary stores, the `quiver` binary, helper processes."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import quiverdb

ROOT = pathlib.Path(__file__).resolve().parents[3]


def quiver_bin():
    """The `quiver` binary: QUIVER_BIN, else the workspace's build."""
    env = os.environ.get("QUIVER_BIN")
    if env:
        return env
    for profile in ("debug", "release"):
        p = ROOT / "target" / profile / "quiver"
        if p.exists():
            return str(p)
    found = shutil.which("quiver")
    if found:
        return found
    pytest.skip("no quiver binary: build it (cargo build -p quiver-cli) or set QUIVER_BIN")


@pytest.fixture
def quiver():
    """Runs the quiver CLI; returns its stdout, failing on a non-zero exit."""
    exe = quiver_bin()

    def run(*args, check=True):
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"quiver {args} failed: {out.stderr}")
        return out

    run.exe = exe
    return run


@pytest.fixture
def db(tmp_path):
    d = quiverdb.open(str(tmp_path / "a.db"), name="a")
    yield d
    d.close()


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def run_python(code, *args, timeout=60):
    """Runs Python code in a fresh interpreter (another process)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout
    )
