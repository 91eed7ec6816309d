"""How a conversation becomes a prompt, the same way in `mlxmtp chat` and `mlxmtp serve`.

With a chat template: the tokenizer's template over the messages, with the generation prompt for the next assistant
turn (what mlx-lm and transformers do). Without one (plain continuation): each reply continues the text before it,
as it was generated, and every other message starts on a new line, so that a new message never continues the last
partial token of the reply before it. Nothing follows the last message (a trailing newline sends the bundled code
model into blank lines). The pieces are encoded one by one: a reply's boundaries stay where they were when it was
generated, so the next turn's prompt starts with the ids the last turn's decode state holds (prompt_cache.py).

A model need not generate the tokenizer's canonical encoding of its own text (a code model trained on text cut at
arbitrary points emits "\n" and "    " where the encoder merges them), so re-encoding a reply can change its ids
and end the reusable prefix at the reply's first token. A caller that generated a reply itself (chat) passes its
ids as the message's "ids"; they are used when they decode to the message's text (up to surrounding spaces). The server, which only sees
text, re-encodes (as mlx-lm's and vLLM's servers do): its output never depends on what it generated before.
"""

from __future__ import annotations

SEPARATOR = "\n"


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt for the next assistant turn after ``messages`` ({"role", "content": str}, and for
    a reply the caller generated, optionally "ids": the token ids it was generated as)."""
    if tokenizer.has_chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    ids: list[int] = []
    for m in messages:
        if not ids:  # the first piece gets the tokenizer's special tokens (a BOS), if it adds any
            ids = list(tokenizer.encode(m["content"])) if m["content"] else []
        else:
            text = m["content"] if m["role"] == "assistant" else SEPARATOR + m["content"]
            own = m.get("ids") if m["role"] == "assistant" else None
            # (stripped: the streaming detokenizer drops a continuation's leading space, mlx-lm's trim_space)
            if own and tokenizer.decode(own).strip() == text.strip():
                ids += list(own)
            else:
                ids += list(tokenizer.encode(text, add_special_tokens=False)) if text else []
    return ids
