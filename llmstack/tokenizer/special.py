"""The special (control) tokens every llmstack tokenizer reserves from the first training run.

They are reserved now, before any stage uses them, so that the pretrained model's embedding
table already has rows for the chat, tool-use and padding tokens that later stages (assistant
fine-tuning, tool use, RL, serving) need: adding ids after pretraining would mean resizing the
embedding and the output head of a trained model.

In a trained tokenizer they take the ids right after the mergeable (BPE) ranks, in the order of
``SPECIAL_TOKENS``: ``<|bos|>`` is ``n_ranks``, ``<|pad|>`` is ``n_ranks + 11``, and so on.
Never reorder or remove entries: ids are part of every checkpoint. Use a ``<|reserved_N|>`` slot
(and rename it in a new tokenizer version) when a new control token is needed.
"""

from __future__ import annotations

BOS = "<|bos|>"
"""Document boundary: every document starts with it (also the separator in packed sequences)."""

SYSTEM_START = "<|system_start|>"
SYSTEM_END = "<|system_end|>"
USER_START = "<|user_start|>"
USER_END = "<|user_end|>"
ASSISTANT_START = "<|assistant_start|>"
ASSISTANT_END = "<|assistant_end|>"
TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"
TOOL_RESULT_START = "<|tool_result_start|>"
TOOL_RESULT_END = "<|tool_result_end|>"
PAD = "<|pad|>"
"""Padding for batched inference; never a training target."""

RESERVED = tuple(f"<|reserved_{i}|>" for i in range(4))
"""Spare slots so a new control token never forces a change of vocabulary size."""

SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    SYSTEM_START,
    SYSTEM_END,
    USER_START,
    USER_END,
    ASSISTANT_START,
    ASSISTANT_END,
    TOOL_CALL_START,
    TOOL_CALL_END,
    TOOL_RESULT_START,
    TOOL_RESULT_END,
    PAD,
    *RESERVED,
)

assert len(SPECIAL_TOKENS) == 16 and len(set(SPECIAL_TOKENS)) == 16


def special_token_ids(n_ranks: int) -> dict[str, int]:
    """The llmstack specials numbered after ``n_ranks`` mergeable ranks (the trained layout)."""
    return {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}


# Our chat format in Jinja, for Hugging Face ``apply_chat_template`` and every template-driven tool
# (``llmstack/chat/conversation.py`` renders the same layout to ids with a loss mask).
CHAT_TEMPLATE = (
    "{{- '" + BOS + "' -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- '" + SYSTEM_START + "' + m['content'] + '" + SYSTEM_END + "' -}}"
    "{%- elif m['role'] == 'user' -%}{{- '" + USER_START + "' + m['content'] + '" + USER_END + "' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '" + ASSISTANT_START + "' -}}{%- endif -%}"
    "{%- if m['content'] -%}{{- m['content'] -}}{%- endif -%}"
    "{%- if m.get('tool_calls') -%}{%- for c in m['tool_calls'] -%}"
    "{%- set f = c['function'] if 'function' in c else c -%}"
    "{{- '" + TOOL_CALL_START + "' + f['name'] + ': ' + f['arguments'] + '" + TOOL_CALL_END + "' -}}"
    "{%- endfor -%}{%- else -%}{{- '" + ASSISTANT_END + "' -}}{%- endif -%}"
    "{%- elif m['role'] == 'tool' -%}{{- '" + TOOL_RESULT_START + "' + m['content'] + '" + TOOL_RESULT_END + "' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and (not messages or messages[-1]['role'] != 'tool') -%}"
    "{{- '" + ASSISTANT_START + "' -}}{%- endif -%}"
)
