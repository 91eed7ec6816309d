"""What every model family provides, and the pieces of the MTP path that are the same for all of them.

A family subclasses ``MTPModel`` and implements:

    embed(tokens)              -> [B, L, H] token embeddings
    trunk(tokens, cache)       -> (pre_norm, post_norm) hidden states of the last trunk layer, [B, L, H] each
    lm_head(post_norm)         -> logits [B, L, V]
    make_cache()               -> one cache per trunk layer (mlxmtp.cache)
    make_mtp_cache()           -> one cache per MTP module
    sanitize(weights)          -> checkpoint tensors renamed to this module's parameter names; tensors that are
                                  deliberately not used (duplicated embeddings/heads, vision towers) are removed
                                  and recorded with ``self.skip(reason, names)``
    self.mtp                   -> list of MTPModule (empty when loaded without MTP)

and sets the class attributes below where the family's convention differs from the default.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn

from ..errors import CheckpointError


@dataclass
class BaseArgs:
    """Dataclass base for a family's config: built from config.json, ignoring keys the family does not use."""

    @classmethod
    def from_dict(cls, config: dict):
        params = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in params})


class MTPModel(nn.Module):
    # Which trunk hidden state feeds MTP module 0, and which output of a module feeds the next draft step:
    # "post" (after the final norm; vLLM/SGLang for DeepSeek, GLM, Qwen, MiMo) or "pre" (Step-3.5).
    mtp_hidden: str = "post"
    # vLLM / SGLang zero the token embedding at absolute position 0 (the first MTP position has no predecessor).
    zero_first_embedding: bool = True
    # Set by a family whose checkpoints carry no MTP weights at all (MiniMax-M2): the one-line warning to print.
    no_mtp_reason: str = ""
    # Parameter name suffixes kept in float32 whatever dtype the rest is loaded in (router biases, decay rates).
    float32_params: tuple = ()

    def __init__(self):
        super().__init__()
        self.mtp = []
        self.skipped: dict[str, list[str]] = {}

    # --- shared ---------------------------------------------------------------------------------------------------
    # The standard layout (``self.model.embed_tokens / layers / norm`` and ``lm_head``, tied when the config says
    # so); a family with another layout overrides these.
    def embed(self, tokens: mx.array) -> mx.array:
        return self.model.embed_tokens(tokens)

    def trunk(self, tokens: mx.array, cache=None):
        h = self.embed(tokens)
        for layer, c in zip(self.model.layers, cache or [None] * len(self.model.layers)):
            h = layer(h, cache=c)
        return h, self.model.norm(h)

    def lm_head(self, hidden: mx.array) -> mx.array:
        if getattr(self.args, "tie_word_embeddings", False):
            return self.model.embed_tokens.as_linear(hidden)
        return self["lm_head"](hidden)

    @property
    def num_mtp_modules(self) -> int:
        return len(self.mtp)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        """Trunk logits [B, L, V] for tokens [B, L] (a full causal pass, or a continuation through ``cache``)."""
        return self.lm_head(self.trunk(tokens, cache)[1])

    def select_hidden(self, pre: mx.array, post: mx.array) -> mx.array:
        return post if self.mtp_hidden == "post" else pre

    def mtp_forward(self, j: int, hidden: mx.array, tokens: mx.array, cache=None):
        """Run MTP module j over L consecutive positions.

        hidden: [B, L, H] the state fed to the module at positions i (trunk hidden, or the previous module's / the
        previous draft step's output); tokens: [B, L] the tokens t[i+1] whose embeddings are combined with it.
        Returns (hidden_out, logits): hidden_out is what feeds the next module or draft step.
        """
        module = self.mtp[j]
        emb = self.embed(tokens)
        start = cache.offset if cache is not None else 0
        if self.zero_first_embedding and start == 0:
            emb = mx.concatenate([mx.zeros_like(emb[:, :1]), emb[:, 1:]], axis=1)
        pre, post = module(emb, hidden, cache)
        logits = module.head(post) if module.has_own_head else self.lm_head(post)
        return self.select_hidden(pre, post), logits

    def skip(self, reason: str, names: Iterable[str]) -> None:
        """Record checkpoint tensors deliberately left unused (loading reports them; strictness ignores them)."""
        names = list(names)
        if names:
            self.skipped.setdefault(reason, []).extend(names)


def pop_prefix(weights: dict, prefix: str) -> list[str]:
    """Remove every tensor whose name starts with prefix; return the removed names."""
    names = [k for k in weights if k.startswith(prefix)]
    for k in names:
        del weights[k]
    return names


def rename_prefix(weights: dict, old: str, new: str) -> dict:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in weights.items()}


def stack_experts(weights: dict, prefix: str, n_experts: int, projs=("gate_proj", "up_proj", "down_proj"),
                  dst: str = "switch_mlp") -> None:
    """Per-expert tensors ``{prefix}.experts.{e}.{proj}.weight`` -> ``{prefix}.{dst}.{proj}.weight`` [E, out, in]
    (the layout of mlx-lm's SwitchGLU). Leaves the weights untouched when the experts are absent; an incomplete
    or misshaped set is a CheckpointError that names the tensor."""
    for proj in projs:
        names = [f"{prefix}.experts.{e}.{proj}.weight" for e in range(n_experts)]
        if not any(n in weights for n in names):
            continue
        missing = [n for n in names if n not in weights]
        if missing:
            raise CheckpointError(f"missing tensor {missing[0]!r} ({len(missing)} of {n_experts} experts absent)")
        shapes = [tuple(weights[n].shape) for n in names]
        common = max(set(shapes), key=shapes.count)
        odd = next((i for i, s in enumerate(shapes) if s != common), None)
        if odd is not None:
            raise CheckpointError(f"tensor {names[odd]!r} has shape {shapes[odd]}, expected {common} "
                                  "(as the other experts)")
        weights[f"{prefix}.{dst}.{proj}.weight"] = mx.stack([weights.pop(n) for n in names])
