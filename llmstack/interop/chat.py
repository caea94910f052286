"""Chat with any bundle: render the conversation with the model's own chat template, stream the reply.

The template is the one the model ships (``tokenizer_config.json`` / ``tokenizer.chat_template``),
rendered with jinja2 in a sandbox the way ``transformers`` does (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception``). The rendered prompt is trusted text, so special-token
names in it become control tokens; what the user typed cannot, because it is only ever substituted
into the template. Stops at eos or an end-of-turn token. What is not here: tools, multi-modal turns.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

from llmstack.inference.sample import SamplingConfig, generate, stream_text
from llmstack.interop.bundle import Bundle
from llmstack.model.llama import GPT

Message = dict[str, str]


def render(bundle: Bundle, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` under the bundle's chat template."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(bundle.template()).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bundle.bos_token or "",
            eos_token=bundle.eos_token or "",
        )
    except TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None


def prompt_ids(bundle: Bundle, messages: list[Message]) -> list[int]:
    return bundle.tokenizer.encode_with_special(render(bundle, messages))


def reply(bundle: Bundle, messages: list[Message], cfg: SamplingConfig) -> Iterator[str]:
    """Stream the assistant's next reply as text pieces; the end-of-turn token itself is not shown."""
    stops = bundle.stop_ids()

    def until_stop() -> Iterator[int]:
        model = cast(GPT, bundle.model)  # GPT2 has the same forward and cache interface
        for token in generate(model, prompt_ids(bundle, messages), cfg, stop_ids=stops):
            if token in stops:
                return
            yield token

    return stream_text(until_stop(), bundle.tokenizer.decode_token_bytes)


def chat_once(bundle: Bundle, prompt: str, cfg: SamplingConfig, system: str | None = None) -> str:
    """One user turn -> the full reply text (the non-interactive path tests use)."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return "".join(reply(bundle, messages, cfg))


def repl(bundle: Bundle, cfg: SamplingConfig, system: str | None, out: Any, read: Any = input) -> None:
    """A minimal read-reply loop; an empty line or EOF ends it."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            text = read("> ")
        except EOFError:
            break
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        pieces = []
        for piece in reply(bundle, messages, cfg):
            out.write(piece)
            out.flush()
            pieces.append(piece)
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})
