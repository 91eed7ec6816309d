"""Tiny checkpoints in the exact Hugging Face layout (config.json, safetensors with the real tensor names,
tokenizer files), made by the tests themselves since no real checkpoint can be downloaded here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

TOKENIZER_VOCAB = 256  # byte-level: every tiny test model has a vocabulary of at least this size


def write_tokenizer(path: Path, vocab_size: int = TOKENIZER_VOCAB) -> None:
    """A byte-level BPE tokenizer with no merges (ids 0..255 are bytes, EOS is id 0) that transformers'
    AutoTokenizer loads offline. vocab_size >= 256; ids past 256 exist in the model but are never produced."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = alphabet[0]
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": 4096,
    }))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))


def to_numpy(t) -> np.ndarray:
    """torch tensors (any float dtype) and numpy arrays -> float32/int numpy."""
    if hasattr(t, "detach"):
        t = t.detach()
        if t.is_floating_point():
            t = t.float()
        t = t.cpu().numpy()
    return np.ascontiguousarray(t)


def write_checkpoint(path: Path, config: dict, tensors: dict, *, shards: int = 1, tokenizer: bool = True) -> Path:
    """Write config.json and the tensors (float32) as model.safetensors, or as `shards` files with
    model.safetensors.index.json the way Hugging Face shards them."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    arrays = {k: to_numpy(v) for k, v in tensors.items()}
    names = sorted(arrays)
    if shards == 1:
        save_file(arrays, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: arrays[k] for k in names[i::shards]}
            save_file(part, str(path / fname))
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        write_tokenizer(path)
    return path
