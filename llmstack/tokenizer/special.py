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


CHAT_TEMPLATE = r"""
{#- llmstack's chat format in Jinja. Python renders the same ids: ChatFormat (llmstack/chat/conversation.py)
    on Conversation.from_openai(messages), as the server's prompts do (llmstack/serve/models.py prompt_ids).
    Tool-call arguments come as a dict (transformers' convention) or as OpenAI's JSON string: {"input": text}
    is written as the bare text, any other arguments as written (a dict as json.dumps writes it). A turn with
    tool use stays open across its results; the last turn stays open under add_generation_prompt (the model
    continues it, as the server does), and a last assistant message whose calls await results stays open
    even without it (so that earlier turns render the same once results follow). -#}
{%- macro call_argument(args) -%}
  {%- if args is mapping -%}
    {%- if args | length == 1 and 'input' in args -%}{{- args['input'] -}}{%- else -%}{{- args | tojson -}}{%- endif -%}
  {%- elif args is not string -%}{{- args -}}
  {%- else -%}
    {#- JSON {"input": "<string>"} -> the string, decoded here since Jinja has no JSON parser; anything else
        as written (a lone surrogate or a repeated key too, where Python's json would decode) -#}
    {%- set ws = ' \t\n\r' -%}
    {%- set s = args.strip(ws) -%}
    {%- set inner = s[1:-1].strip(ws) if s.startswith('{') and s.endswith('}') else '' -%}
    {%- set rest = inner[7:].lstrip(ws) if inner.startswith('"input"') else '' -%}
    {%- set value = rest[1:].lstrip(ws) if rest.startswith(':') else '' -%}
    {%- set ok = value | length > 1 and value.startswith('"') and value.endswith('"') -%}
    {%- set d = namespace(ok=ok, out='', esc=false, hex='', high=none) -%}
    {%- for c in (value[1:-1] if ok else '') -%}
      {%- if not d.ok -%}
      {%- elif d.hex -%}
        {%- if c not in '0123456789abcdefABCDEF' -%}{%- set d.ok = false -%}
        {%- elif d.hex | length < 4 -%}{%- set d.hex = d.hex ~ c -%}
        {%- else -%}
          {%- set code = (d.hex[1:] ~ c) | int(base=16) -%}
          {%- set d.hex = '' -%}
          {%- set low = code >= 56320 and code <= 57343 -%}
          {%- if d.high is not none and low -%}
            {%- set d.out = d.out ~ '%c' | format(65536 + (d.high - 55296) * 1024 + code - 56320) -%}
            {%- set d.high = none -%}
          {%- elif d.high is not none or low -%}{%- set d.ok = false -%}
          {%- elif code >= 55296 and code <= 56319 -%}{%- set d.high = code -%}
          {%- else -%}{%- set d.out = d.out ~ '%c' | format(code) -%}
          {%- endif -%}
        {%- endif -%}
      {%- elif d.esc -%}
        {%- set d.esc = false -%}
        {%- if c == 'u' -%}{%- set d.hex = 'u' -%}
        {%- elif d.high is not none or c not in '"\\/bfnrt' -%}{%- set d.ok = false -%}
        {%- else -%}
          {%- set d.out = d.out ~ {'"': '"', '\\': '\\', '/': '/', 'b': '\b', 'f': '\f', 'n': '\n', 'r': '\r',
                                   't': '\t'}[c] -%}
        {%- endif -%}
      {%- elif c == '\\' -%}{%- set d.esc = true -%}
      {%- elif d.high is not none or c == '"' or c < ' ' -%}{%- set d.ok = false -%}
      {%- else -%}{%- set d.out = d.out ~ c -%}
      {%- endif -%}
    {%- endfor -%}
    {%- if d.ok and not d.esc and not d.hex and d.high is none -%}{{- d.out -}}{%- else -%}{{- args -}}{%- endif -%}
  {%- endif -%}
{%- endmacro -%}
{#- tools: the note the server puts in the system message (llmstack/serve/models.py prompt_ids) -#}
{%- set ns = namespace(note='') -%}
{%- for tool in tools or [] -%}
  {%- set t = tool['function'] if 'function' in tool else tool -%}
  {%- set ns.note = ns.note ~ '\n' ~ ('- ' ~ t['name'] ~ ': ' ~ t.get('description', '')).rstrip(': ') -%}
{%- endfor -%}
{%- if ns.note -%}{%- set ns.note = 'You can call these tools (write `name: argument`):' ~ ns.note -%}{%- endif -%}
<|bos|>
{%- if ns.note and (not messages or messages[0]['role'] != 'system') -%}
  <|system_start|>{{- ns.note -}}<|system_end|>
{%- endif -%}
{%- for m in messages -%}
  {%- set role, content = m['role'], m.get('content') or '' -%}
  {%- set prev = none if loop.first else messages[loop.index0 - 1]['role'] -%}
  {%- set next = none if loop.last else messages[loop.index0 + 1]['role'] -%}
  {%- if role == 'system' -%}
    <|system_start|>{{- content ~ ('\n\n' ~ ns.note if ns.note and loop.first else '') -}}<|system_end|>
  {%- elif role == 'user' -%}
    <|user_start|>{{- content -}}<|user_end|>
  {%- elif role == 'assistant' -%}
    {%- if prev != 'tool' -%}<|assistant_start|>{%- endif -%}
    {{- content -}}
    {%- for c in m.get('tool_calls') or [] -%}
      {%- set f = c['function'] if 'function' in c else c -%}
      {%- set args = f['arguments'] if 'arguments' in f else '' -%}
      <|tool_call_start|>{{- f['name'] ~ ': ' ~ call_argument(args) -}}<|tool_call_end|>
    {%- endfor -%}
  {%- elif role == 'tool' -%}
    {%- if prev not in ('assistant', 'tool') -%}
      {{- raise_exception('a tool result must follow an assistant tool call') -}}
    {%- endif -%}
    <|tool_result_start|>{{- content -}}<|tool_result_end|>
  {%- endif -%}
  {%- set continues = next == 'tool' or (role == 'tool' and next == 'assistant') -%}
  {%- set pending = role == 'assistant' and m.get('tool_calls') -%}
  {%- if role in ('assistant', 'tool') and not continues -%}
    {%- if next is not none or not (add_generation_prompt or pending) -%}<|assistant_end|>{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and (not messages or messages[-1]['role'] not in ('assistant', 'tool')) -%}
  <|assistant_start|>
{%- endif -%}
""".strip()
"""Our chat format in Jinja, exported with llmstack tokenizers (HF ``tokenizer_config.json``, GGUF): the
rendering of ``llmstack.chat.conversation`` and of the server, for ``apply_chat_template`` and every
template-driven tool (the token names are written out: this module's constants above)."""
