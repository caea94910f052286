"""The model against Hugging Face's LlamaForCausalLM at tiny sizes, in both directions."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT, KVCache

transformers = pytest.importorskip("transformers")


def hf_model(cfg: ModelConfig):
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict())
    return transformers.LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_hf_weights_load_into_ours_with_equal_logits(tie, n_kv_head):
    torch.manual_seed(0)
    cfg = tiny_model_config(300, tie_embeddings=tie, n_kv_head=n_kv_head, rope_theta=5000.0)
    hf = hf_model(cfg)
    for p in hf.parameters():  # HF inits norms to 1; perturb so a swapped norm weight would show
        p.data.add_(0.02 * torch.randn_like(p))
    ours = GPT(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_our_weights_load_into_hf_with_equal_logits(tie):
    torch.manual_seed(1)
    cfg = tiny_model_config(257, tie_embeddings=tie)
    ours = GPT(cfg).eval()
    hf = hf_model(cfg)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not missing
    x = torch.randint(0, 257, (2, 64))  # the full context
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() < 1e-4
        # greedy continuation is the same too
        a = hf.generate(x[:, :8], max_new_tokens=10, do_sample=False, pad_token_id=0)
    ids = x[:, :8]
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, ours(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(a, ids)


def test_state_dict_names_are_hf_names():
    cfg = tiny_model_config(100, tie_embeddings=False)
    assert set(GPT(cfg).state_dict()) == set(hf_model(cfg).state_dict())


def test_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(2)
    cfg = tiny_model_config(200)
    m = GPT(cfg).eval()
    x = torch.randint(0, 200, (2, 30))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(cfg, 2, 30, "cpu", torch.float32)
        parts = [m(x[:, :11], cache)]  # prefill
        parts += [m(x[:, i : i + 1], cache) for i in range(11, 20)]  # one token at a time
        parts.append(m(x[:, 20:], cache))  # a chunk after a non-empty cache
    assert cache.pos == 30
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_too_long_sequence_is_refused():
    cfg = tiny_model_config(50, max_seq_len=16)
    m = GPT(cfg)
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        KVCache(cfg, 1, 32, "cpu", torch.float32)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(n_embd=30, n_head=4), "not divisible by n_head"),
        (dict(n_head=4, n_kv_head=3), "not divisible by n_kv_head"),
        (dict(n_layer=0), "n_layer must be positive"),
    ],
)
def test_bad_config_is_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_model_config(100, **kw)


def test_hf_config_round_trip_and_refusals():
    cfg = tiny_model_config(123, tie_embeddings=False, rope_theta=500000.0)
    hf_dict = transformers.LlamaConfig(**cfg.to_hf_dict()).to_dict()
    assert ModelConfig.from_hf_dict(hf_dict) == cfg
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf_dict({**hf_dict, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_hf_dict({**hf_dict, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_param_count_matches_hf():
    cfg = tiny_model_config(100, tie_embeddings=True)
    assert cfg.num_params() == GPT(cfg).num_params() == hf_model(cfg).num_parameters()


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(chunk_rows, monkeypatch):
    """forward(x, targets_BT=y) never builds the (B*T, vocab) logits; loss and every gradient equal the
    plain path's, padding targets (IGNORE_INDEX) included, with chunks that do not divide B*T."""
    import torch.nn.functional as F

    from llmstack.model import llama

    if chunk_rows:
        monkeypatch.setattr(llama, "default_chunk_rows", lambda vocab: chunk_rows)
    torch.manual_seed(0)
    model = GPT(tiny_model_config(300, tie_embeddings=True))
    x, y = torch.randint(0, 300, (3, 40)), torch.randint(0, 300, (3, 40))
    y[0, :5] = llama.IGNORE_INDEX
    logits = model(x)
    plain = F.cross_entropy(logits.float().view(-1, 300), y.view(-1), ignore_index=llama.IGNORE_INDEX)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    chunked = model(x, targets_BT=y)
    chunked_grads = torch.autograd.grad(chunked, list(model.parameters()))
    assert chunked.dtype == torch.float32 and chunked.shape == ()
    assert abs(chunked.item() - plain.item()) < 1e-5
    for (name, _), a, b in zip(model.named_parameters(), plain_grads, chunked_grads, strict=True):
        assert (a - b).abs().max() < 1e-5, name
    with torch.no_grad():  # evaluation: the loss alone, chunk by chunk
        assert abs(model(x, targets_BT=y).item() - plain.item()) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_cross_entropy_under_bf16_autocast_on_cuda_matches_the_plain_path():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = GPT(tiny_model_config(4096, n_embd=128, n_head=4, max_seq_len=256)).cuda()
    x, y = torch.randint(0, 4096, (4, 256), device="cuda"), torch.randint(0, 4096, (4, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = F.cross_entropy(model(x).float().view(-1, 4096), y.view(-1))
        plain_grads = torch.autograd.grad(plain, list(model.parameters()))
        chunked = model(x, targets_BT=y)
        chunked_grads = torch.autograd.grad(chunked, list(model.parameters()))
    assert abs(chunked.item() - plain.item()) < 1e-3
    for a, b in zip(plain_grads, chunked_grads, strict=True):
        assert (a - b).abs().max() <= 1e-2 * a.abs().max() + 1e-6
