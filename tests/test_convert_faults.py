"""`mlxmtp convert` under faults, through the command line: SIGTERM ends it as Ctrl-C does; what a SIGKILLed run
left is removed by the next conversion into the same directory; an output location that cannot be written or lacks
the space is refused before any weight is read; a full disk is one `error:` line with the partial output removed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
from click.testing import CliRunner

import mlxmtp.convert as conv
import mlxmtp.safetensors_io as sio
from mlxmtp.cli.main import cli
from tests import fp8_checkpoint
from tests.tiny import deepseek_v3


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(r, *parts):
    assert r.exit_code == 1, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    assert all(p in lines[0] for p in parts), lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return deepseek_v3.make(tmp_path_factory.mktemp("deepseek_v3"))


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A checkpoint whose conversion takes seconds: time to signal it mid-write."""
    return fp8_checkpoint.make(tmp_path_factory.mktemp("fp8"), **dict(fp8_checkpoint.SMALL, moe_layers=2))


def start_and_signal(src, out, sig):
    """Start `mlxmtp convert` in a process, send sig once it is writing shards, return (returncode, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "mlxmtp", "convert", str(src), "-o", str(out), "--bits", "4"],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if any(f.suffix == ".safetensors" for d in out.parent.glob(f".{out.name}.*.partial") for f in d.iterdir()):
            break
        time.sleep(0.05)
    assert p.poll() is None, "finished before it could be signalled"
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def test_sigterm_is_an_interrupt(slow, tmp_path):
    code, err = start_and_signal(slow, tmp_path / "q", signal.SIGTERM)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert list(tmp_path.iterdir()) == []


def test_partial_of_killed_run_removed_next_time(slow, tiny, tmp_path):
    code, _ = start_and_signal(slow, tmp_path / "q", signal.SIGKILL)
    assert code == -signal.SIGKILL
    (stale,) = tmp_path.glob(".q.*.partial")
    r = subprocess.run([sys.executable, "-m", "mlxmtp", "convert", str(tiny), "-o", str(tmp_path / "other"),
                        "--group-size", "32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"warning: removed {stale.name}" in r.stderr and "killed" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_unknown_partial_reported_and_kept(tiny, tmp_path, caplog):
    (tmp_path / ".q.0123abcd.partial").mkdir()  # no marker: not one of ours, or from an older mlxmtp
    r = run("convert", tiny, "-o", tmp_path / "other", "--group-size", 32)
    assert r.exit_code == 0, r.output
    assert any("looks like what an interrupted conversion left" in m for m in caplog.messages)
    assert (tmp_path / ".q.0123abcd.partial").exists()


@pytest.fixture
def no_weight_read(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(conv, "load_model", refuse)
    monkeypatch.setattr(conv, "save_file", refuse)


@pytest.mark.parametrize("where", ["proc", "file"])
def test_unwritable_output_refused_before_reading(tiny, tmp_path, no_weight_read, where):
    if where == "proc":  # /proc refuses new directories even to root
        out = "/proc/mlxmtp-test/out"
    else:
        (tmp_path / "a-file").write_text("")
        out = tmp_path / "a-file" / "out"
    one_error_line(run("convert", tiny, "-o", out), "cannot create the output directory")


def test_no_space_refused_before_writing(tiny, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    monkeypatch.setattr(conv, "save_file", lambda *a, **k: pytest.fail("wrote with no space"))
    one_error_line(run("convert", tiny, "-o", tmp_path / "q", "--group-size", 32), "needs", "1.0 MB free")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing(tiny, tmp_path, monkeypatch):
    """The writer's file fills up after 100 kB: ENOSPC, as a full disk raises it."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += memoryview(b).nbytes
            if self.n > 100_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    monkeypatch.setattr(sio, "open", fake_open, raising=False)
    one_error_line(run("convert", tiny, "-o", tmp_path / "q", "--group-size", 32),
                   "no space left on the device", "partial output was removed")
    assert list(tmp_path.iterdir()) == []


def test_too_little_memory_warned_before_reading(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(conv, "total_memory", lambda: 2**20)
    r = run("convert", tiny, "-o", tmp_path / "q", "--group-size", 32)
    assert r.exit_code == 0, r.output  # a warning: the projection may be pessimistic
    assert any(m.startswith("converting needs about") and "this machine has 1.0 MB" in m for m in caplog.messages)
