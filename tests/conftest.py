"""Hermetic fixtures: a tokenizer trained in-process, token shards and a tiny model; no network."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = [
    "the",
    "model",
    "reads",
    "tokens",
    "and",
    "predicts",
    "the",
    "next",
    "one",
    ";",
    "a",
    "list",
    "holds",
    "items",
    ",",
    "a",
    "dict",
    "maps",
    "keys",
    "to",
    "values",
    ".",
    "python",
    "code",
    ":",
    "def",
    "f",
    "(",
    "x",
    ")",
    ":",
    "return",
    "x",
    "+",
    "1",
    ".",
    "numbers",
    "1",
    "2",
    "3",
    "42",
    "100",
    ".",
    "café",
    "naïve",
    "日本語",
    "emoji",
    "🙂",
    ".",
]


def make_texts(n_docs: int, seed: int = 0, words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 4, words))) for _ in range(n_docs)]


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return make_texts(200)


@pytest.fixture(scope="session")
def tok(texts):
    from llmstack.tokenizer import Tokenizer

    return Tokenizer.train(texts, 384)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, tok, texts):
    from llmstack.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(((f"doc{i}", t) for i, t in enumerate(texts)), tok, out, val_fraction=0.1, progress=False)
    return out


def tiny_model_config(vocab_size: int, **kw):
    from llmstack.model.config import ModelConfig

    base = dict(
        vocab_size=vocab_size,
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_kv_head=2,
        intermediate_size=64,
        max_seq_len=64,
    )
    base.update(kw)
    return ModelConfig(**base)


# ----------------------------------------------------------------------------- a scripted model behind a real server
# the OpenAI declaration of our calculator, as clients send it
CALC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "evaluate arithmetic",
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
    },
}

SCRIPT_REPLY = " the model reads"


def bigram_model(tok, transitions: dict[int, int], **cfg):
    """A real GPT whose weights make greedy decoding follow ``transitions`` (token -> next token).

    Attention and MLP outputs are zeroed, so the residual stream at each position is the token's own
    embedding; each ``lm_head`` row is a scaled sum of the normalised embeddings of the tokens that
    lead to it. Checked here: every transition is the argmax.
    """
    import torch

    from llmstack.model.llama import GPT

    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, n_embd=64, max_seq_len=128, tie_embeddings=False, **cfg)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        unit = emb / emb.norm(dim=-1, keepdim=True)
        head = torch.zeros_like(model.lm_head.weight)
        for a, b in transitions.items():
            head[b] += 20 * unit[a]
        model.lm_head.weight.copy_(head)
        src = torch.tensor(list(transitions))
        got = model(src.view(-1, 1))[:, -1].argmax(-1).tolist()
    assert got == list(transitions.values()), "bigram weights do not give the scripted transitions"
    return model


def script_transitions(tok) -> dict[int, int]:
    """Chat: ``<|assistant_start|>`` -> " the model reads" -> ``<|assistant_end|>``; a forced call to
    ``calculator: `` writes ``42`` and ends; an assistant prefill ``x`` opens a call ``42`` (a malformed
    call: the tool answers with an error); after a tool result the reply is " the model reads" again."""
    from llmstack.tokenizer import special as S

    sid = tok.special_id
    t1, t2, t3 = (tok.encode_ordinary(w) for w in (" the", " model", " reads"))
    n4, n2 = tok.encode_ordinary("42")  # digits are single tokens
    (x,) = tok.encode_ordinary("x")
    last_of_prefix = tok.encode_ordinary("calculator: ")[-1]
    assert all(len(t) == 1 for t in (t1, t2, t3))
    tr = {
        sid(S.ASSISTANT_START): t1[0],
        t1[0]: t2[0],
        t2[0]: t3[0],
        t3[0]: sid(S.ASSISTANT_END),
        last_of_prefix: n4,
        n4: n2,
        n2: sid(S.TOOL_CALL_END),
        sid(S.TOOL_RESULT_END): t1[0],
        x: sid(S.TOOL_CALL_START),
        sid(S.TOOL_CALL_START): n4,
    }
    assert len(tr) == 10, "scripted transitions collide: pick other words"
    return tr


@pytest.fixture(scope="session")
def scripted_run(tmp_path_factory, tok):
    """A run directory holding the scripted model and the test tokenizer (what ``llmstack serve`` loads)."""
    from llmstack.interop.bundle import llmstack_bundle, save_run

    out = tmp_path_factory.mktemp("scripted") / "run"
    save_run(llmstack_bundle(bigram_model(tok, script_transitions(tok)), tok), out, "test: scripted bigram model")
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(args: list[str], log: Path):
    """A real ``llmstack serve`` process on a free localhost port with ``args``; yields its URL once
    ``/health`` answers, and stops it afterwards."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    with open(log, "wb") as f:
        cmd = [sys.executable, "-m", "llmstack", "serve", "--port", str(port), *args]
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"server did not start: {log.read_text()}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def server(scripted_run, tmp_path_factory):
    """A real ``llmstack serve`` process on localhost serving the scripted model as ``tiny``; yields its URL."""
    args = ["--model", f"tiny={scripted_run}", "--no-assistants", "--max-tokens-cap", "64"]
    with serve_process(args, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn on a free localhost port in a thread of this process; yields its URL."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started:
                break
            if not thread.is_alive():
                raise RuntimeError("the server stopped while starting")
            time.sleep(0.05)
        else:
            raise RuntimeError("the server did not start")
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def local_completions(url: str, model: str, tokenizer_dir, requests):
    """lm-eval's ``local-completions`` against ``url`` (tokenizing with an HF export, BOS added as our
    models expect): the loglikelihoods of ``requests``."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=url + "/v1/completions",
        model=model,
        tokenizer_backend="huggingface",
        tokenizer=str(tokenizer_dir),
        add_bos_token=True,
        max_length=128,
        max_retries=1,
    ).loglikelihood(requests)


# ----------------------------------------------------------------------------- a model that is not ours
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# the transformers Llama shape of the tiny HF models tests save (the same as ``tiny_model_config``'s ours)
HF_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def chatml_model(path: Path, context: int = 256) -> Path:
    """A tiny random Llama saved by ``transformers`` at ``path``, with a byte-level BPE trained by HF
    ``tokenizers`` (ChatML specials only: none of ours) and a ChatML template, as SmolLM2 or Qwen ship."""
    import json

    import torch
    import transformers
    from tokenizers import Tokenizer as RawHF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawHF(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(make_texts(200) + ["What is 12*34? The answer is 408. Hello there!"] * 5, trainer)
    cfg = transformers.LlamaConfig(
        vocab_size=raw.get_vocab_size(),
        **HF_TINY,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        eos_token_id=raw.token_to_id("<|im_end|>"),
        initializer_range=0.3,  # at the usual 0.02 a 32-wide tied head cannot reach a confident logit
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    raw.save(str(path / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return path
