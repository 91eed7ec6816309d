"""How a conversation becomes a prompt, the same way in `mlxmtp chat` and `mlxmtp serve`.

With a chat template: the tokenizer's template over the messages, with the generation prompt for the next assistant
turn (what mlx-lm and transformers do). Without one: the messages' texts joined by a newline, so that a new message
never continues the last partial token of the reply before it; nothing follows the last message (a trailing newline
sends the bundled code model into blank lines).
"""

from __future__ import annotations

SEPARATOR = "\n"


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt for the next assistant turn after ``messages`` ({"role", "content": str})."""
    if tokenizer.has_chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer.encode(SEPARATOR.join(m["content"] for m in messages)))
