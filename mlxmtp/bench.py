"""Benchmark harness for MTP decoding, shared by `mlxmtp bench` and benchmarks/bench_mtp.py.

Method (Spec-Bench, arXiv 2401.07851): greedy decoding at batch 1, the same prompts for every setting. Plain decoding
(draft 0), each MTP setting and optionally mlx-lm's own generate run interleaved: within each repeat every prompt
runs under every setting back to back, the order rotating from prompt to prompt, so machine drift hits all
settings alike. Per setting: the median decode tokens/s and its ratio to plain (the median of the paired
per-prompt ratios, which the table shows: a run and its plain run share prompt and repeat, so prompt lengths and
drift cancel; and the ratio of the medians), tau (mean accepted length, 1 + accepted / verify passes), acceptance
overall and per depth, each also by prompt category.

Weight traffic (``WeightTraffic``): the bytes of weights a decode reads per generated token, counted per pass:
a verify pass reads the dense trunk weights once plus, in every MoE layer, the UNION of the experts its tokens
route to; a draft step reads its MTP module's dense weights, the output head it uses and the union of its
experts. Bytes are at the checkpoint's precision (config torch_dtype; quantized weights as stored), i.e. what a
Mac loads, not the float32 copy the CPU back end runs; embedding lookups (a few rows) and the KV cache are not
counted. bandwidth / (bytes per token) gives the projected tokens/s at 819, 546 and 273 GB/s: an upper bound for
memory-bound decoding on such a machine, not a measurement. It is reported only from MIN_PROJECTED_BYTES per token
up: below that (a toy model like the demo) per-token host overhead, not bandwidth, bounds decoding, and a
"123k tok/s" projection means nothing.

Ctrl-C during the runs raises Interrupted, which carries the report of the runs that finished.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import platform
import re
import statistics
import sys
import sysconfig
import textwrap
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import MLXMTPError
from .generation import context_length, stream_generate
from .speculative import MAX_DRAFT_TOKENS

BANDWIDTHS = {"M3 Ultra": 819, "M4 Max": 546, "M4 Pro": 273}  # GB/s (field-notes.md)
# Weight bytes per token below which no bandwidth projection is shown: 0.5 GB (a 1B model at 4 bits) takes 0.6 ms
# at 819 GB/s, the order of MLX's per-token host overhead (graph building, kernel launches; an assumption, not
# measured here), so a smaller model is overhead-bound and its projection is not a speed anyone will see.
MIN_PROJECTED_BYTES = 0.5e9
SUITES = Path(__file__).parent / "bench_suites"
PROMPT_LINES = 40  # stdlib_code: the first lines of a held-out function
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Setting:
    name: str
    draft_tokens: object = 0  # an int k >= 0 or "auto"
    backend: str = "mlxmtp"  # or "mlx-lm"


def parse_settings(spec: str, mlx_lm: bool = False) -> list[Setting]:
    """'0,1,2,auto' -> settings, plain decoding first (added when missing)."""
    depths = []
    for item in (s.strip() for s in spec.split(",")):
        if item != "auto" and not (item.isdigit() and int(item) <= MAX_DRAFT_TOKENS):
            raise ValueError(f"--draft-tokens: {item!r} is not an integer from 0 to {MAX_DRAFT_TOKENS} or 'auto'")
        k = item if item == "auto" else int(item)
        if k not in depths:
            depths.append(k)
    depths = [0] + sorted(k for k in depths if k not in (0, "auto")) + ["auto"] * ("auto" in depths)
    out = [Setting("plain" if k == 0 else "auto" if k == "auto" else f"k={k}", k) for k in depths]
    return out + [Setting("mlx-lm", 0, "mlx-lm")] if mlx_lm else out


# --------------------------------------------------------------------------------------------------- prompt suites


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES.glob("*.jsonl")) + ["stdlib_code"]


def read_jsonl(path: Path) -> list[dict]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise MLXMTPError(f"{path.name}:{n}: not JSON ({e})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise MLXMTPError(f"{path.name}:{n}: expected an object with a 'prompt' string")
        items.append({"id": item.get("id", f"{path.stem}-{n}"), "category": item.get("category", path.stem), **item})
    return items


def stdlib_code_suite(listing: Path, n: int = 12) -> list[dict]:
    """The first PROMPT_LINES lines of the first long function of each held-out stdlib file (this interpreter's)."""
    if not listing.exists():
        raise MLXMTPError(f"the stdlib_code suite needs {listing} (the demo model ships one)")
    root = Path(sysconfig.get_paths()["stdlib"])
    items = []
    for rel in listing.read_text().split():
        f = root / rel
        if len(items) == n:
            break
        if not f.exists():
            continue
        src = f.read_bytes().decode("utf-8", errors="replace")
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        funcs = sorted((x for x in ast.walk(tree) if isinstance(x, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and x.end_lineno - x.lineno >= PROMPT_LINES + 8), key=lambda x: x.lineno)
        if funcs:
            lines = src.splitlines(keepends=True)[funcs[0].lineno - 1:][:PROMPT_LINES]
            items.append({"id": f"{rel}:{funcs[0].name}", "category": "stdlib_code", "prompt": "".join(lines),
                          "raw": True})
    if not items:
        raise MLXMTPError(f"no held-out stdlib function found from {listing}")
    return items


def load_suite(names: str, model_path: Path) -> list[dict]:
    """Comma-separated built-in suite names or .jsonl files ({"id", "category", "prompt", "raw"?} per line).
    "raw": true prompts skip the chat template."""
    items = []
    for name in (s.strip() for s in names.split(",")):
        if name == "stdlib_code":
            items += stdlib_code_suite(Path(model_path) / "heldout_files.txt")
        elif (SUITES / f"{name}.jsonl").exists():
            items += read_jsonl(SUITES / f"{name}.jsonl")
        elif Path(name).is_file():
            items += read_jsonl(Path(name))
        else:
            raise MLXMTPError(f"unknown suite {name!r}; built in: {', '.join(available_suites())}, or a .jsonl file")
    return items


def default_suite(model_path: Path) -> str:
    return "stdlib_code" if (Path(model_path) / "heldout_files.txt").exists() else "spec_bench_mini"


def encode(tokenizer, item: dict, room: Optional[int]) -> tuple[list[int], bool]:
    """Prompt ids (chat template unless raw or absent), left-truncated to `room` tokens; (ids, truncated)."""
    if tokenizer.has_chat_template and not item.get("raw"):
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": item["prompt"]}],
                                                 add_generation_prompt=True))
    else:
        ids = list(tokenizer.encode(item["prompt"]))
    return (ids[-room:], True) if room is not None and len(ids) > room else (ids, False)


# ------------------------------------------------------------------------------------------------- weight traffic


class WeightTraffic:
    """Counts the weight bytes decoding reads (see the module docstring). Routed experts live in mlx-lm's
    SwitchLinear / QuantizedSwitchLinear (the projections of SwitchGLU, which every family uses), called with the
    expert indices of each token. Only inside ``with`` is the model patched (those layers record their indices,
    ``trunk`` and ``mtp_forward`` count calls); outside it the model is untouched, so the count costs nothing when
    off. ``reset()`` after the prefill, ``summary(n)`` after a generation that emitted n tokens past the prefill's."""

    def __init__(self, model):
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear  # mlx-lm: only when benchmarking

        self.model = model
        cfg = model.config
        itemsize = _ITEMSIZE.get(cfg.get("torch_dtype") or cfg.get("dtype"))
        keep = getattr(model, "float32_params", ())

        def nbytes(name, p):
            floating = mx.issubdtype(p.dtype, mx.floating) and not name.endswith(keep)
            return p.size * itemsize if itemsize and floating else p.nbytes

        modules = dict(model.named_modules())
        self.experts = {n: m for n, m in modules.items() if isinstance(m, (SwitchLinear, QuantizedSwitchLinear))}
        embeddings = tuple(n + "." for n, m in modules.items() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)))
        tied = bool(cfg.get("tie_word_embeddings"))
        self.expert_bytes = dict.fromkeys(self.experts, 0)  # per layer: bytes of one expert
        self.dense = {"trunk": 0, **{j: 0 for j in range(model.num_mtp_modules)}}
        head = 0
        for name, p in tree_flatten(model.parameters()):
            b = nbytes(name, p)
            layer = name.rpartition(".")[0]
            if layer in self.experts:
                self.expert_bytes[layer] += b
                continue
            if name.startswith(embeddings) and not tied:
                continue  # a lookup reads a few rows
            m = re.match(r"mtp\.(\d+)\.", name)
            self.dense[int(m[1]) if m else "trunk"] += b
            if name.startswith("lm_head.") or name.startswith(embeddings):
                head += b
        for j, module in enumerate(model.mtp):
            self.dense[j] += 0 if module.has_own_head else head
        for n, m in self.experts.items():
            self.expert_bytes[n] /= m.weight.shape[0]
        self._restore = []

    def reset(self):
        self.calls, self.drafts, self.passes = [], [], 0

    def __enter__(self):
        self.reset()
        for name, m in self.experts.items():
            self._restore.append((m, _record_calls(m, lambda idx, n=name: self.calls.append((n, idx)))))
        trunk, mtp_forward = self.model.trunk, self.model.mtp_forward

        def counted_trunk(*args, **kwargs):
            self.passes += 1
            return trunk(*args, **kwargs)

        def counted_mtp_forward(j, *args, **kwargs):
            self.drafts.append(j)
            return mtp_forward(j, *args, **kwargs)

        self.model.trunk, self.model.mtp_forward = counted_trunk, counted_mtp_forward
        return self

    def __exit__(self, *exc):
        for m, cls in self._restore:
            m.__class__ = cls
        self._restore = []
        del self.model.trunk, self.model.mtp_forward

    def summary(self, tokens: int) -> dict:
        verify, draft = self.passes * self.dense["trunk"], sum(self.dense[j] for j in self.drafts)
        unions = []  # experts per call of a trunk expert layer: the union over the pass's tokens
        for name, idx in self.calls:
            n = len(np.unique(np.array(idx)))
            if name.startswith("mtp."):
                draft += n * self.expert_bytes[name]
            else:
                verify += n * self.expert_bytes[name]
                unions.append(n)
        return {"weight_bytes": verify + draft, "verify_weight_bytes": verify, "draft_weight_bytes": draft,
                "decode_tokens": tokens, "verify_passes": self.passes, "draft_steps": len(self.drafts),
                "experts_per_moe_layer_pass": float(np.mean(unions)) if unions else None}


def _record_calls(module, record):
    """Make this one module call record(indices) first; returns its original class."""
    base = type(module)

    def __call__(self, x, indices, *args, **kwargs):
        record(indices)
        return base.__call__(self, x, indices, *args, **kwargs)

    module.__class__ = type(f"Recording{base.__name__}", (base,), {"__call__": __call__})
    return base


# ------------------------------------------------------------------------------------------------------- the runs


def load_mlx_lm(path: Path):
    """mlx-lm's own model for the checkpoint, without MTP, in the float dtype mlxmtp uses here. The MTP layers
    model.layers.{n >= num_hidden_layers} are dropped first: mlx-lm's DeepSeek-V3 sanitize only knows layer 61."""
    from mlx_lm.utils import _get_classes, load_model

    from .loading import default_dtype, read_config

    n = read_config(path)["num_hidden_layers"]
    layer = re.compile(r"model\.layers\.(\d+)\.")

    def classes(config):
        model_class, args_class = _get_classes(config)

        class WithoutMTP(model_class):
            def sanitize(self, weights):
                weights = {k: v for k, v in weights.items() if not ((m := layer.match(k)) and int(m[1]) >= n)}
                return super().sanitize(weights)

        return WithoutMTP, args_class

    try:
        model, _ = load_model(Path(path), get_model_classes=classes)
    except Exception as e:  # noqa: BLE001 - whatever mlx-lm cannot load ends the same way
        why = (str(e).splitlines() or [""])[0]
        raise MLXMTPError(f"mlx-lm cannot load {path} ({type(e).__name__}: {why}); run without the mlx-lm "
                          "baseline") from None
    if default_dtype() is not None:
        model.set_dtype(default_dtype())
    return model


def _run_mlxmtp(model, tokenizer, ids, k, max_tokens, traffic: WeightTraffic) -> dict:
    for i, inc in enumerate(stream_generate(model, tokenizer, ids, max_tokens=max_tokens, draft_tokens=k)):
        if i == 0:
            traffic.reset()  # count decoding only, not the prefill
    s = inc.stats
    out = {**s.to_dict(), "finish_reason": inc.finish_reason}
    return {**out, **traffic.summary(s.generated_tokens - 1)} if s.generated_tokens > 1 else out


def _run_mlx_lm(model, tokenizer, ids, max_tokens) -> dict:
    """Timed like mlxmtp's stats: decode tokens/s over the tokens after the first."""
    gen = importlib.import_module("mlx_lm.generate")  # the package's `generate` attribute is the function
    t_first = None
    for r in gen.stream_generate(model, tokenizer, ids, max_tokens=max_tokens):
        t_first = t_first or time.perf_counter()
    t_end = time.perf_counter()
    n = r.generation_tokens - (r.finish_reason == "stop")  # mlx-lm counts the EOS token
    return {"prompt_tokens": len(ids), "prefill_tokens_per_s": r.prompt_tps, "generated_tokens": n,
            "decode_tokens_per_s": (n - 1) / (t_end - t_first) if n > 1 else 0.0, "mean_accepted_length": 1.0,
            "peak_memory_gb": r.peak_memory, "finish_reason": r.finish_reason}


def run(model, tokenizer, prompts: list[dict], settings: list[Setting], *, repeats: int = 3, max_tokens: int = 128,
        model_path: Optional[Path] = None, progress: bool = True) -> dict:
    """Run every prompt under every setting, interleaved and repeated; returns the full report (see summarize)."""
    if repeats < 1 or max_tokens < 1:
        raise ValueError("repeats and max_tokens must be >= 1")
    if not prompts:
        raise MLXMTPError("the suite has no prompts")
    ctx = context_length(model)
    room = ctx - max_tokens - 1 if ctx else None
    if room is not None and room < 1:
        raise ValueError(f"--max-tokens {max_tokens} leaves no room for a prompt in the context of {ctx}")
    encoded = [encode(tokenizer, p, room) for p in prompts]
    lm = load_mlx_lm(model_path) if any(s.backend == "mlx-lm" for s in settings) else None

    def once(s: Setting, ids, n):
        if s.backend == "mlx-lm":
            return _run_mlx_lm(lm, tokenizer, ids, n)
        return _run_mlxmtp(model, tokenizer, ids, s.draft_tokens, n, traffic)

    total = repeats * len(prompts) * len(settings)
    runs = []

    def report(interrupted: bool) -> dict:
        done = [s for s in settings if any(r["setting"] == s.name for r in runs)]
        return {"model": str(model_path) if model_path else None, "model_type": model.config.get("model_type"),
                "mtp_modules": model.num_mtp_modules, "settings": [asdict(s) for s in settings],
                "repeats": repeats, "max_tokens": max_tokens, "prompts": len(prompts),
                "categories": sorted({p["category"] for p in prompts}), "machine": machine_info(),
                "openblas_threads": openblas_threads(model),
                "interrupted": interrupted, "runs_planned": total, "runs": runs, "summary": summarize(runs, done)}

    try:
        with WeightTraffic(model) as traffic, _progress(total, progress) as advance:
            for s in settings:  # warm-up (and, for auto, the one-off cost measurement)
                once(s, encoded[0][0], min(max_tokens, 8))
            for r in range(repeats):
                for i, (item, (ids, truncated)) in enumerate(zip(prompts, encoded)):
                    for j in range(len(settings)):
                        s = settings[(i + r + j) % len(settings)]
                        t0 = time.perf_counter()
                        rec = once(s, ids, max_tokens)
                        runs.append({"setting": s.name, "repeat": r, "prompt_id": item["id"],
                                     "category": item["category"], "prompt_truncated": truncated,
                                     "wall_s": time.perf_counter() - t0, **rec})
                        advance(f"{s.name} · {item['id']}")
    except KeyboardInterrupt:
        if not runs:
            raise
        raise Interrupted(report(interrupted=True)) from None
    return report(interrupted=False)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during bench.run; ``report`` holds the runs that finished (``"interrupted": true``)."""

    def __init__(self, report: dict):
        super().__init__()
        self.report = report


@contextmanager
def _progress(total: int, show: bool):
    """A rich progress bar on stderr (at a terminal); yields a function that advances it by one run."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True, disable=not (show and sys.stderr.isatty())) as bar:
        task = bar.add_task("warm-up", total=total)
        yield lambda text: bar.update(task, advance=1, description=text)


# ------------------------------------------------------------------------------------------------------ summaries


def _acceptance(runs: list[dict]) -> dict:
    """tau and acceptance over runs; per-depth rates are the runs' rates weighted by verify passes (exact for a
    fixed k, where every pass drafts k)."""
    if not runs or "target_forwards" not in runs[0]:
        return {"tau": 1.0}
    passes = sum(r["target_forwards"] for r in runs)
    drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
    depth = max(len(r["acceptance_by_depth"]) for r in runs)
    by_depth = []
    for d in range(depth):
        w = [(r["acceptance_by_depth"][d], r["target_forwards"]) for r in runs if len(r["acceptance_by_depth"]) > d]
        by_depth.append(sum(a * n for a, n in w) / max(sum(n for _, n in w), 1))
    return {"tau": 1 + accepted / passes if passes else 1.0, "acceptance_rate": accepted / drafted if drafted else 0.0,
            "acceptance_by_depth": by_depth, "drafted": drafted, "accepted": accepted, "verify_passes": passes}


def _median_tps(runs):
    return statistics.median(r["decode_tokens_per_s"] for r in runs) if runs else 0.0


def summarize(runs: list[dict], settings: list[Setting]) -> dict:
    if not settings:
        return {}
    plain = [r for r in runs if r["setting"] == settings[0].name]
    base = _median_tps(plain)
    paired_base = {(r["repeat"], r["prompt_id"]): r["decode_tokens_per_s"] for r in plain}
    out = {}
    for s in settings:
        rs = [r for r in runs if r["setting"] == s.name]
        med = _median_tps(rs)
        paired = [r["decode_tokens_per_s"] / paired_base[k] for r in rs
                  if paired_base.get(k := (r["repeat"], r["prompt_id"]))]
        entry = {"backend": s.backend, "draft_tokens": s.draft_tokens, "runs": len(rs),
                 "decode_tokens_per_s_median": med, "ratio_vs_plain": med / base if base else None,
                 "paired_ratio_vs_plain_median": statistics.median(paired) if paired else None,
                 **_acceptance(rs), "by_category": {}}
        depths = [r["rounds_by_depth"] for r in rs if r.get("rounds_by_depth")]
        if depths:  # what auto chose (for a fixed k, that k), and the host synchronisations a round took
            entry["rounds_by_depth"] = [sum(d[k] for d in depths if k < len(d)) for k in range(max(map(len, depths)))]
            entry["syncs_per_round"] = statistics.mean(r["syncs_per_round"] for r in rs if r.get("rounds_by_depth"))
        for c in sorted({r["category"] for r in rs}):
            rc = [r for r in rs if r["category"] == c]
            entry["by_category"][c] = {"decode_tokens_per_s_median": _median_tps(rc), **_acceptance(rc)}
        counted = [r for r in rs if "weight_bytes" in r]
        if counted:
            per_token = sum(r["weight_bytes"] for r in counted) / sum(r["decode_tokens"] for r in counted)
            experts = [r["experts_per_moe_layer_pass"] for r in counted if r["experts_per_moe_layer_pass"]]
            entry["weight_bytes_per_token"] = per_token
            entry["experts_per_moe_layer_pass"] = statistics.mean(experts) if experts else None
            if per_token >= MIN_PROJECTED_BYTES:
                entry["projected_tokens_per_s"] = {f"{bw} GB/s ({chip})": bw * 1e9 / per_token
                                                   for chip, bw in BANDWIDTHS.items()}
        out[s.name] = entry
    return out


def openblas_threads(model) -> Optional[dict]:
    """OpenBLAS's thread count for the prefill (and mlx-lm) and for mlxmtp's decoding rounds; None without it."""
    from .blas import openblas_threads as current
    from .tuning import decode_threads

    n = current()
    return None if n is None else {"prefill": n, "decoding": decode_threads(model) or n}


def machine_info() -> dict:
    from importlib.metadata import version

    from . import __version__
    from .blas import blas_in_use

    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "mlx": mx.__version__,
            "mlx_lm": version("mlx-lm"), "mlxmtp": __version__, "device": str(mx.default_device()),
            "blas": blas_in_use(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------------------- output


def print_report(report: dict, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    summary = report["summary"]
    bws = sorted(BANDWIDTHS.items(), key=lambda x: -x[1])
    title = f"{report['model']}: {report['prompts']} prompts x {report['repeats']} repeats, " \
            f"max {report['max_tokens']} tokens, greedy"
    projected = any("projected_tokens_per_s" in e for e in summary.values())
    caption = ("bound@N: projected tok/s at N GB/s = N / weight bytes read per token (an upper bound for a Mac with "
               "that bandwidth, not measured)" if projected else None)
    t = Table(box=box.SIMPLE_HEAD, title=title, caption=caption)
    columns = ["setting", "tok/s", "x plain", "tau", "accept", "by depth", "MB/tok"]
    for col in columns + [f"bound@{bw}" for _, bw in bws] * projected:
        t.add_column(col, justify="left" if col in ("setting", "by depth") else "right")
    for name, e in summary.items():
        bounds = [_si(e.get("projected_tokens_per_s", {}).get(f"{bw} GB/s ({chip})")) for chip, bw in bws]
        ratio = e.get("paired_ratio_vs_plain_median") or e["ratio_vs_plain"]
        t.add_row(name, f"{e['decode_tokens_per_s_median']:.1f}", _fmt(ratio, "{:.2f}"),
                  f"{e['tau']:.2f}", _fmt(e.get("acceptance_rate") if e.get("drafted") else None, "{:.0%}"),
                  " ".join(f"{a:.0%}" for a in e.get("acceptance_by_depth", [])),
                  _fmt(e.get("weight_bytes_per_token") and e["weight_bytes_per_token"] / 1e6, "{:.2f}"),
                  *bounds * projected)
    console.print(t)
    if report.get("interrupted"):
        console.print(f"Interrupted: {len(report['runs'])} of {report['runs_planned']} runs finished; the figures "
                      "are over those.")
    for name, e in summary.items():
        if e["draft_tokens"] == "auto" and e.get("rounds_by_depth"):
            n = sum(e["rounds_by_depth"])
            chose = ", ".join(f"k={k} {c / n:.1%}" for k, c in enumerate(e["rounds_by_depth"]) if c)
            console.print(f"{name} chose: {chose} of {n} rounds; {e['syncs_per_round']:.2f} host syncs per round")
    if report.get("openblas_threads"):
        t = report["openblas_threads"]
        console.print(f"OpenBLAS threads: {t['prefill']} for prefill (and mlx-lm), {t['decoding']} for mlxmtp's "
                      "decoding rounds (tuning.decode_threads)")
    mtp = [n for n, e in summary.items() if e["backend"] == "mlxmtp" and e["draft_tokens"] != 0]
    if mtp:
        c = Table(box=box.SIMPLE_HEAD, title="tau by prompt category")
        c.add_column("category")
        for n in mtp:
            c.add_column(n, justify="right")
        for cat in report["categories"]:
            c.add_row(cat, *[_fmt(summary[n]["by_category"].get(cat, {}).get("tau"), "{:.2f}") for n in mtp])
        console.print(c)
    if not projected and any("weight_bytes_per_token" in e for e in summary.values()):
        console.print(f"No bandwidth projection: under {MIN_PROJECTED_BYTES / 1e9:.1f} GB of weights read per token, "
                      "per-token overhead, not memory bandwidth, bounds decoding.")
    console.print("x plain: the median of each run's ratio to the plain run of the same prompt and repeat. On a Linux "
                  "CPU absolute tokens/s are noise; compare the ratios to plain decoding.")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else spec.format(x)


def _si(x) -> str:
    if x is None:
        return "-"
    return next((f"{x / f:.3g}{u}" for f, u in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if x >= f), f"{x:.3g}")


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        # `pip install 'mlxmtp[plot]'` only works for an install from an index, not from a clone
        raise MLXMTPError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot(report: dict, path: Path) -> None:
    """Decode tokens/s and tau against draft depth; auto and mlx-lm as horizontal lines."""
    plt = pyplot()
    summary = report["summary"]
    fixed = sorted((e["draft_tokens"], e) for e in summary.values()
                   if e["backend"] == "mlxmtp" and e["draft_tokens"] != "auto")
    ks = [k for k, _ in fixed]
    fig, (ax_tps, ax_tau) = plt.subplots(1, 2, figsize=(10, 4.5), layout="constrained")
    ax_tps.plot(ks, [e["decode_tokens_per_s_median"] for _, e in fixed], "o-", label="mlxmtp, fixed k")
    ax_tau.plot(ks, [e["tau"] for _, e in fixed], "o-", label="mlxmtp, fixed k")
    for name, e in summary.items():
        if e["draft_tokens"] == "auto" or e["backend"] == "mlx-lm":
            ax_tps.axhline(e["decode_tokens_per_s_median"], ls="--", color="C1" if e["backend"] == "mlxmtp" else "C2",
                           label=name)
            if e["backend"] == "mlxmtp":
                ax_tau.axhline(e["tau"], ls="--", color="C1", label=name)
    ax_tps.set(xlabel="draft tokens k", ylabel="decode tokens/s (median)", title="throughput")
    ax_tau.set(xlabel="draft tokens k", ylabel="tau (mean accepted length)", title="acceptance")
    for ax in (ax_tps, ax_tau):
        ax.set_xticks(ks)
        ax.legend()
    title = f"{Path(report['model'] or 'model').name}: {report['machine']['device']}, {report['machine']['blas']}"
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)  # constrained layout keeps it inside the figure
    fig.savefig(path, dpi=120)
    plt.close(fig)
