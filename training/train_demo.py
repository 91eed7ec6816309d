#!/usr/bin/env python
"""Train mlxmtp's bundled demo model: a tiny DeepSeek-V3 (MLA + MoE) with one trained MTP module.

The corpus is the Python standard library of the running interpreter (~5% of the files are held out, by a
hash of their path, and listed in ``heldout_files.txt``). The trunk is ``transformers.DeepseekV3ForCausalLM``;
the MTP module is DeepSeek-V3's NextN layer (arXiv 2412.19437, Sec. 2.2), stored as ``model.layers.{N}`` with
N = num_hidden_layers, exactly as in deepseek-ai/DeepSeek-V3's checkpoint.

MTP contract with the runtime, for every position i of a sequence t (absolute positions, starting at 0):
    h[i]  = trunk hidden state after the final norm (``model.norm``)
    e[i]  = Emb(t[i+1]), zeroed when i == 0 (vLLM's convention)
    x[i]  = eh_proj(concat([enorm(e[i]), hnorm(h[i])]))
    y     = decoder block (MLA + MoE) over x, causal, rotary position i
    logits_mtp[i] = shared_head.head(shared_head.norm(y[i]))  ->  predicts t[i+2]
Embedding and output head are shared with the trunk (paper Sec. 2.2). Stage 1 loss = CE_trunk + 0.3 * CE_mtp
(paper Sec. 2.2, lambda = 0.3). Stage 2 replaces that head by one mlxmtp train-heads distils on the frozen trunk
(distill_head); its checkpoint has no copies of embedding / head under the MTP layer (the loader never uses them).
The shipped head then had three --long-from rounds on the trunk's own greedy generations (stage 2c, --long-gen-tokens).
See training/README.md for the stages and their commands, the evaluation and the 1.84 vs 1.26 question.

    python training/train_demo.py                          # 38 min stage 1 + ~25 min stage 2 on 2 shared cores
    python training/train_demo.py --out /tmp/x --minutes 2 --head-steps 20 --head-gen-tokens 2000  # smoke run
    python training/train_demo.py --eval-only              # acceptance of the shipped model, through mlxmtp
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
    DeepseekV3TopkRouter,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "mlxmtp" / "demo_model"
EOS = "<|endoftext|>"
MTP_LAMBDA = 0.3  # DeepSeek-V3 (arXiv 2412.19437) Sec. 2.2: L = L_main + lambda * L_MTP
BIAS_GAMMA = 1e-3  # aux-loss-free balancing bias update speed (paper Sec. 2.1.2)
HELDOUT_PERCENT = 5
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MAX_BYTES = 18_000_000  # model.safetensors budget, MTP layer included


# ----------------------------------------------------------------------------------------------------- corpus


def collect_corpus(stdlib: str | None = None) -> tuple[Path, list[str], list[str]]:
    """(stdlib root, train files, held-out files): relative paths, deterministic split by sha256(path)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        files += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    files.sort()
    held = [f for f in files if int(hashlib.sha256(f.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT]
    held_set = set(held)
    return root, [f for f in files if f not in held_set], held


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def cut_pieces(text: str, rng: random.Random, every: int) -> list[str]:
    """Split text at random points, about one per `every` characters, 3 in 4 of them right after a newline.

    A prompt ends wherever the user stops typing, most often after a newline. Byte-level BPE merges a newline with
    the indentation that follows ("\n   " + " return"), so a lone "\n" token is, in uncut text, only ever followed
    by column-0 code, and a prompt that ends in a newline before an indented line is out of distribution (the
    model answers it with blank lines). Tokenizing the pieces separately teaches the model what follows a cut.
    """
    if every <= 0 or len(text) < 2:
        return [text]
    cuts = set()
    for _ in range(len(text) // every):
        c = rng.randrange(1, len(text))
        if rng.random() < 0.75:
            nl = text.find("\n", c)
            c = nl + 1 if 0 <= nl < len(text) - 1 else c
        cuts.add(c)
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


EXTERNAL_PACKAGES = ("click", "rich", "jinja2", "packaging", "huggingface_hub", "prompt_toolkit")
EXTERNAL_SUITE = "heldout_external.jsonl"


def external_suite(n_per_package: int = 2, lines: int = 3) -> list[dict]:
    """Python code from outside the standard library (never trained on): the first `lines` lines (ending in a
    newline) of the first functions of at least 10 lines in each package's modules, in sorted file order."""
    import ast
    import importlib

    items = []
    for name in EXTERNAL_PACKAGES:
        pkg = Path(importlib.import_module(name).__file__).parent
        found = 0
        for f in sorted(pkg.rglob("*.py")):
            src = read_text(f)
            try:
                tree = ast.parse(src)
            except SyntaxError:
                continue
            funcs = sorted((x for x in ast.walk(tree) if isinstance(x, (ast.FunctionDef, ast.AsyncFunctionDef))
                            and x.end_lineno - x.lineno >= 10), key=lambda x: x.lineno)
            if funcs and found < n_per_package:
                text = "".join(src.splitlines(keepends=True)[funcs[0].lineno - 1 :][:lines])
                items.append({"id": f"{name}/{f.relative_to(pkg).as_posix()}:{funcs[0].name}",
                              "category": "external_code", "prompt": text, "raw": True})
                found += 1
    return items


# -------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization), <|endoftext|> = id 0 = BOS/EOS/pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def save_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------ model


def make_config(args, vocab_size: int, eos_id: int) -> dict:
    """config.json in deepseek-ai/DeepSeek-V3's own format (rope_theta, scoring_func, topk_method, ...)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": args.hidden,
        "intermediate_size": args.dense_inter,
        "moe_intermediate_size": args.moe_inter,
        "num_hidden_layers": args.layers,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "q_lora_rank": args.q_lora_rank,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "ep_size": 1,
        "seq_aux": True,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rope_interleave": True,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }


class NextNLayer(DeepseekV3DecoderLayer):
    """DeepSeek-V3's MTP module: a full decoder block (layer_idx = N >= first_k_dense_replace, so MoE) plus
    enorm / hnorm / eh_proj / shared_head.norm. Parameter names match ``model.layers.{N}.*`` of the checkpoint."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config, layer_idx=config.num_hidden_layers)
        H, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = DeepseekV3RMSNorm(H, eps=eps)
        self.hnorm = DeepseekV3RMSNorm(H, eps=eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = DeepseekV3RMSNorm(H, eps=eps)

    def mtp_forward(self, emb_next, hidden, position_embeddings, attention_mask):
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(hidden)], dim=-1))
        y = super().forward(x, attention_mask=attention_mask, position_embeddings=position_embeddings)
        return self.shared_head.norm(y)


class DemoModel(nn.Module):
    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.lm = DeepseekV3ForCausalLM(config)
        self.mtp = NextNLayer(config)
        self.mtp.apply(self.lm._init_weights)  # same init as the trunk (normal(0, 0.02), ones for norms)

    def forward(self, ids: torch.Tensor):
        """ids [B, T] at absolute positions 0..T-1 -> trunk logits [B, T, V] (predict t[i+1]) and
        MTP logits [B, T-1, V] (position i predicts t[i+2])."""
        h = self.lm.model(input_ids=ids).last_hidden_state  # post final-norm
        return self.lm.lm_head(h), self.mtp_logits(ids, h)

    def mtp_logits(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        pos = torch.arange(T - 1, device=ids.device)[None]
        emb = self.lm.model.embed_tokens(ids[:, 1:])  # Emb(t[i+1]) for i = 0..T-2
        emb = emb * (pos != 0)[..., None].to(emb.dtype)  # zeroed at absolute position 0
        pe = self.lm.model.rotary_emb(emb, pos)
        mask = create_causal_mask(
            config=self.lm.config, inputs_embeds=emb, attention_mask=None, cache=None, position_ids=pos
        )
        y = self.mtp.mtp_forward(emb, h[:, :-1], pe, mask)
        return self.lm.lm_head(y)  # shared output head


def routers(model: DemoModel) -> list[DeepseekV3TopkRouter]:
    return [m for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]


# ---------------------------------------------------------------------------- checkpoint (DeepSeek key layout)

_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def export_state_dict(model: DemoModel) -> dict[str, torch.Tensor]:
    """transformers 5.x fuses experts into [E, 2I, H] gate_up_proj / [E, H, I] down_proj; DeepSeek's checkpoint
    has one Linear per expert. Unfuse, add the MTP layer as model.layers.{N} with its copies of embedding/head."""
    N = model.lm.config.num_hidden_layers
    named = list(model.lm.state_dict().items())
    named += [(f"model.layers.{N}.{k}", v) for k, v in model.mtp.state_dict().items()]
    sd = {}
    for k, v in named:
        m = _FUSED.match(k)
        if m is None:
            sd[k] = v
        elif m.group(2) == "gate_up_proj":
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                sd[f"{m.group(1)}.{e}.gate_proj.weight"] = v[e, :inter]
                sd[f"{m.group(1)}.{e}.up_proj.weight"] = v[e, inter:]
        else:
            for e in range(v.shape[0]):
                sd[f"{m.group(1)}.{e}.down_proj.weight"] = v[e]
    sd[f"model.layers.{N}.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
    sd[f"model.layers.{N}.shared_head.head.weight"] = sd["lm_head.weight"]
    # bf16 everywhere, except the routing bias which DeepSeek stores (and uses) in fp32
    return {
        k: v.detach().cpu().to(torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16).contiguous()
        for k, v in sorted(sd.items())
    }


def import_state_dict(model: DemoModel, sd: dict[str, torch.Tensor]) -> None:
    """Inverse of export_state_dict (strict)."""
    N = model.lm.config.num_hidden_layers
    groups: dict[tuple, dict] = {}
    plain = {}
    for k, v in sd.items():
        m = _PER_EXPERT.match(k)
        if m:
            groups.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = v.float()
        else:
            plain[k] = v.float()
    for prefix, g in groups.items():
        E = 1 + max(e for e, _ in g)
        plain[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g[e, "gate_proj"], g[e, "up_proj"]]) for e in range(E)])
        plain[f"{prefix}.down_proj"] = torch.stack([g[e, "down_proj"] for e in range(E)])
    p = f"model.layers.{N}."
    assert torch.equal(plain.pop(p + "embed_tokens.weight"), plain["model.embed_tokens.weight"])
    assert torch.equal(plain.pop(p + "shared_head.head.weight"), plain["lm_head.weight"])
    model.mtp.load_state_dict({k[len(p):]: v for k, v in plain.items() if k.startswith(p)}, strict=True)
    model.lm.load_state_dict({k: v for k, v in plain.items() if not k.startswith(p)}, strict=True)


def load_demo(model_dir: Path) -> tuple[DemoModel, Tokenizer]:
    config = DeepseekV3Config.from_pretrained(model_dir)
    model = DemoModel(config)
    import_state_dict(model, load_file(str(model_dir / "model.safetensors")))
    return model.float().eval(), Tokenizer.from_file(str(model_dir / "tokenizer.json"))


# ------------------------------------------------------------------------------------------------------- eval


def loss_terms(model: DemoModel, batch: torch.Tensor):
    """batch [B, T+1]: trunk sees t[0..T-1]; CE on t[1..T] and (MTP) on t[2..T]."""
    x = batch[:, :-1]
    logits, mtp = model(x)
    ce = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    ce_mtp = F.cross_entropy(mtp.flatten(0, 1), batch[:, 2:].flatten())
    return ce, ce_mtp


def run_eval(model_dir: Path, args) -> dict:
    """Held-out greedy acceptance measured through mlxmtp itself (the only measurement that counts: an earlier
    version of this script measured its own torch MTP on other prompts, see training/README.md), on the held-out
    stdlib suite (README) and on code from outside the standard library, plus a sample after a trailing newline."""
    import mlxmtp
    from mlxmtp.bench import read_jsonl, stdlib_code_suite
    from mlxmtp.generation import generate
    from mlxmtp.train_heads import measure_acceptance

    model, tok = mlxmtp.load(model_dir)
    suites = {"stdlib": [i["prompt"] for i in stdlib_code_suite(model_dir / "heldout_files.txt", n=12)],
              "external": [i["prompt"] for i in read_jsonl(model_dir / EXTERNAL_SUITE)]}
    t0, res = time.time(), {}
    for name, prompts in suites.items():
        for k in (1, 2, 3):
            m = measure_acceptance(model, tok, prompts, args.gen_tokens, k)
            res[f"{name} k={k}"] = {"acceptance": round(m["acceptance"], 4), "tau": round(m["tau"], 4)}
    print(f"eval through mlxmtp ({time.time() - t0:.0f}s, greedy, {args.gen_tokens} tokens): {json.dumps(res)}")
    for name in suites:
        p = suites[name][0]
        print(f"sample ({name}):\n{p}|||{generate(model, tok, p, max_tokens=64, draft_tokens=1).text}", flush=True)
    return res


# ----------------------------------------------------------------------------------------------------- verify


@torch.no_grad()
def verify_export(model: DemoModel, out: Path, batch: torch.Tensor) -> None:
    """The written directory must load with stock transformers and reproduce the (bf16-rounded) trained model."""
    ref = copy.deepcopy(model).cpu().float().eval()
    for name, t in ref.state_dict().items():  # exactly what gets stored (not e.g. rotary inv_freq buffers)
        if not name.endswith("e_score_correction_bias"):
            t.copy_(t.bfloat16().float())
    ref_logits, ref_mtp = ref(batch)

    hf, info = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    N = model.lm.config.num_hidden_layers
    assert all(k.startswith(f"model.layers.{N}.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    d_trunk = (hf.eval()(input_ids=batch).logits - ref_logits).abs().max().item()

    mine, _ = load_demo(out)
    _, mtp = mine(batch)
    d_mtp = (mtp - ref_mtp).abs().max().item()
    print(f"verify: from_pretrained trunk logits max|diff| = {d_trunk:.2e}; MTP reload max|diff| = {d_mtp:.2e}; "
          f"{len(info['unexpected_keys'])} MTP keys ignored by from_pretrained", flush=True)
    assert d_trunk < 1e-4 and d_mtp < 1e-4

    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out)
    sample = "def f(x):\n    return x  # héllo\n"
    assert hf_tok(sample)["input_ids"] == Tokenizer.from_file(str(out / "tokenizer.json")).encode(sample).ids
    assert hf_tok.decode(hf_tok(sample)["input_ids"]) == sample and hf_tok.eos_token == EOS


# ------------------------------------------------------------------------------------------------------ train


def train(args) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out).resolve()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    root, train_files, held = collect_corpus(args.stdlib)
    texts = [read_text(root / f) for f in train_files]
    print(f"corpus: {root} -> {len(train_files)} train / {len(held)} held-out files, "
          f"{sum(map(len, texts)) / 1e6:.1f}M chars", flush=True)
    t0 = time.time()
    tok = train_tokenizer(texts, args.vocab)
    eos = tok.token_to_id(EOS)
    cut_rng = random.Random(args.seed)
    docs = [cut_pieces(t, cut_rng, args.cut_every) for t in texts]
    encoded = iter(tok.encode_batch([p for d in docs for p in d]))
    ids = []
    for d in docs:
        for _ in d:
            ids += next(encoded).ids
        ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.int32)
    held_stream = torch.tensor(
        [i for f in held for i in tok.encode(read_text(root / f)).ids + [eos]], dtype=torch.int32
    )
    print(f"tokenizer: vocab {tok.get_vocab_size()}, {len(stream) / 1e6:.2f}M train tokens "
          f"({sum(map(len, texts)) / len(stream):.2f} chars/token), {time.time() - t0:.0f}s", flush=True)

    cfg_dict = make_config(args, tok.get_vocab_size(), eos)
    config = DeepseekV3Config(**cfg_dict)
    model = DemoModel(config)
    dev = torch.device(args.device)
    if dev.type == "cuda":  # fp32 weights + TF32 matmuls; HF's grouped_mm experts want bf16 on CUDA, so use eager
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model.lm.set_experts_implementation("eager")
        assert model.mtp.mlp.experts.config._experts_implementation == "eager"
    model.to(dev)
    n_bytes = sum(v.numel() * v.element_size() for v in export_state_dict(model).values())
    n_params = sum(v.numel() for v in export_state_dict(model).values())
    print(f"model: {n_params / 1e6:.2f}M stored params ({n_bytes / 1e6:.2f} MB bf16, MTP copies included), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M trainable", flush=True)
    assert n_bytes <= MAX_BYTES, f"checkpoint would be {n_bytes / 1e6:.1f} MB > {MAX_BYTES / 1e6} MB"

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "gate.weight" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    # expert loads for the aux-loss-free bias update (paper Sec. 2.1.2): count top-k selections per router
    loads = {}
    for r in routers(model):
        r.register_forward_hook(lambda mod, _in, outp: loads.__setitem__(mod, torch.bincount(
            outp[2].flatten(), minlength=mod.num_experts)) if mod.training else None)

    gen = torch.Generator().manual_seed(args.seed)
    L = args.seq_len + 1
    budget = args.minutes * 60
    model.train()
    t_start, step, log = time.time(), 0, []
    while True:
        progress = max(step / args.steps if args.steps else 0.0, (time.time() - t_start) / budget)
        if progress >= 1.0:
            break
        # linear warmup, cosine decay to 10% (by steps when --steps is given, else by wall clock)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(stream) - L, (args.batch,), generator=gen)
        batch = torch.stack([stream[s : s + L] for s in starts.tolist()]).long().to(dev, non_blocking=True)
        ce, ce_mtp = loss_terms(model, batch)
        loss = ce + MTP_LAMBDA * ce_mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        with torch.no_grad():
            for r, c in loads.items():
                r.e_score_correction_bias += BIAS_GAMMA * torch.sign(c.float().mean() - c.float())
        step += 1
        log.append((ce.item(), ce_mtp.item()))
        if step % args.log_every == 0 or step == 1:
            k = log[-args.log_every :]
            el = time.time() - t_start
            print(f"step {step:5d} | {el / 60:5.1f} min | lr {lr:.2e} | loss {sum(a for a, _ in k) / len(k):.4f} "
                  f"| mtp {sum(b for _, b in k) / len(k):.4f} | gnorm {gnorm:.2f} "
                  f"| {step * args.batch * args.seq_len / el:.0f} tok/s", flush=True)
    elapsed = time.time() - t_start
    k = log[-args.log_every :]
    print(f"trained {step} steps ({step * args.batch * args.seq_len / 1e6:.2f}M tokens, "
          f"{step * args.batch * args.seq_len / len(stream):.2f} epochs) in {elapsed / 60:.1f} min; "
          f"final loss {sum(a for a, _ in k) / len(k):.4f}, mtp {sum(b for _, b in k) / len(k):.4f}", flush=True)
    model.eval()
    biases = torch.stack([r.e_score_correction_bias for r in routers(model)])
    print(f"routing bias range [{biases.min():.3f}, {biases.max():.3f}]", flush=True)

    # ---- write the checkpoint (DeepSeek key layout) + tokenizer + metadata into tmp, verify, rename
    save_file(export_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    gen_cfg = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    save_tokenizer(tok, tmp, cfg_dict["max_position_embeddings"])
    (tmp / "heldout_files.txt").write_text("\n".join(held) + "\n")
    (tmp / EXTERNAL_SUITE).write_text("".join(json.dumps(i) + "\n" for i in external_suite()))
    verify_export(model, tmp, held_stream[: 2 * L].long().view(2, L)[:, :-1])
    if args.head_steps:
        distill_head(tmp, out, texts, args)
        shutil.rmtree(tmp)
    else:
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.2f} MB): {sorted(f.name for f in out.iterdir())}", flush=True)
    run_eval(out, args)


def distill_head(trunk_dir: Path, out: Path, texts: list[str], args) -> None:
    """Stage 2: the MTP head is retrained on the frozen trunk by mlxmtp train-heads (KL to the trunk's own
    next-next-token distribution, on the trunk's own generations prompted from the training files), replacing the
    head trained jointly with the trunk: 2a on short rows (32 + 96 tokens) from the trunk's last layer, then 2b
    (--long-steps, --long-rounds) continues that head on rows as long as the held-out stdlib prompts plus their
    continuation (up to ~490 tokens): a head trained on 128-token rows never saw rotary positions past 127
    (training/README.md)."""
    if not args.long_steps:
        return distill_phase(trunk_dir, out, texts, args, "short")
    mid = out.parent / f".{out.name}.stage2a-{os.getpid()}"
    try:
        distill_phase(trunk_dir, mid, texts, args, "short")
        long_rounds(mid, out, texts, args)
    finally:
        shutil.rmtree(mid, ignore_errors=True)


def long_rounds(src: Path, out: Path, texts: list[str], args) -> None:
    """Stage 2b: --long-rounds train-heads runs, each continuing the previous head (fresh windows: seed + round)."""
    for r in range(args.long_rounds):
        dst = out if r == args.long_rounds - 1 else out.parent / f".{out.name}.stage2b-{r}-{os.getpid()}"
        distill_phase(src, dst, texts, args, "long", r)
        if r:
            shutil.rmtree(src, ignore_errors=True)
        src = dst


def distill_phase(src: Path, out: Path, texts: list[str], args, phase: str, round: int = 0) -> None:
    """One train-heads run of stage 2 ("short": 2a, "long": 2b round `round`). Work files (cached generations,
    resumable state) go to --head-work/<phase><round>."""
    from mlxmtp.train_heads import Recipe, train_heads

    if phase == "short":
        init, P, G, steps, batch, gen = "last-layer", 32, 96, args.head_steps, args.head_batch, args.head_gen_tokens
    else:
        init, P, G, steps, batch, gen = ("checkpoint", args.long_prompt_tokens, args.long_new_tokens, args.long_steps,
                                         args.long_batch, args.long_gen_tokens)
    recipe = Recipe(modules=1, init=init, steps=steps, batch=batch, seq_len=P + G, lr=args.head_lr, warmup=20,
                    seed=args.seed + round, generate_tokens=gen, gen_prompt_tokens=P, gen_new_tokens=G,
                    gen_temperature=args.head_gen_temperature, eval_prompt_tokens=min(P + 16, 384),
                    eval_every=100 if phase == "short" else steps, save_every=50 if phase == "short" else 25,
                    dtype="bfloat16")
    work = Path(args.head_work or Path(tempfile.gettempdir()) / f"mlxmtp-{Path(args.out).name}.train-heads") / f"{phase}{round or ''}"
    t0 = time.time()

    def on_step(step: int, loss: float) -> None:
        if step % recipe.save_every == 0:
            print(f"head step {step} | {(time.time() - t0) / 60:.1f} min | KL {loss:.4f}", flush=True)
            if args.head_snapshots and step < recipe.steps:  # the state just saved: acceptance vs training time
                Path(args.head_snapshots).mkdir(parents=True, exist_ok=True)
                shutil.copy(work / "state.safetensors", Path(args.head_snapshots) / f"{phase}{round or ''}-step{step}.safetensors")

    r = train_heads(src, out, texts, recipe, force=True, progress=sys.stderr.isatty(), work_dir=work,
                    on_step=on_step)
    print(f"head ({phase}{round or ''}): {r.steps} steps in {(time.time() - t0) / 60:.1f} min (generations included); trainer's "
          f"held-out estimate {json.dumps(r.heldout)}", flush=True)
    if init == "checkpoint":
        record_chain(src, out)


def record_chain(src: Path, out: Path) -> None:
    """config.json's mtp_heads.chain in OUT: the train-heads runs the head of SRC came from (its own chain, then SRC's
    run), oldest first, so that the recipe of every round is on record and not only the last run's."""
    prev = json.loads((src / "config.json").read_text())["mlxmtp"]["mtp_heads"]
    chain = prev.pop("chain", []) + [prev]
    cfg = json.loads((out / "config.json").read_text())
    cfg["mlxmtp"]["mtp_heads"]["chain"] = chain
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint dir (default: the package's demo_model)")
    ap.add_argument("--minutes", type=float, default=38.0, help="wall-clock training budget")
    ap.add_argument("--steps", type=int, default=0, help="step budget (0: time only); first budget hit wins")
    ap.add_argument("--eval-only", action="store_true", help="only measure held-out MTP acceptance of --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="training device (cpu, cuda); export and eval run on CPU")
    ap.add_argument("--stdlib", default=None, help="stdlib dir to use as corpus (default: this interpreter's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dense-inter", type=int, default=768)
    ap.add_argument("--moe-inter", type=int, default=96)
    ap.add_argument("--q-lora-rank", type=int, default=128)
    ap.add_argument("--kv-lora-rank", type=int, default=128)
    ap.add_argument("--qk-nope-head-dim", type=int, default=64)
    ap.add_argument("--qk-rope-head-dim", type=int, default=32)
    ap.add_argument("--v-head-dim", type=int, default=64)
    ap.add_argument("--cut-every", type=int, default=400,
                    help="tokenize the corpus in pieces cut about every N characters (0: no cuts), see cut_pieces")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--gen-tokens", type=int, default=48, help="tokens generated per eval prompt")
    ap.add_argument("--head-steps", type=int, default=400, help="stage 2 (train-heads) steps; 0: ship the joint head")
    ap.add_argument("--head-batch", type=int, default=16)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--head-gen-tokens", type=int, default=100_000, help="trunk generations the head trains on")
    ap.add_argument("--long-steps", type=int, default=100, help="stage 2b steps (0: ship the stage 2a head)")
    ap.add_argument("--long-rounds", type=int, default=2, help="stage 2b runs, each continuing the last")
    ap.add_argument("--long-batch", type=int, default=4)
    ap.add_argument("--long-gen-tokens", type=int, default=0,
                    help="stage 2b: trunk generations (tokens); 0: windows of the training files themselves")
    ap.add_argument("--long-prompt-tokens", type=int, default=384, help="stage 2b: corpus tokens before each")
    ap.add_argument("--long-new-tokens", type=int, default=128, help="stage 2b: tokens generated per row")
    ap.add_argument("--head-gen-temperature", type=float, default=0.5)
    ap.add_argument("--head-work", default=None, help="train-heads work dir (default: in the temp dir)")
    ap.add_argument("--head-snapshots", default=None, metavar="DIR",
                    help="keep a copy of the head's state every 50 steps here (acceptance vs training time)")
    ap.add_argument("--heads-from", default=None, metavar="DIR",
                    help="skip stage 1: distill a new head onto the trunk in DIR (a checkpoint this script wrote)")
    ap.add_argument("--long-from", default=None, metavar="DIR",
                    help="stage 2b alone: continue the stage-2a head of DIR (e.g. the demo of commit 82b23c1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.eval_only:
        run_eval(Path(args.out).resolve(), args)
    elif args.long_from:
        root, train_files, _ = collect_corpus(args.stdlib)
        long_rounds(Path(args.long_from), Path(args.out).resolve(), [read_text(root / f) for f in train_files], args)
        run_eval(Path(args.out).resolve(), args)
    elif args.heads_from:
        root, train_files, _ = collect_corpus(args.stdlib)
        distill_head(Path(args.heads_from), Path(args.out).resolve(), [read_text(root / f) for f in train_files], args)
        run_eval(Path(args.out).resolve(), args)
    else:
        train(args)


if __name__ == "__main__":
    sys.exit(main())
