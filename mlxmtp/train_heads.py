"""Train MTP heads for a frozen trunk (``mlxmtp train-heads MODEL -o OUT``), for trunks that ship none.

Recipe (the one community heads grafted onto head-less trunks share; issue 12): the trunk is frozen and only run
forward, so quantized trunks work too; MTP module j (draft depth j + 1) is trained to match the trunk's OWN
distribution one step further by KL divergence, not cross-entropy on sampled text. For every row i of a window t:

    hidden_0 = the trunk's hidden state at i (the family's ``mtp_hidden``: post-norm for DeepSeek-style families)
    hidden_j, q_j = model.mtp_forward(j, hidden_{j-1}, t[i+j+1])          # the function MTPDrafter runs
    loss_j = KL(p_trunk(. | t[..i+j+1]) || q_j)                           # p: the trunk's distribution of t[i+j+2]

The training forward IS ``model.mtp_forward`` (same hidden state, same zeroed embedding at row 0, same head), and a
window is a sequence that starts at position 0, exactly as a prompt does for the drafter. So the held-out acceptance
the trainer reports, measured with ``mlxmtp.generate(..., draft_tokens=k)``, is what ``mlxmtp bench`` measures on
the written checkpoint (tests/test_train_heads.py checks this).

Teacher targets are computed on the fly (one trunk forward per batch), or, with ``teacher_cache`` K > 0, once per
training row and memory-mapped from the work directory (``TeacherCache``): the module-0 input hidden state and the
trunk's top-K (ids, log-probs) per position plus the log of the mass outside them. The cached loss is then the KL
between the two distributions coarsened to K + 1 bins (the K ids and "everything else"): exact for K >= vocab size
(the full distribution, equal to the on-the-fly loss), otherwise a lower bound of the full KL that matches the
student on the teacher's top K and on the tail's total mass but not on its shape. The corpus is a text file, a .jsonl ("text" or "prompt" per line), a directory of
.py / .txt / .md files or a list of strings; with ``generate_tokens`` it is only a prompt source and the heads train
on the trunk's own batched generations, generated once and cached in the work directory.

Output: the trunk's checkpoint plus the trained modules in the family's own naming (DeepSeek-style
``model.layers.{num_hidden_layers + j}.*``, declared by ``num_nextn_predict_layers``) and the recipe in config.json
under ``mlxmtp.mtp_heads``. State for resuming lives in ``OUT.train-heads/`` beside OUT: the same command continues
from its last saved step with the same result as an uninterrupted run; Ctrl-C saves the last completed step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import MLXMTPError
from .loading import load_model, load_tokenizer, read_config, resolve, weight_files
from .models import get_family

# Families whose MTP modules are DeepSeek-V3 NextN layers stored as model.layers.{L + j}, declared by
# num_nextn_predict_layers: the layout this trainer writes.
SUPPORTED = ("deepseek_v3", "glm4_moe", "minimax_m2")
# Checkpoint expert projection names per family (inverse of each family's sanitize).
EXPERT_NAMES = {"minimax_m2": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}}
# Modules to train when the config declares none: MiniMax-M2's config says num_mtp_modules: 3 (nothing published).
DEFAULT_MODULES = {"minimax_m2": 3}
TEXT_SUFFIXES = (".py", ".txt", ".md")
TRAINED_BY = "mlxmtp train-heads"
INITS = ("last-layer", "fresh", "checkpoint")


@dataclass
class Recipe:
    """Everything that determines the result; a resumed run must match it exactly."""

    modules: int = 0  # 0: what the config declares, else the family's default, else 1
    init: str = "last-layer"  # block weights from the trunk's last layer where shapes allow; "fresh"; or
    # "checkpoint": continue from the source checkpoint's own (float) MTP modules
    steps: int = 300
    batch: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    generate_tokens: int = 0  # > 0: train on this many tokens of the trunk's own generations
    gen_prompt_tokens: int = 32
    gen_new_tokens: int = 96
    gen_temperature: float = 1.0
    heldout_fraction: float = 0.05
    eval_prompts: int = 8
    eval_prompt_tokens: int = 48
    eval_tokens: int = 32
    eval_every: int = 100
    save_every: int = 50
    teacher_cache: int = 0  # 0: teacher targets on the fly; K > 0: top-K cached to disk (K >= vocab: all of it)
    dtype: str = "auto"  # dtype of the written MTP tensors: the trunk's (config torch_dtype) or float32/bfloat16/...
    corpus: str = ""  # a description of the corpus (path or digest), part of the recipe


@dataclass
class Result:
    out: Path
    steps: int
    loss: float
    heldout: dict = field(default_factory=dict)  # {"k=1": {"acceptance", "tau"}, ...} on the saved checkpoint
    log: list = field(default_factory=list)  # (step, loss, held-out acceptance at k=1 or None)


# ----------------------------------------------------------------------------------------------------- the model


def module_count(config: dict, recipe: Recipe) -> int:
    if recipe.modules:
        return recipe.modules
    return config.get("num_nextn_predict_layers") or DEFAULT_MODULES.get(config["model_type"], 1)


def attach_heads(path: Path, n: int, init: str, seed: int):
    """The frozen trunk of the checkpoint with n MTP modules to train: new ones (the checkpoint's own, if any, left
    out), or with init "checkpoint" its own."""
    config = read_config(path)
    if config["model_type"] not in SUPPORTED:
        raise MLXMTPError(f"train-heads supports {', '.join(SUPPORTED)} (DeepSeek-style MTP layers); "
                          f"{config['model_type']!r} is not supported yet")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    model = load_model(path, mtp=init == "checkpoint")
    if init == "checkpoint":
        modules = model.mtp
        if len(modules) != n:
            raise MLXMTPError(f"--init checkpoint continues {path}'s own MTP modules: it has {len(modules)}, not {n}")
        if any(hasattr(m, "scales") for x in modules for _, m in x.named_modules()):
            raise MLXMTPError(f"--init checkpoint: {path}'s MTP modules are quantized; train from a float checkpoint")
    else:
        family = get_family(config["model_type"])
        mx.random.seed(seed)
        fresh = family.Model(family.ModelArgs.from_dict({**config, "num_nextn_predict_layers": n}), num_mtp=n)
        modules = fresh.mtp
    for m in modules:  # trained and kept in float32 whatever the trunk runs in
        m.set_dtype(mx.float32)
    if init == "last-layer":
        for m in modules:
            _init_from_trunk(model, m)
    model.freeze()
    model.mtp = modules
    for m in modules:
        m.unfreeze()
    mx.eval(model.parameters())
    return model, config


def _init_from_trunk(model, module) -> None:
    """Block = a copy of the trunk's last decoder layer (same shapes, float); final norm = the trunk's; eh_proj maps
    the hidden half through unchanged, so the untrained module starts as 'one more trunk layer'."""
    last = _float_parameters(model.model.layers[-1])
    block = dict(tree_flatten(module.block.parameters()))
    if set(last) == set(block) and all(last[k].shape == block[k].shape for k in block):
        module.block.update(tree_unflatten([(k, last[k].astype(mx.float32)) for k in block]))
    H = module.eh_proj.weight.shape[0]
    w = module.eh_proj.weight
    module.eh_proj.weight = mx.concatenate([w[:, :H] * 0.1, mx.eye(H, dtype=w.dtype)], axis=1)
    if module.hidden_first:
        module.eh_proj.weight = mx.concatenate([mx.eye(H, dtype=w.dtype), w[:, H:] * 0.1], axis=1)
    module.norm.weight = model.model.norm.weight.astype(mx.float32)


NEG = -1e9  # "log 0" that keeps masked log-sum-exps and their gradients finite


def _float_parameters(layer) -> dict:
    """A layer's parameters with quantized weights (mlxmtp convert) dequantized, so a 4-bit trunk inits as a float one."""
    params = dict(tree_flatten(layer.parameters()))
    for name, m in layer.named_modules():
        if hasattr(m, "scales") and hasattr(m, "bits"):
            p = f"{name}." if name else ""
            params[p + "weight"] = mx.dequantize(m.weight, m.scales, params.pop(p + "biases", None), m.group_size,
                                                 m.bits, mode=getattr(m, "mode", "affine"))
            del params[p + "scales"]
    return params


def heads_loss(model, hidden: mx.array, tokens: mx.array, target):
    """Mean over modules of KL(p_trunk || q_j). hidden [B, T, H] (trunk), tokens [B, T]; target: the teacher's
    log-distributions [B, T, V] (on the fly), or cached top-K (ids [B, T, K], log-probs [B, T, K], log tail mass
    [B, T]) for the KL over K + 1 bins (module doc)."""
    T = tokens.shape[1]
    h, kls = hidden, []
    for j in range(model.num_mtp_modules):
        rows = T - j - 1  # rows i whose token t[i+j+1] and target (trunk at i+j+1) exist in the window
        h, logits = model.mtp_forward(j, h[:, :rows], tokens[:, j + 1 : j + 1 + rows])
        logq = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
        at = slice(j + 1, j + 1 + rows)
        if isinstance(target, mx.array):
            p_log = target[:, at]
            kls.append((mx.exp(p_log) * (p_log - logq)).sum(-1).mean())
        else:
            kls.append(topk_kl(logq, *(t[:, at] for t in target)).mean())
    return sum(kls) / len(kls), kls


def topk_kl(logq: mx.array, ids: mx.array, p_log: mx.array, p_tail: mx.array) -> mx.array:
    """KL over the bins {ids..., everything else}: sum_k p_k (log p_k - log q_k) + r (log r - log q_rest)."""
    q_log = mx.take_along_axis(logq, ids, axis=-1)
    inside = mx.put_along_axis(mx.zeros(logq.shape, dtype=mx.bool_), ids, mx.array(True), axis=-1)
    q_tail = mx.logsumexp(mx.where(inside, NEG, logq), axis=-1)
    return (mx.exp(p_log) * (p_log - q_log)).sum(-1) + mx.exp(p_tail) * (p_tail - q_tail)


def topk_targets(logp: mx.array, k: int):
    """The teacher's top-k (ids, log-probs) and the log of the mass outside them (NEG-level when k = vocab)."""
    V = logp.shape[-1]
    ids = (mx.broadcast_to(mx.arange(V, dtype=mx.int32), logp.shape) if k >= V
           else mx.argpartition(-logp, k - 1, axis=-1)[..., :k].astype(mx.int32))
    inside = mx.put_along_axis(mx.zeros(logp.shape, dtype=mx.bool_), ids, mx.array(True), axis=-1)
    return ids, mx.take_along_axis(logp, ids, axis=-1), mx.logsumexp(mx.where(inside, NEG, logp), axis=-1)


def teacher(model, tokens: mx.array):
    """The frozen trunk's input to module 0 and its log-distributions over every next token."""
    pre, post = model.trunk(tokens)
    logits = model.lm_head(post).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.stop_gradient(model.select_hidden(pre, post)), mx.stop_gradient(logp)


# ---------------------------------------------------------------------------------------------------- the corpus


def read_corpus(corpus: Union[str, Path, Sequence[str]]) -> list[str]:
    if isinstance(corpus, (list, tuple)):
        texts = [str(t) for t in corpus]
    else:
        p = Path(corpus).expanduser()
        if not p.exists():
            raise MLXMTPError(f"corpus {p} does not exist")
        if p.is_dir():
            texts = [f.read_bytes().decode("utf-8", errors="replace")
                     for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in TEXT_SUFFIXES]
        elif p.suffix == ".jsonl":
            texts = []
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MLXMTPError(f"{p}:{n}: not JSON ({e.msg})") from None
                text = rec.get("text", rec.get("prompt")) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise MLXMTPError(f"{p}:{n}: expected an object with a \"text\" (or \"prompt\") string")
                texts.append(text)
        else:
            texts = [p.read_bytes().decode("utf-8", errors="replace")]
    texts = [t for t in texts if t]
    if not texts:
        raise MLXMTPError("the corpus is empty")
    return texts


def corpus_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", errors="replace") + b"\0")
    return h.hexdigest()[:16]


def token_streams(tokenizer, texts: list[str], heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """All documents as one token stream (EOS between documents); the last fraction of it is held out."""
    eos = min(getattr(tokenizer, "eos_token_ids", None) or [None], key=lambda t: -1 if t is None else t)
    ids = []
    for t in texts:
        ids += list(tokenizer.encode(t, verbose=False))  # long documents are fine here: windows are cut
        if eos is not None:
            ids.append(eos)
    ids = np.array(ids, dtype=np.int32)
    cut = int(len(ids) * (1 - heldout_fraction))
    return ids[:cut], ids[cut:]


def generate_corpus(model, prompts: np.ndarray, new_tokens: int, temperature: float, seed: int,
                    batch: int = 32, on_batch: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """The trunk's own continuations of the prompt rows [N, P] -> rows [N, P + new_tokens] (batched decoding)."""
    key = mx.random.key(seed)
    rows = []
    for s in range(0, len(prompts), batch):
        cache = model.make_cache()
        toks = mx.array(prompts[s : s + batch])
        logits = model(toks, cache)[:, -1]
        out = [toks]
        for _ in range(new_tokens):
            key, sub = mx.random.split(key)
            nxt = (mx.argmax(logits, axis=-1) if temperature == 0
                   else mx.random.categorical(logits.astype(mx.float32) / temperature, key=sub))[:, None]
            out.append(nxt.astype(toks.dtype))
            logits = model(out[-1], cache)[:, -1]
        rows.append(np.array(mx.concatenate(out, axis=1)))
        if on_batch:
            on_batch(len(rows[-1]))
    return np.concatenate(rows).astype(np.int32)


class Windows:
    """Training windows [B, T], a deterministic function of (seed, step): a resumed run draws the same batches."""

    def __init__(self, stream: Optional[np.ndarray], rows: Optional[np.ndarray], seq_len: int, seed: int):
        self.stream, self.rows, self.seq_len, self.seed = stream, rows, seq_len, seed
        if rows is None and (stream is None or len(stream) <= seq_len):
            raise MLXMTPError(f"the corpus has {0 if stream is None else len(stream)} training tokens; "
                              f"need more than --seq-len {seq_len}")

    def batch(self, step: int, size: int) -> tuple[mx.array, Optional[np.ndarray]]:
        """(windows, the row indices they are, or None for windows cut from the stream)."""
        rng = np.random.default_rng([self.seed, step])
        if self.rows is not None:
            idx = rng.integers(0, len(self.rows), size)
            return mx.array(self.rows[idx]), idx
        starts = rng.integers(0, len(self.stream) - self.seq_len, size)
        return mx.array(np.stack([self.stream[s : s + self.seq_len] for s in starts])), None


def stream_rows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """The stream as consecutive windows of seq_len (fixed rows, so that their teacher targets can be cached)."""
    n = len(stream) // seq_len
    if n < 1:
        raise MLXMTPError(f"the corpus has {len(stream)} training tokens; need at least --seq-len {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len)


class TeacherCache:
    """Teacher targets of every training row, computed once and memory-mapped from DIR/teacher-top{K}/: hidden.npy
    (module-0 input, float32, the trunk's dtype restored on reading), ids.npy / logp.npy (top-K per position) and
    tail.npy (log of the mass outside them). meta.json is written last: a directory without it is rebuilt."""

    NAMES = ("hidden", "ids", "logp", "tail")

    def __init__(self, directory: Path, k: int):
        self.dir, self.k = directory / f"teacher-top{k}", k

    @staticmethod
    def nbytes(rows: np.ndarray, hidden_size: int, vocab: int, k: int) -> int:
        return rows.size * (4 * hidden_size + 8 * min(k, vocab) + 4)

    def open(self, model, rows: np.ndarray, batch: int, progress: bool) -> "TeacherCache":
        if not (self.dir / "meta.json").exists():
            self._build(model, rows, batch, progress)
        meta = json.loads((self.dir / "meta.json").read_text())
        if meta["rows"] != list(rows.shape):
            raise MLXMTPError(f"{self.dir} caches {meta['rows']} rows, not {list(rows.shape)}; remove it")
        self.dtype = getattr(mx, meta["dtype"])
        self.arrays = {n: np.load(self.dir / f"{n}.npy", mmap_mode="r") for n in self.NAMES}
        return self

    def _build(self, model, rows: np.ndarray, batch: int, progress: bool) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        bar, files, dtype = _Bar(progress, len(rows), 0, "caching teacher targets"), None, None
        for s in range(0, len(rows), batch):
            hidden, logp = teacher(model, mx.array(rows[s : s + batch]))
            chunk = {"hidden": hidden.astype(mx.float32), **dict(zip(self.NAMES[1:], topk_targets(logp, self.k)))}
            mx.eval(chunk)
            if files is None:
                dtype = str(hidden.dtype).split(".")[-1]
                files = {n: np.lib.format.open_memmap(self.dir / f"{n}.npy", mode="w+", dtype=np.dtype(str(a.dtype).split(".")[-1]),
                                                      shape=(len(rows), *a.shape[1:])) for n, a in chunk.items()}
            for n, a in chunk.items():
                files[n][s : s + len(a)] = np.array(a)
            for _ in range(len(hidden)):
                bar.advance(None, None)
        bar.close()
        for f in files.values():
            f.flush()
        (self.dir / "meta.json").write_text(json.dumps({"rows": list(rows.shape), "top": self.k, "dtype": dtype}))

    def batch(self, idx: np.ndarray):
        """(hidden [B, T, H] in the trunk's dtype, (ids, log-probs, log tail mass)) for rows idx."""
        a = {n: mx.array(np.asarray(self.arrays[n][idx])) for n in self.NAMES}
        return a["hidden"].astype(self.dtype), (a["ids"], a["logp"], a["tail"])


def heldout_prompts(tokenizer, held: np.ndarray, n: int, length: int) -> list[str]:
    """n prompts of `length` tokens, evenly spaced over the held-out stream, as text (as a user would pass them)."""
    if len(held) < length + 1 or n < 1:
        return []
    starts = np.linspace(0, len(held) - length - 1, n).astype(int)
    return [tokenizer.decode([int(t) for t in held[s : s + length]]) for s in starts]


def measure_acceptance(model, tokenizer, prompts: Sequence[str], max_tokens: int, k: int) -> dict:
    """Greedy held-out acceptance through the public API (the drafter a user runs), prompts encoded as bench
    encodes raw prompts."""
    from .bench import encode
    from .generation import generate

    drafted = accepted = passes = 0
    for p in prompts:
        ids, _ = encode(tokenizer, {"prompt": p, "raw": True}, None)
        s = generate(model, tokenizer, ids, max_tokens=max_tokens, draft_tokens=k).stats
        drafted, accepted, passes = drafted + s.drafted, accepted + s.accepted, passes + s.target_forwards
    return {"acceptance": accepted / drafted if drafted else 0.0, "tau": 1 + accepted / passes if passes else 1.0,
            "drafted": drafted, "accepted": accepted, "verify_passes": passes}


# ------------------------------------------------------------------------------------------ memory, state, output


def memory_needed(path: Path, config: dict, recipe: Recipe, n: int) -> int:
    """Trunk weights as loaded + MTP parameters with gradients and Adam moments (float32) + the activations of
    one step (teacher and student log-probabilities dominate)."""
    from .inspection import estimate_memory

    trunk = estimate_memory(path)["weights_bytes"]
    H, V, L = config["hidden_size"], config["vocab_size"], max(config["num_hidden_layers"], 1)
    per_module = trunk / L  # one decoder layer plus its share; generous for MoE layers
    tokens = recipe.batch * max(recipe.seq_len, recipe.gen_prompt_tokens + recipe.gen_new_tokens)
    activations = tokens * V * 4 * (3 + 3 * n) + tokens * H * 4 * 40 * (1 + n)
    return int(trunk + 4 * per_module * n * (4 / 2) + activations)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


class State:
    """The work directory (OUT.train-heads/ by default): recipe.json, generations.npy (cached corpus), state.safetensors + state.json (last step)."""

    def __init__(self, directory: Path):
        self.dir = directory

    def open(self, recipe: Recipe) -> Optional[dict]:
        """Create the directory for this recipe, or return the saved state of an earlier run of the same recipe."""
        self.dir.mkdir(parents=True, exist_ok=True)
        f = self.dir / "recipe.json"
        mine = asdict(recipe)
        if f.exists():
            theirs = json.loads(f.read_text())
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise MLXMTPError(f"{self.dir} holds a run with a different recipe ({', '.join(diff)}); "
                                  "remove it, or run with the same options to resume it")
        else:
            _atomic_write(f, lambda p: p.write_text(json.dumps(mine, indent=2) + "\n"))
        if (self.dir / "state.json").exists() and (self.dir / "state.safetensors").exists():
            meta = json.loads((self.dir / "state.json").read_text())
            return {**meta, "arrays": mx.load(str(self.dir / "state.safetensors"))}
        return None

    def save(self, step: int, params, opt_state, log: list) -> None:
        arrays = {f"param.{k}": v for k, v in tree_flatten(params)}
        arrays.update({f"opt.{k}": v for k, v in tree_flatten(opt_state)})
        _atomic_write(self.dir / "state.safetensors", lambda p: mx.save_safetensors(str(p), arrays))
        _atomic_write(self.dir / "state.json", lambda p: p.write_text(json.dumps({"step": step, "log": log})))

    def generations(self) -> Path:
        return self.dir / "generations.npy"


def restore(model, opt, saved: dict) -> None:
    arrays = saved["arrays"]
    model.update(tree_unflatten([(k[len("param."):], v) for k, v in arrays.items() if k.startswith("param.")]))
    opt.state = tree_unflatten([(k[len("opt."):], v) for k, v in arrays.items() if k.startswith("opt.")])
    mx.eval(model.parameters(), opt.state)


def export_heads(model, model_type: str, dtype) -> dict:
    """MTP modules -> checkpoint tensors in the family's own (DeepSeek-V3) naming; the inverse of its sanitize,
    checked by running sanitize on the result."""
    L = model.args.num_hidden_layers
    rename_expert = EXPERT_NAMES.get(model_type, {})
    out = {}
    for j, m in enumerate(model.mtp):
        p = f"model.layers.{L + j}."
        for name, v in tree_flatten(m.parameters()):
            v = v if name.endswith("e_score_correction_bias") else v.astype(dtype)
            if not name.startswith("block."):
                out[p + ("shared_head." + name if name.startswith("norm.") else name)] = v
                continue
            rest = name[len("block."):]
            e = re.match(r"(.*)\.switch_mlp\.(\w+)\.weight$", rest)
            if e:  # stacked experts [E, out, in] -> one tensor per expert
                for i in range(v.shape[0]):
                    out[f"{p}{e.group(1)}.experts.{i}.{rename_expert.get(e.group(2), e.group(2))}.weight"] = v[i]
            elif rest.endswith(".embed_q.weight"):  # MLA: embed_q + unembed_out -> kv_b_proj (deepseek_v3.py)
                attn = rest[: -len(".embed_q.weight")]
                uo = dict(tree_flatten(m.parameters()))[f"block.{attn}.unembed_out.weight"].astype(dtype)
                H, rank, nope = v.shape
                w = mx.concatenate([v.swapaxes(1, 2), uo], axis=1)  # [H, nope + v_head, rank]
                out[f"{p}{attn}.kv_b_proj.weight"] = w.reshape(-1, rank)
            elif not rest.endswith(".unembed_out.weight"):
                out[p + rest] = v
    check = model.sanitize(dict(out))
    mine = {f"mtp.{j}.{k}": v for j, m in enumerate(model.mtp) for k, v in tree_flatten(m.parameters())}
    if set(check) != set(mine) or any(not mx.array_equal(check[k], mine[k].astype(check[k].dtype)) for k in mine):
        raise MLXMTPError(f"internal error: the {model_type} MTP export does not read back through sanitize")
    model.skipped.clear()
    return out


def write_checkpoint(src: Path, out: Path, config: dict, model, heads: dict, meta: dict, force: bool) -> None:
    """Trunk files (without the source's own MTP layers) + the trained heads, written beside OUT and renamed."""
    from .convert import _move_into_place

    L, n = config["num_hidden_layers"], model.num_mtp_modules
    old_mtp = re.compile(r"^model\.layers\.(\d+)\.")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",
                                                                            "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        files = weight_files(src)
        index = None
        for f in files:
            w = mx.load(str(f))
            keep = {k: v for k, v in w.items() if not ((m := old_mtp.match(k)) and int(m.group(1)) >= L)}
            if len(keep) == len(w) and len(files) > 1:
                shutil.copy2(f, tmp / f.name)
            else:
                if len(files) == 1:
                    keep.update(heads)
                mx.save_safetensors(str(tmp / f.name), keep, metadata={"format": "mlx"})
            if len(files) > 1:
                index = index or {"metadata": {}, "weight_map": {}}
                index["weight_map"].update({k: f.name for k in keep})
        if index is not None:
            mx.save_safetensors(str(tmp / "model-mtp.safetensors"), heads, metadata={"format": "mlx"})
            index["weight_map"].update({k: "model-mtp.safetensors" for k in heads})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        cfg = {**config, "num_nextn_predict_layers": n}
        cfg["mlxmtp"] = {**config.get("mlxmtp", {}), "mtp_modules": n, "mtp_heads": meta}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------------ training


def _schedule(recipe: Recipe):
    warm = max(1, min(recipe.warmup, recipe.steps))
    decay = optim.cosine_decay(recipe.lr, max(recipe.steps - warm, 1), recipe.lr * 0.1)
    return optim.join_schedules([optim.linear_schedule(recipe.lr / warm, recipe.lr, warm), decay], [warm])


def train_heads(model_path: Union[str, Path], out: Union[str, Path], corpus: Union[str, Path, Sequence[str]],
                recipe: Optional[Recipe] = None, *, force: bool = False, force_load: bool = False,
                progress: bool = False, on_step: Optional[Callable[[int, float], None]] = None,
                work_dir: Optional[Union[str, Path]] = None) -> Result:
    """Train MTP heads for the trunk at model_path on corpus and write the checkpoint to out (see module doc).

    on_step(step, loss) is called after every completed step (tests use it to interrupt a run). KeyboardInterrupt
    saves the last completed step in the work directory (default OUT.train-heads/ beside OUT) and propagates; the
    same call again resumes from there.
    """
    from .inspection import memory_budget

    recipe = recipe or Recipe()
    if recipe.steps < 1 or recipe.batch < 1 or recipe.seq_len < 4:
        raise ValueError("steps and batch must be >= 1 and seq_len >= 4")
    src, out = resolve(model_path), Path(out).expanduser()
    if out.exists() and not force:
        raise MLXMTPError(f"{out} exists; pass --force to replace it")
    texts = read_corpus(corpus)
    config = read_config(src)
    n = module_count(config, recipe)
    if n < 1:
        raise ValueError("modules must be >= 1")
    recipe.modules = n
    recipe.corpus = recipe.corpus or (str(corpus) if isinstance(corpus, (str, Path)) else "") + \
        f" sha256:{corpus_digest(texts)}"
    if config["model_type"] not in SUPPORTED:
        raise MLXMTPError(f"train-heads supports {', '.join(SUPPORTED)} (DeepSeek-style MTP layers); "
                          f"{config['model_type']!r} is not supported yet")
    need, (budget, what) = memory_needed(src, config, recipe, n), memory_budget()
    if need > budget and not force_load:
        raise MLXMTPError(f"training needs about {need / 2**30:.1f} GB and this machine allows {budget / 2**30:.1f} GB "
                          f"({what}); lower --batch / --seq-len, or pass --force-load")

    model, config = attach_heads(src, n, recipe.init, recipe.seed)
    tokenizer = load_tokenizer(src)
    save_dtype = (getattr(mx, config.get("torch_dtype") or config.get("dtype") or "float32", mx.float32)
                  if recipe.dtype == "auto" else getattr(mx, recipe.dtype, None))
    if not isinstance(save_dtype, mx.Dtype):
        raise ValueError(f"dtype {recipe.dtype!r}: choose auto, float32, bfloat16 or float16")
    state = State(Path(work_dir) if work_dir else out.with_name(out.name + ".train-heads"))
    saved = state.open(recipe)

    train_stream, held = token_streams(tokenizer, texts, recipe.heldout_fraction)
    prompts = heldout_prompts(tokenizer, held, recipe.eval_prompts, recipe.eval_prompt_tokens)
    rows = None
    if recipe.generate_tokens > 0:
        rows = _generations(model, state, train_stream, recipe, progress)
    cache = None
    if recipe.teacher_cache > 0:
        rows = stream_rows(train_stream, recipe.seq_len) if rows is None else rows
        need = TeacherCache.nbytes(rows, config["hidden_size"], config["vocab_size"], recipe.teacher_cache)
        free = shutil.disk_usage(state.dir).free
        if need > free and not (state.dir / f"teacher-top{recipe.teacher_cache}" / "meta.json").exists():
            raise MLXMTPError(f"the teacher cache needs {need / 1e9:.1f} GB and {state.dir} has {free / 1e9:.1f} GB "
                              "free; lower --teacher-cache, or pass 0 to compute targets on the fly")
        cache = TeacherCache(state.dir, recipe.teacher_cache).open(model, rows, recipe.batch, progress)
    windows = Windows(train_stream, rows, recipe.seq_len, recipe.seed)

    opt = optim.AdamW(learning_rate=_schedule(recipe), betas=[0.9, 0.95], weight_decay=recipe.weight_decay)
    step, log = 0, []
    if saved is not None:
        opt.init(model.trainable_parameters())
        restore(model, opt, saved)
        step, log = saved["step"], saved["log"]

    grad_fn = nn.value_and_grad(model, lambda h, t, p: heads_loss(model, h, t, p)[0])
    good = (step, model.trainable_parameters(), opt.state)
    bar = _Bar(progress, recipe.steps, step)
    try:
        while step < recipe.steps:
            tokens, idx = windows.batch(step, recipe.batch)
            hidden, target = cache.batch(idx) if cache else teacher(model, tokens)
            loss, grads = grad_fn(hidden, tokens, target)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            opt.update(model, grads)
            mx.eval(loss, model.trainable_parameters(), opt.state)
            step += 1
            good = (step, model.trainable_parameters(), opt.state)
            acc = None
            if prompts and (step % recipe.eval_every == 0 or step == recipe.steps):
                acc = measure_acceptance(model, tokenizer, prompts, recipe.eval_tokens, 1)["acceptance"]
            log.append([step, round(loss.item(), 5), None if acc is None else round(acc, 4)])
            bar.advance(loss.item(), acc)
            if step % recipe.save_every == 0 and step < recipe.steps:
                state.save(step, *good[1:], log)
            if on_step:
                on_step(step, loss.item())
    except KeyboardInterrupt:
        state.save(good[0], *good[1:], [e for e in log if e[0] <= good[0]])
        bar.close()
        if progress:
            print(f"step {good[0]} saved in {state.dir}; run the same command again to resume", file=sys.stderr)
        raise
    bar.close()
    state.save(step, *good[1:], log)

    heads = export_heads(model, config["model_type"], save_dtype)
    meta = {"trained_by": TRAINED_BY, "recipe": asdict(recipe), "steps": step, "final_loss": log[-1][1] if log else None}
    write_checkpoint(src, out, config, model, heads, meta, force)
    # The reported held-out acceptance is measured on the checkpoint as written (its dtype included).
    written, tok = load_model(out), load_tokenizer(out)
    heldout = {f"k={k}": measure_acceptance(written, tok, prompts, recipe.eval_tokens, k) for k in (1, 2, 3)} \
        if prompts else {}
    meta["heldout"] = {"prompts": prompts and len(prompts), "max_tokens": recipe.eval_tokens,
                       **{k: {"acceptance": round(v["acceptance"], 4), "tau": round(v["tau"], 4)}
                          for k, v in heldout.items()}}
    cfg = json.loads((out / "config.json").read_text())
    cfg["mlxmtp"]["mtp_heads"] = meta
    _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return Result(out, step, log[-1][1] if log else float("nan"), heldout, log)


def _generations(model, state: State, stream: np.ndarray, recipe: Recipe, progress: bool) -> np.ndarray:
    """The trunk's own generations, made once per recipe and cached in the work directory."""
    f = state.generations()
    if f.exists():
        return np.load(f)
    P = recipe.gen_prompt_tokens
    n = max(1, math.ceil(recipe.generate_tokens / recipe.gen_new_tokens))
    if len(stream) <= P:
        raise MLXMTPError(f"the corpus has {len(stream)} tokens; generation prompts need {P}")
    starts = np.random.default_rng([recipe.seed, 1 << 30]).integers(0, len(stream) - P, n)
    prompts = np.stack([stream[s : s + P] for s in starts])
    bar = _Bar(progress, n, 0, "generating")
    rows = generate_corpus(model, prompts, recipe.gen_new_tokens, recipe.gen_temperature, recipe.seed,
                           on_batch=lambda b: [bar.advance(None, None) for _ in range(b)])
    bar.close()
    _atomic_write(f, lambda p: np.save(open(p, "wb"), rows))
    return rows


class _Bar:
    """rich progress on stderr: step, loss, held-out acceptance at k = 1."""

    def __init__(self, show: bool, total: int, done: int, what: str = "training heads"):
        self.p = None
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                              TimeElapsedColumn(), console=Console(stderr=True))
            self.p.start()
            self.task = self.p.add_task("", total=total, completed=done)
        self.acc = None

    def advance(self, loss, acc) -> None:
        if self.p is None:
            return
        self.acc = acc if acc is not None else self.acc
        desc = "" if loss is None else f"loss {loss:.4f}" + (f" | held-out acceptance {self.acc:.1%}"
                                                             if self.acc is not None else "")
        self.p.update(self.task, advance=1, description=desc)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
            self.p = None
