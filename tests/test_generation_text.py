"""The reply's text is exactly the continuation of the prompt's: tokenizer.decode(prompt + reply) minus
tokenizer.decode(prompt). (mlx-lm's BPE streaming detokenizer dropped a reply's leading space.)"""

import pytest

import mlxmtp
from mlxmtp.generation import ContinuationText


@pytest.fixture(scope="module")
def demo():
    return mlxmtp.load()


def continuation(tok, prompt_ids, reply):
    return tok.decode(prompt_ids + reply)[len(tok.decode(prompt_ids)):]


def test_reply_text_is_the_prompts_continuation(demo):
    model, tok = demo
    leading_space = 0
    for prompt in ["class A:\n    def f(self):\n        return", "x = 1", "def f(a, b):\n    return a +"]:
        res = mlxmtp.generate(model, tok, prompt, max_tokens=16, draft_tokens=0)
        want = continuation(tok, tok.encode(prompt), res.tokens)
        assert res.text == want
        streamed = "".join(i.text for i in mlxmtp.stream_generate(model, tok, prompt, max_tokens=16, draft_tokens=0))
        assert streamed == want
        leading_space += want.startswith(" ")
    assert leading_space  # the case the streaming detokenizer got wrong is among them


def test_incomplete_utf8_waits_for_its_bytes(demo):
    _, tok = demo
    ids = tok.encode("s = 'caf\u00e9 \u4e2d\u6587'")
    for cut in range(1, len(ids)):
        text = ContinuationText(tok, ids[:cut])
        for t in ids[cut:]:
            text.add_token(t)
            assert "\ufffd" not in text.text
        text.finalize()
        assert text.text == continuation(tok, ids[:cut], ids[cut:])
