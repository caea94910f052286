"""Model families against ``transformers``: Llama (every rope scaling type), Qwen2, Mistral.

Each family is a tiny random ``transformers`` model (2 layers, hidden 64, 4 heads, 2 kv heads, fp32,
seeded), saved with ``save_pretrained``: imported with ``import_hf`` its logits equal transformers', exported
with ``export_hf`` transformers builds the same class back with equal logits, and GGUF round trips it. The
biased and windowed ones also decode through the KV cache (dynamic, fused and static steps, padded
batches) as their full forward does. The prompt (24 tokens) is longer than the sliding windows (8) and the
scaled ropes' original contexts (16), so both change the logits.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_interop import _hf_greedy, _ids, _our_greedy, _same_greedy, _save_tokenizer_json

from llmstack.inference.engine import Engine
from llmstack.inference.sample import SamplingConfig
from llmstack.interop import gguf as gguf_module
from llmstack.interop.bundle import save_run
from llmstack.interop.gguf import export_gguf, import_gguf
from llmstack.interop.hf import export_hf, import_hf
from llmstack.interop.load import load_run
from llmstack.model.config import ModelConfig, RopeScaling
from llmstack.model.llama import GPT, KVCache

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {  # name -> (HF class name, config keywords)
    "llama": ("Llama", {}),
    "llama-linear": ("Llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-dynamic": ("Llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}),
    "llama-yarn": ("Llama", {"rope_scaling": YARN}),
    "llama-llama3": ("Llama", {"rope_scaling": LLAMA3, "rope_theta": 500000.0}),
    "qwen2-tied": ("Qwen2", {"tie_word_embeddings": True}),
    "qwen2-untied": ("Qwen2", {"tie_word_embeddings": False}),
    "qwen2-window-yarn": (
        "Qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0, "rope_scaling": YARN},
    ),
    "mistral": ("Mistral", {"sliding_window": 8}),
    "mistral-head-dim": ("Mistral", {"sliding_window": 8, "head_dim": 8}),  # 4 x 8 != 64
}
DECODED = ["qwen2-untied", "qwen2-window-yarn", "mistral", "mistral-head-dim"]
"""The biased and windowed families, checked through every decoding path."""


def _hf_model(name: str, vocab_size: int, dtype: torch.dtype = torch.float32):
    kind, kw = CASES[name]
    kw = copy.deepcopy(kw)  # transformers writes rope_theta into the rope dict it is given
    cfg = getattr(transformers, f"{kind}Config")(vocab_size=vocab_size, **SHAPE, **{"tie_word_embeddings": False, **kw})
    torch.manual_seed(sorted(CASES).index(name))
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # larger than HF's init, so logits are decisive and a misplaced bias or norm shows
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2 if p.ndim > 1 else 0.1)
    return model.to(dtype)


def _save(model, tok, path: Path) -> Path:
    """An HF model directory as ``save_pretrained`` writes it, with our test tokenizer."""
    model.save_pretrained(path)
    _save_tokenizer_json(tok, path)
    return path


@pytest.fixture(scope="module", params=list(CASES))
def family_dir(request, tmp_path_factory, tok):
    """(name, saved HF directory, the transformers model)."""
    model = _hf_model(request.param, tok.vocab_size)
    return request.param, _save(model, tok, tmp_path_factory.mktemp("families") / request.param), model


def _ours(reference, **change) -> GPT:
    """Our model with a transformers model's config (``change``d) and weights, without files."""
    cfg = ModelConfig.from_hf_dict(reference.config.to_dict())
    model = GPT(ModelConfig.from_dict({**cfg.to_dict(), **change})).eval()
    model.load_state_dict(reference.state_dict())
    return model


def _batch(tok) -> torch.Tensor:
    ids = _ids(tok)
    return torch.cat([ids, ids.flip(1)])  # (2, 24)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- HF, both directions
def test_import_matches_transformers_logits_and_greedy(family_dir, tok):
    name, path, reference = family_dir
    bundle = import_hf(path)
    cfg = bundle.model.config
    assert cfg.family == reference.config.model_type
    assert cfg.attention_bias == (cfg.family == "qwen2")
    assert cfg.sliding_window == (8 if "mistral" in name or "window" in name else None)
    assert cfg.head_dim == (8 if name == "mistral-head-dim" else 16)
    rope = CASES[name][1].get("rope_scaling")
    assert cfg.rope_scaling == (RopeScaling.from_hf(rope, 64, None) if rope else None)
    ids = _batch(tok)
    with torch.no_grad():
        assert _max_diff(bundle.model(ids), reference(ids).logits) < 1e-4
    assert _same_greedy(_our_greedy(bundle.model, ids[:1], 12), _hf_greedy(reference, ids[:1], 12))


def test_export_loads_back_as_the_same_transformers_class(family_dir, tok, tmp_path):
    name, path, reference = family_dir
    bundle = import_hf(path)
    with torch.no_grad():  # our own weights go out, not a copy of the file that came in
        for p in bundle.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    back = transformers.AutoModelForCausalLM.from_pretrained(export_hf(bundle, tmp_path / "out")).eval()
    assert type(back) is type(reference)
    assert back.config.rope_parameters == reference.config.rope_parameters
    for key in ("tie_word_embeddings", "sliding_window", "layer_types"):
        assert getattr(back.config, key, None) == getattr(reference.config, key, None), key
    ids = _batch(tok)
    with torch.no_grad():
        assert _max_diff(back(ids).logits, bundle.model(ids)) < 1e-4


# ----------------------------------------------------------------------------- KV cache
def _decode(model: GPT, ids: torch.Tensor, static: bool) -> torch.Tensor:
    """Logits of a 4-token prefill then one token at a time, through the fused projections (the engine's
    way); ``static``: fixed-shape steps under ``KVCache.static_mask``, as CUDA graphs replay them."""
    B, T = ids.shape
    cache = KVCache(model.config, B, T, "cpu", torch.float32)
    model.fuse_for_decode()
    cache.fused = True
    out = [model(ids[:, :4], cache)]
    if static:
        cache.make_static()
    for t in range(4, T):
        if static:
            assert cache.pos_t is not None
            cache.pos_t.fill_(cache.pos)
        out.append(model(ids[:, t : t + 1], cache))
        if static:
            cache.advance(1)
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", DECODED)
def test_kv_cache_decode_equals_the_full_forward(name, tok):
    ours = _ours(_hf_model(name, tok.vocab_size))
    ids = _batch(tok)
    with torch.no_grad():
        full = ours(ids)
        for static in (False, True):
            assert _max_diff(_decode(ours, ids, static), full) < 1e-4, static
    # left-padded rows of different lengths (padding masked in the window too) decode as each alone
    prompts = [ids[0, :20].tolist(), ids[0, :5].tolist(), ids[1, :13].tolist()]
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    for static in (False, True):
        engine = Engine(ours, static=static)
        assert engine.generate(prompts, greedy) == [engine.generate([p], greedy)[0] for p in prompts]


def test_the_window_and_the_scaling_change_the_logits(tok):
    """The cases above test something: without its window / rope scaling the same weights answer otherwise."""
    ids = _batch(tok)
    for name, field in (
        ("mistral", "sliding_window"),
        ("llama-yarn", "rope_scaling"),
        ("llama-llama3", "rope_scaling"),
    ):
        reference = _hf_model(name, tok.vocab_size)
        with torch.no_grad():
            assert _max_diff(_ours(reference, **{field: None})(ids), reference(ids).logits) > 1e-2, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", DECODED)
def test_cuda_graph_decode_with_windows_and_biases_equals_dynamic_decode(name, tok):
    """CUDA graphs replay the static step: the fused q/k/v bias and the window in ``static_mask``."""
    ours = _ours(_hf_model(name, tok.vocab_size)).to("cuda")
    ids = _batch(tok)
    prompts = [ids[0, :20].tolist(), ids[0, :5].tolist(), ids[1, :13].tolist()]
    greedy = SamplingConfig(max_new_tokens=30, temperature=0.0)
    assert Engine(ours, static=True).generate(prompts, greedy) == Engine(ours, static=False).generate(prompts, greedy)


# ----------------------------------------------------------------------------- GGUF
@pytest.mark.parametrize(("quant", "tol"), [("f32", 1e-4), ("f16", 2e-2)])
def test_gguf_round_trip(family_dir, tok, tmp_path, quant, tol):
    """F32 weights come back bit-exact, so logits agree to float rounding; F16 rounds each weight by up to
    2^-11 relative, which moves these logits by under 2% of their range (as the llama test in test_interop)."""
    name, path, _ = family_dir
    bundle = import_hf(path)
    back = import_gguf(export_gguf(bundle, tmp_path / "m.gguf", quant))
    cfg = bundle.model.config
    assert back.model.config == replace(cfg, norm_eps=back.model.config.norm_eps)  # GGUF keeps eps in float32
    assert back.model.config.norm_eps == pytest.approx(cfg.norm_eps)
    ids = _batch(tok)
    with torch.no_grad():
        ours, theirs = bundle.model(ids), back.model(ids)
    assert _max_diff(ours, theirs) < tol * (1 if quant == "f32" else ours.abs().max().item())
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields, tensors = reader.fields, {t.name for t in reader.tensors}
    arch = "qwen2" if name.startswith("qwen2") else "llama"
    assert fields["general.architecture"].contents() == arch
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    assert ("rope_freqs.weight" in tensors) == (name == "llama-llama3")  # as llama.cpp's converter writes it
    window = fields.get(f"{arch}.attention.sliding_window")
    assert (window.contents() if window else None) == cfg.sliding_window
    if name != "llama":  # llama.cpp's arithmetic is reproduced for plain llama models only
        with pytest.raises(ValueError, match="llama.cpp emulation covers plain llama models"):
            import_gguf(tmp_path / "m.gguf", emulate="llama.cpp")


def test_gguf_llama3_factors_without_our_metadata(tok, tmp_path, monkeypatch):
    """A llama.cpp conversion of Llama 3.1 carries only ``rope_freqs``: factors made with Meta's (8192, 1, 4)
    import as that scaling, others are refused rather than run with the wrong frequencies."""
    defaults = {**LLAMA3, "original_max_position_embeddings": 8192}
    model = _hf_model("llama-llama3", tok.vocab_size)
    monkeypatch.setattr(gguf_module, "ROPE_SCALING_KEY", "other.rope_scaling")  # export writes it elsewhere
    files = {}
    for rope in (defaults, LLAMA3):
        model.config.rope_parameters = {**rope, "rope_theta": 500000.0}
        path = _save(model, tok, tmp_path / str(len(files)))
        files[rope["original_max_position_embeddings"]] = export_gguf(import_hf(path), path / "m.gguf", "f32")
    monkeypatch.undo()
    assert import_gguf(files[8192]).model.config.rope_scaling == RopeScaling.from_hf(defaults, 64, None)
    with pytest.raises(ValueError, match="rope_freqs.weight does not hold Llama 3"):
        import_gguf(files[16])


# ----------------------------------------------------------------------------- dtypes, runs, refusals
def test_bf16_weights_import_as_bf16_unless_asked(tok, tmp_path):
    _save(_hf_model("qwen2-untied", tok.vocab_size, torch.bfloat16), tok, tmp_path)
    kept, widened = import_hf(tmp_path).model, import_hf(tmp_path, dtype=torch.float32).model
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in widened.parameters()} == {torch.float32}
    ids = _batch(tok)
    with torch.no_grad():
        for ours, dtype in ((kept, torch.bfloat16), (widened, torch.float32)):
            logits = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()(ids).logits
            # bf16: both sides round every activation to 8 bits, possibly summing in other orders
            tol = 2e-2 * logits.abs().max().item() if dtype == torch.bfloat16 else 1e-4
            assert _max_diff(ours(ids).float(), logits.float()) < tol, dtype


@pytest.mark.parametrize("name", ["qwen2-window-yarn", "llama-llama3"])
def test_imported_family_survives_a_run_directory(name, tok, tmp_path):
    """``llmstack import``'s run dir keeps family, biases, window and rope scaling (meta.json is JSON)."""
    path = _save(_hf_model(name, tok.vocab_size), tok, tmp_path / "hf")
    bundle = import_hf(path)
    save_run(bundle, tmp_path / "run", source=str(path))
    meta = json.loads((tmp_path / "run/checkpoints/step_000000/meta.json").read_text())
    assert meta["model_config"]["rope_scaling"] == CASES[name][1]["rope_scaling"]  # transformers' own spelling
    again = load_run(tmp_path / "run")
    assert again.model.config == bundle.model.config
    ids = _batch(tok)
    with torch.no_grad():
        assert torch.equal(again.model(ids), bundle.model(ids))


def test_old_configs_load_unchanged():
    """A meta.json written before the family fields loads as the plain llama it was, and a plain config
    still writes exactly that (stored loss curves compare it)."""
    old = dict(vocab_size=100, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64, max_seq_len=64)
    old.update(rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)
    cfg = ModelConfig.from_dict(old)
    assert (cfg.family, cfg.head_dim, cfg.attention_bias, cfg.sliding_window, cfg.rope_scaling) == (
        "llama",
        8,
        False,
        None,
        None,
    )
    assert cfg.to_dict() == old


def test_unsupported_model_type_and_rope_type_are_named(tmp_path, tok):
    _save(_hf_model("llama", tok.vocab_size), tok, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]})
    )
    with pytest.raises(ValueError, match="unsupported architecture.*Gemma2ForCausalLM"):
        import_hf(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture.*phi3"):
        ModelConfig.from_hf_dict({**config, "model_type": "phi3", "architectures": None})
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": longrope}))
    with pytest.raises(ValueError, match="unsupported rope type 'longrope'"):
        import_hf(tmp_path)
    with pytest.raises(ValueError, match="unsupported rope type 'su'"):
        ModelConfig.from_hf_dict({**config, "rope_parameters": None, "rope_scaling": {"type": "su", "factor": 2.0}})
    with pytest.raises(ValueError, match="sliding window on some layers only"):
        qwen2 = {**config, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8}
        ModelConfig.from_hf_dict({**qwen2, "max_window_layers": 1, "layer_types": None})
