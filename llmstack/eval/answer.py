"""How a chat model answers generative problems, batched through the engine, greedy.

* Our assistants (an llmstack tokenizer with the chat and tool specials) answer through
  ``eval/assistant.py``'s ``Assistant``: our chat format, and our tools when a mode asks for them.
* Any other chat model (SmolLM2, an imported HF / GGUF model) gets its own chat template
  (``interop/chat.py``) and no tools.

Base models answer nothing here: a document that continues into an answer is ``inference/simulate.py``'s
business, and the suite scores base models by log-likelihood only.
"""

from __future__ import annotations

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.eval.assistant import Assistant
from llmstack.inference.engine import Engine
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.bundle import Bundle
from llmstack.interop.chat import prompt_ids
from llmstack.tokenizer import special as S
from llmstack.tokenizer.bpe import Tokenizer
from llmstack.tools.registry import default_toolbox

ROOM = 16  # new tokens a prompt must leave room for in the model's context


class OurAssistant:
    ours = True

    def __init__(self, bundle: Bundle) -> None:
        self.model, self.tok = bundle.model, bundle.tokenizer
        self.context: int = bundle.model.config.max_seq_len

    def fits(self, question: str) -> bool:
        return len(ChatFormat(self.tok).prompt(Conversation.of(("user", question)))) <= self.context - ROOM

    def answer(self, questions: list[str], max_new_tokens: int, tools: bool) -> list[str]:
        box = default_toolbox() if tools else None
        return Assistant(self.model, self.tok, box, max_new_tokens=max_new_tokens).answer(questions)


class TemplateChat:
    ours = False

    def __init__(self, bundle: Bundle, batch_size: int = 32) -> None:
        bundle.template()  # no chat template: say so now, not at the first question
        self.bundle, self.batch_size = bundle, batch_size
        self.engine = Engine(bundle.model)
        self.context: int = bundle.model.config.max_seq_len

    def fits(self, question: str) -> bool:
        return len(prompt_ids(self.bundle, [{"role": "user", "content": question}])) <= self.context - ROOM

    def answer(self, questions: list[str], max_new_tokens: int, tools: bool) -> list[str]:
        if tools:
            raise ValueError("this model has no tools")
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        stops = self.bundle.stop_ids()
        out: list[str] = []
        for i in range(0, len(questions), self.batch_size):
            prompts = [
                prompt_ids(self.bundle, [{"role": "user", "content": q}]) for q in questions[i : i + self.batch_size]
            ]
            for ids in self.engine.generate(prompts, cfg, stops):
                out.append(self.bundle.tokenizer.decode([t for t in ids if t not in stops]))
        return out


Responder = OurAssistant | TemplateChat


def is_ours(bundle: Bundle) -> bool:
    tok = bundle.tokenizer
    return isinstance(tok, Tokenizer) and all(
        s in tok.special_tokens for s in (S.ASSISTANT_START, S.ASSISTANT_END, S.TOOL_CALL_START)
    )


def responder_for(bundle: Bundle) -> Responder:
    return OurAssistant(bundle) if is_ours(bundle) else TemplateChat(bundle)
