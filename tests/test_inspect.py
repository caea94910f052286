"""The Inside view (``llmstack/inference/inspect.py``, ``POST /api/inspect``) against reference computations.

Attention probabilities times V through ``o_proj`` give each layer's own attention output (so the maps are
the attention the model runs), and equal transformers' eager ``output_attentions`` for tiny random Llama
(GQA), Mistral (a sliding window shorter than the text) and GPT-2 models; the logit lens equals
transformers' hidden states through the final norm and head, its last row the model's logits; entropy and
surprise equal a float64 hand computation; a run with two checkpoints gives two different rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from llmstack.inference import inspect as I
from llmstack.interop.bundle import llmstack_bundle, save_run
from llmstack.interop.hf import import_hf
from llmstack.interop.tokenizer import hf_from_ranks
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT
from llmstack.serve.app import run_checkpoints
from llmstack.training.checkpoint import load_meta, save_checkpoint

transformers = pytest.importorskip("transformers")

T = 12  # longer than the Mistral window (5)
SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    attn_implementation="eager",  # the implementation that returns attention weights
)


def _scramble(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and a misplaced norm or rope shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2 if p.ndim > 1 else 0.1)


def _ids(vocab: int, n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _gpt(vocab: int, seed: int = 0, **cfg) -> GPT:
    model = GPT(tiny_model_config(vocab, **cfg)).eval()
    _scramble(model, seed)
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- attention is the model's own
@pytest.mark.parametrize("window", [None, 4])
def test_probabilities_times_v_give_the_layers_attention_output(tok, window):
    kw = {"family": "mistral", "sliding_window": window} if window else {}
    model = _gpt(tok.vocab_size, n_layer=3, **kw)  # 4 query heads over 2 kv heads
    ids_T = _ids(tok.vocab_size)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # each layer's (normed input, attention output)
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, args, out: seen.append((args[0][0], out[0])))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(ids_T[None])
    for h in hooks:
        h.remove()
    stream = I.residual_stream(model, ids_T)
    diffs = []
    for layer, (x_TC, out_TC) in enumerate(seen):
        a = model.model.layers[layer].self_attn
        probs_HTT = I.attention_probs(model, layer, stream[layer])
        assert torch.allclose(probs_HTT.sum(-1), torch.ones(4, T))
        q, k = torch.arange(T)[:, None], torch.arange(T)[None]
        hidden = (k > q) | ((k <= q - window) if window else torch.zeros(T, T, dtype=torch.bool))
        assert probs_HTT[:, hidden].abs().max() == 0  # the future, and keys beyond the window
        v_HTD = a.v_proj(x_TC).view(T, 2, a.head_dim).transpose(0, 1).repeat_interleave(2, dim=0)
        with torch.no_grad():
            y_TC = a.o_proj((probs_HTT @ v_HTD).transpose(0, 1).reshape(T, -1))
        diffs.append(_max_diff(y_TC, out_TC))
    assert max(diffs) < 1e-5, diffs
    assert I.kv_heads(model) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- against transformers
def _hf_llama_family(kind: str, vocab: int):
    extra = {"sliding_window": 5} if kind == "Mistral" else {}
    cfg = getattr(transformers, f"{kind}Config")(vocab_size=vocab, **SHAPE, **extra)
    hf = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    _scramble(hf, 3)
    ours = GPT(ModelConfig.from_hf_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def _hf_gpt2(vocab: int, tok, path: Path):
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=3,
        n_head=4,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.bos_id,
        attn_implementation="eager",
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    _scramble(hf, 4)
    hf.save_pretrained(path)
    hf_from_ranks(tok).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return hf, import_hf(path).model.eval()


@pytest.mark.parametrize("kind", ["Llama", "Mistral", "GPT2"])
def test_attention_and_logit_lens_equal_transformers(kind, tok, tmp_path):
    if kind == "GPT2":
        hf, ours = _hf_gpt2(tok.vocab_size, tok, tmp_path)
        final_norm = hf.transformer.ln_f
    else:
        hf, ours = _hf_llama_family(kind, tok.vocab_size)
        final_norm = hf.model.norm
        assert ours.config.sliding_window == (5 if kind == "Mistral" else None)
    ids_T = _ids(tok.vocab_size)
    with torch.no_grad():
        ref = hf(ids_T[None], output_attentions=True, output_hidden_states=True)
        # transformers' last hidden state is already normed; the others are the layers' outputs
        ref_lens = [hf.lm_head(final_norm(h[0])) for h in ref.hidden_states[1:-1]] + [ref.logits[0]]
    stream = I.residual_stream(ours, ids_T)
    attn = [_max_diff(I.attention_probs(ours, i, stream[i]), ref.attentions[i][0]) for i in range(3)]
    assert max(attn) < 1e-5, attn
    lens = [_max_diff(I.lens_logits(ours, stream[i + 1]), ref_lens[i]) for i in range(3)]
    assert max(lens) < 1e-4, lens

    out = I.inspect_text(ours, ids_T.tolist(), tok, top_k=3, layers=[2, 0])
    assert out["attention"]["layers"] == [0, 2] and len(out["attention"]["maps"]) == 2
    (head0,) = out["attention"]["maps"][1][:1]  # layer 2, head 0: row q holds the weights of keys 0..q
    assert [len(row) for row in head0] == list(range(1, T + 1))
    assert torch.allclose(torch.tensor(head0[-1]), ref.attentions[2][0, 0, -1], atol=6e-5)
    p_next = ref.logits[0].softmax(-1)[torch.arange(T - 1), ids_T[1:]]
    assert torch.allclose(torch.tensor(out["lens"]["p_next"][-1]), p_next, rtol=1e-3)


# ----------------------------------------------------------------------------- next token, lens, by hand
def test_entropy_surprise_and_top_k_by_hand(tok):
    model = _gpt(tok.vocab_size, seed=5)
    ids = tok.encode_ordinary("the model reads tokens and predicts")
    out = I.inspect_text(model, ids, tok, top_k=4)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double()
    p = logits.softmax(-1)
    entropy = [-(row * row.log2()).sum().item() for row in p]
    surprise = [-p[t, ids[t + 1]].log2().item() for t in range(len(ids) - 1)]
    assert out["next"]["entropy"] == pytest.approx(entropy, abs=1e-3)
    assert out["next"]["surprise"][:-1] == pytest.approx(surprise, abs=1e-3) and out["next"]["surprise"][-1] is None
    top = p.topk(4, dim=-1)
    assert [[i for i, _ in row] for row in out["next"]["top"]] == top.indices.tolist()
    probs = torch.tensor([[q for _, q in row] for row in out["next"]["top"]], dtype=torch.float64)
    assert torch.allclose(probs, top.values, rtol=1e-3)
    # the lens' last row is the model's own output, exactly: the same modules in the same order
    stream = I.residual_stream(model, torch.tensor(ids))
    assert _max_diff(I.lens_logits(model, stream[-1]), logits.float()) == 0
    assert out["lens"]["top"][-1] == out["next"]["top"] and len(out["lens"]["top"]) == model.config.n_layer
    assert [t["id"] for t in out["tokens"]] == ids and "".join(t["text"] for t in out["tokens"]) == tok.decode(ids)
    named = {i for row in out["next"]["top"] for i, _ in row}
    assert named <= {int(k) for k in out["texts"]}


def test_limits_name_the_field(tok):
    model = _gpt(tok.vocab_size)  # a context of 64 tokens
    for ids, k, layers, field in [
        ([], 5, None, "text"),
        ([1] * 65, 5, None, "text"),
        ([1, 2], 21, None, "top_k"),
        ([1, 2], 5, [2], "layers"),
    ]:
        with pytest.raises(I.InspectError) as e:
            I.inspect_text(model, ids, tok, k, layers)
        assert e.value.field == field and str(e.value).startswith(field)
    assert I.significant(torch.tensor([3.14159e-5, 0.0, 1.0, 0.123456])) == [3.142e-05, 0.0, 1.0, 0.1235]


# ----------------------------------------------------------------------------- across checkpoints
def test_two_checkpoints_give_two_different_rows(tok, tmp_path):
    first, later = _gpt(tok.vocab_size, seed=6), _gpt(tok.vocab_size, seed=7)
    run = tmp_path / "run"
    save_run(llmstack_bundle(first, tok), run, "test: step 0")
    meta = load_meta(run / "checkpoints" / "step_000000").meta
    save_checkpoint(run, 10, later, None, meta, keep=0)
    broken = run / "checkpoints" / "step_000020"
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps({**meta, "step": 20}))
    (broken / "model.safetensors").write_bytes(b"not weights")
    ids = tok.encode_ordinary("the model reads tokens")
    ckpts = I.inspect_text(later, ids, tok, checkpoints=run_checkpoints(str(run)))["checkpoints"]
    assert ckpts["steps"] == [0, 10] and [s.split(":")[0] for s in ckpts["skipped"]] == ["step 20"]
    rows = [torch.tensor(r) for r in ckpts["p_next"]]
    assert [len(r) for r in rows] == [len(ids) - 1] * 2 and _max_diff(rows[0], rows[1]) > 1e-3
    for row, model in zip(rows, (first, later), strict=True):
        with torch.no_grad():
            p = model(torch.tensor([ids]))[0].softmax(-1)[torch.arange(len(ids) - 1), ids[1:]]
        assert torch.allclose(row, p, rtol=1e-3)
    assert ckpts["mean_surprise"][1] == pytest.approx(-torch.log2(rows[1]).mean().item(), abs=2e-3)
    assert run_checkpoints(str(run / "checkpoints" / "step_000000")) == [] and run_checkpoints("") == []


# ----------------------------------------------------------------------------- the HTTP route
@pytest.fixture(scope="module")
def http(scripted_run):
    from fastapi.testclient import TestClient

    from llmstack.serve import build_registry
    from llmstack.serve.app import create_app

    registry = build_registry([f"tiny={scripted_run}", f"one={scripted_run / 'checkpoints' / 'step_000000'}"])
    with TestClient(create_app(registry)) as client:
        yield client


def test_the_route_answers_and_refuses_by_field(http):
    r = http.post(
        "/api/inspect", json={"model": "tiny", "text": " the model reads", "layers": [1], "checkpoints": True}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    texts = [t["text"] for t in body["tokens"]]
    assert texts == ["<|bos|>", " the", " model", " reads"]  # our models read a text after bos
    assert body["model"] == "tiny" and body["run_checkpoints"] == 1
    assert body["attention"]["layers"] == [1] and len(body["attention"]["maps"][0]) == body["heads"]
    assert len(body["lens"]["top"]) == body["layers"] and body["checkpoints"]["steps"] == [0]
    assert max(body["next"]["surprise"][1:3]) < 0.1  # the scripted bigrams: " the" -> " model" -> " reads"
    for req, status, param in [
        ({"model": "nope", "text": "x"}, 404, "model"),
        ({"model": "tiny", "text": "x", "top_k": 21}, 400, "top_k"),
        ({"model": "tiny", "text": "x", "layers": [5]}, 400, "layers"),
        ({"model": "tiny", "text": "x", "layers": [-1]}, 400, "layers.0"),
        ({"model": "tiny", "text": "x " * 300}, 400, "text"),
        ({"model": "one", "text": "x", "checkpoints": True}, 400, "checkpoints"),
    ]:
        r = http.post("/api/inspect", json=req)
        assert r.status_code == status and r.json()["error"]["param"] == param, (req, r.text)
    assert "InspectRequest" in http.get("/openapi.json").json()["components"]["schemas"]
