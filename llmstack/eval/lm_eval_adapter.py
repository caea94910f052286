"""Any llmstack model as an lm-evaluation-harness ``LM``, registered as ``llmstack``.

``loglikelihood`` and ``loglikelihood_rolling`` are ``eval/loglik.py`` itself, so a multiple-choice task
scores the same in lm-eval as in ``llmstack eval --tasks`` (tests/test_lm_eval.py checks it on one
set); ``generate_until`` decodes greedily through the engine and stops at the request's ``until``
strings or the model's end-of-turn tokens. lm-eval's built-in tasks download their data from a hub;
offline, write a task YAML over local files (``dataset_path: json`` + ``dataset_kwargs.data_files``)
and pass its folder as ``--include_path``:

    pip install lm-eval
    lm_eval --model llmstack --model_args pretrained=smollm2 --include_path my_tasks/ --tasks my_task

(the ``lm_eval`` command finds the model once this module is imported, e.g. from a small script that
imports it and calls ``lm_eval.simple_evaluate(model=LLMStackLM("smollm2"), tasks=[...])``).
Not covered: sampling settings other than greedy, multiple GPUs, chat templates for log-likelihood
requests (they score raw text, as lm-eval's multiple-choice tasks do by default).
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llmstack.chat.answer import render
from llmstack.eval.loglik import LoglikScorer
from llmstack.inference.engine import Engine, Request
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.bundle import Bundle
from llmstack.interop.load import load_model


@register_model("llmstack")
class LLMStackLM(LM):
    def __init__(
        self,
        pretrained: str | Bundle = "smollm2",
        device: str = "cpu",
        max_batch_tokens: int = 2048,
        max_gen_toks: int = 256,
        batch_size: int = 16,
        **_: Any,  # lm-eval passes batch_size / device strings and other options some models take
    ) -> None:
        super().__init__()
        self.bundle = pretrained if isinstance(pretrained, Bundle) else load_model(pretrained)
        self.bundle.model.to(device)
        self.scorer = LoglikScorer.for_bundle(self.bundle, int(max_batch_tokens))
        self.engine = Engine(self.bundle.model, token_bytes=self.bundle.tokenizer.decode_token_bytes)
        self.max_gen_toks, self.batch_size = int(max_gen_toks), int(batch_size)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scored = self.scorer.loglikelihood([tuple(r.args) for r in requests])
        return [(s.logprob, s.greedy) for s in scored]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return [s.logprob for s in self.scorer.rolling([r.args[0] for r in requests])]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        tok, stops = self.bundle.tokenizer, self.bundle.stop_ids()
        max_prompt = self.scorer.max_len - 1
        rows: list[tuple[Request, tuple[str, ...]]] = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or ()
            until = (until,) if isinstance(until, str) else tuple(until)
            start = [self.scorer.bos] if self.scorer.bos is not None else []
            prompt = (start + tok.encode_with_special(context))[-max_prompt:] or [self.scorer.prefix]
            cfg = SamplingConfig(max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)), temperature=0.0)
            rows.append((Request(prompt, cfg, stops, tuple(u.encode() for u in until), tool_mode="off"), until))
        out: list[str] = []
        for i in range(0, len(rows), self.batch_size):
            batch = rows[i : i + self.batch_size]
            ids: list[list[int]] = [[] for _ in batch]
            for ev in self.engine.run([req for req, _ in batch]):
                if ev.token not in stops:
                    ids[ev.row].append(ev.token)
            for row_ids, (_, until) in zip(ids, batch, strict=True):
                text = tok.decode(row_ids)
                cut = min((text.find(u) for u in until if u in text), default=len(text))
                out.append(text[:cut])
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render(self.bundle, chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.bundle.tokenizer.fingerprint
