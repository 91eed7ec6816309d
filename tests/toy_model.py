"""A tiny attention-only MTPModel with a few-token vocabulary, for tests of the engine's logic (sampling exactness
needs a vocabulary small enough to enumerate), and a self-drafting wrapper whose MTP modules are the trunk itself."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn

from mlxmtp.cache import KVCache, cache_arrays
from mlxmtp.models.base import MTPModel
from mlxmtp.models.layers import MLP, Attention
from mlxmtp.models.mtp import MTPModule


class Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(hidden)
        self.self_attn = Attention(hidden, 2, 1, hidden // 2)
        self.post_attention_layernorm = nn.RMSNorm(hidden)
        self.mlp = MLP(hidden, 2 * hidden)

    def __call__(self, x, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), mask="causal" if x.shape[1] > 1 else None, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class ToyModel(MTPModel):
    def __init__(self, vocab: int = 5, hidden: int = 16, n_layers: int = 2, num_mtp: int = 1, seed: int = 0,
                 scale: float = 1.0):
        super().__init__()
        mx.random.seed(seed)
        self.args = SimpleNamespace(vocab_size=vocab, max_position_embeddings=4096)
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = [Block(hidden) for _ in range(n_layers)]
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.mtp = [MTPModule(hidden, Block(hidden), nn.RMSNorm) for _ in range(num_mtp)]
        self.head.weight = self.head.weight * scale
        mx.eval(self.parameters())

    def embed(self, tokens):
        return self.embed_tokens(tokens)

    def trunk(self, tokens, cache=None):
        h = self.embed(tokens)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, c)
        return h, self.norm(h)

    def lm_head(self, h):
        return self.head(h)

    def make_cache(self):
        return [KVCache() for _ in self.layers]

    def make_mtp_cache(self):
        return [KVCache() for _ in self.mtp]


class _TrunkAsModuleCache:
    """Trunk cache pre-fed with t[0..j], so MTP row i (token t[i+j+1]) sits at trunk position i+j+1."""

    def __init__(self, model, prefix):
        self.caches = model.make_cache()
        self.lead = len(prefix)
        mx.eval(model(mx.array([prefix]), self.caches))

    @property
    def offset(self):
        return self.caches[0].offset - self.lead

    def rollback(self, n):
        for c in self.caches:
            c.rollback(n)

    @property
    def arrays(self):
        return cache_arrays(self.caches)


class SelfDraft(MTPModel):
    """A model whose MTP module j returns the trunk's own next-token logits: the drafts are exactly the target's."""

    def __init__(self, model, prompt, num_mtp: int = 1):
        super().__init__()
        self.inner, self.prompt = model, list(prompt)
        self.args = model.args
        self.mtp = [nn.Identity() for _ in range(num_mtp)]

    def embed(self, tokens):
        return self.inner.embed(tokens)

    def trunk(self, tokens, cache=None):
        return self.inner.trunk(tokens, cache)

    def lm_head(self, h):
        return self.inner.lm_head(h)

    def make_cache(self):
        return self.inner.make_cache()

    def make_mtp_cache(self):
        return [_TrunkAsModuleCache(self.inner, self.prompt[: j + 1]) for j in range(len(self.mtp))]

    def mtp_forward(self, j, hidden, tokens, cache=None):
        logits = self.inner(tokens, cache.caches)
        return hidden, logits
