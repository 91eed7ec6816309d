"""OpenBLAS preloading on Linux (mlxmtp/blas.py): on when the system library exists, off with MLXMTP_NO_OPENBLAS."""

import os
import subprocess
import sys

import pytest

from mlxmtp.blas import OPENBLAS_CANDIDATES

PROBE = "import mlxmtp, mlxmtp.blas as b; print(b.blas_in_use())"


def probe(**env):
    e = {k: v for k, v in os.environ.items() if k != "MLXMTP_NO_OPENBLAS"}
    e.update(env)
    return subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(sys.platform != "linux", reason="OpenBLAS preloading is Linux-only; macOS uses Accelerate")
def test_openblas_preloaded_when_present_and_wanted():
    present = any(os.path.exists(p) for p in OPENBLAS_CANDIDATES)
    assert probe().startswith("OpenBLAS") == present
    assert "MLXMTP_NO_OPENBLAS set" in probe(MLXMTP_NO_OPENBLAS="1")


def test_too_late_after_mlx_import_is_reported_honestly():
    out = subprocess.run([sys.executable, "-c", "import mlx.core; " + PROBE], capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items() if k != "MLXMTP_NO_OPENBLAS"}).stdout
    assert not out.startswith("OpenBLAS")
    if sys.platform == "linux":
        assert "imported before mlxmtp" in out


def test_reference_blas_hint(monkeypatch):
    from mlxmtp import blas

    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.delenv("MLXMTP_NO_OPENBLAS", raising=False)
    monkeypatch.setattr(blas, "_loaded", OPENBLAS_CANDIDATES[0])
    assert blas.reference_blas_hint() is None  # OpenBLAS in use
    monkeypatch.setattr(blas, "_loaded", None)
    monkeypatch.setattr(blas, "_too_late", False)
    assert "apt-get install libopenblas0-pthread" in blas.reference_blas_hint()
    monkeypatch.setattr(blas, "_too_late", True)
    assert "imported before mlxmtp" in blas.reference_blas_hint()
    monkeypatch.setenv("MLXMTP_NO_OPENBLAS", "1")
    assert blas.reference_blas_hint() is None  # asked for
    monkeypatch.setattr(blas.sys, "platform", "darwin")
    monkeypatch.delenv("MLXMTP_NO_OPENBLAS")
    assert blas.reference_blas_hint() is None  # Accelerate
