"""Peak resident memory of `mlxmtp convert`, of loading its output and of a short `mlxmtp generate` on it, each in
its own process under /usr/bin/time -v (apt-get install time), against the checkpoint's size on disk.

    python benchmarks/bench_convert_memory.py                       # makes the synthetic FP8 checkpoint (2.5 GB)
    python benchmarks/bench_convert_memory.py --src DIR --bits 4    # any checkpoint
    python benchmarks/bench_convert_memory.py --small --layers 8,16 # growth when the checkpoint doubles in layers

The synthetic checkpoint is DeepSeek-V3's FP8 layout (tests/fp8_checkpoint.py). Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of cmd, from GNU time's verbose report."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)[1])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", r.stderr)[1]
    secs = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return kb * 1024, secs


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(src: Path, work: Path, bits: int, generate: bool) -> list[dict]:
    out = work / f"{src.name}-q{bits}"
    mlxmtp = [sys.executable, "-m", "mlxmtp"]
    rows = []
    rss, secs = peak_rss([*mlxmtp, "convert", str(src), "-o", str(out), "--bits", str(bits), "--force"])
    rows.append({"command": f"mlxmtp convert SRC -o OUT --bits {bits}", "source_bytes": disk_bytes(src),
                 "peak_rss": rss, "seconds": secs})
    rss, secs = peak_rss([sys.executable, "-c", f"import mlxmtp; mlxmtp.load({str(out)!r})"])
    rows.append({"command": "mlxmtp.load(OUT)", "source_bytes": disk_bytes(out), "peak_rss": rss, "seconds": secs})
    if generate:
        rss, secs = peak_rss([*mlxmtp, "generate", "-m", str(out), "-p", "def f(x):", "--max-tokens", "16"])
        rows.append({"command": "mlxmtp generate -m OUT --max-tokens 16", "source_bytes": disk_bytes(out),
                     "peak_rss": rss, "seconds": secs})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, help="checkpoint to convert (default: make the synthetic FP8 one)")
    ap.add_argument("--work", type=Path, help="directory for the checkpoints made and written (default: a temp dir)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="the test-sized synthetic checkpoint (300 MB)")
    ap.add_argument("--layers", default=None, help="comma-separated MoE layer counts of synthetic checkpoints")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    a = ap.parse_args()
    from tests import fp8_checkpoint

    work = a.work or Path(tempfile.mkdtemp(prefix="bench_convert_memory."))
    sources = [a.src] if a.src else []
    if not a.src:
        dims = dict(fp8_checkpoint.SMALL if a.small else fp8_checkpoint.FULL)
        for n in (a.layers.split(",") if a.layers else [dims["moe_layers"]]):
            path = work / f"dsv3_fp8_{n}layers"
            if not (path / "config.json").exists():
                fp8_checkpoint.make(path, **{**dims, "moe_layers": int(n)})
            sources.append(path)
    rows = []
    for src in sources:
        for row in measure(src, work, a.bits, not a.no_generate):
            rows.append({"source": str(src), **row})
            print(f"{src.name:28s} {row['command']:42s} source {row['source_bytes'] / 2**30:6.2f} GB  "
                  f"peak RSS {row['peak_rss'] / 2**30:6.2f} GB  ({row['peak_rss'] / row['source_bytes']:.2f}x, "
                  f"{row['seconds']:.0f} s)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
