"""`mlxmtp doctor` on this (Metal-less) machine: it says what it could not check and measures what it can."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlxmtp.cli.main import cli
from tests.tiny import deepseek_v3 as tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("dsv3"))


def invoke(*args):
    return CliRunner().invoke(cli, ["doctor", *args])


def test_text_report_is_honest_about_metal():
    r = invoke()
    assert r.exit_code == 0, r.output
    assert "Metal     not available" in r.output and "BLAS" in r.output
    assert "not checked here: the Metal kernel itself" in r.output
    for fmt in ("float32", "q4", "q8"):
        line = next(line for line in r.output.splitlines() if f"moe_union  {fmt} " in line)
        assert "unavailable" in line and "reference union" in line and "sorted" in line and "stock gather" in line
        # what auto runs for this format here: the sorted path for the check's float experts (2 MiB projections,
        # cache-sized), stock for quantized (CPU compute-bound)
        assert f"auto takes the {'sorted' if fmt == 'float32' else 'stock'} path here" in line
    assert "pass" not in r.output  # no self-check claimed where none ran


def test_json_report_with_model_curve(ckpt):
    r = invoke("-m", str(ckpt), "--max-m", "3", "--repeats", "1", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["machine"]["metal"] is False
    kernels = {k["format"]: k for k in rep["kernels"]}
    assert kernels["float32"]["status"] == "unavailable" and kernels["float32"]["reference_ms"] > 0
    assert kernels["bfloat16"]["status"] == "not measured" and "kernel_ms" not in kernels["bfloat16"]
    rows = rep["model"]["rows"]
    assert [row["m"] for row in rows] == [1, 2, 3]
    assert rows[0]["bytes_bound"] == 1.0 and rows[0]["auto"] == 1.0 and rows[0]["auto/1"] == 1.0
    assert all(row[f"{mode}_p25"] <= row[mode] <= row[f"{mode}_p75"] for row in rows for mode in ("auto", "stock"))
    # more tokens read at least the same weights: the union of their experts only grows
    assert all(b["bytes_bound"] >= a["bytes_bound"] for a, b in zip(rows, rows[1:]))
    assert rows[0]["unique_experts"] == 2 and all(row["unique_experts"] >= 2 for row in rows)


def test_bad_model_is_one_line_error(tmp_path):
    r = invoke("-m", str(tmp_path / "missing"))
    assert r.exit_code == 1
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
