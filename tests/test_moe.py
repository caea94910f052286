"""Mixtures of experts against ``transformers`` (Mixtral, Qwen2-MoE), and in our own training loop.

Tiny random models (2 layers, hidden 64, 4 experts, 2 per token, fp32, seeded): imported from a
``save_pretrained`` directory their logits equal transformers'; ours exported, transformers builds the same
class back with equal logits; transformers 5's fused in-memory expert layout loads too. The routing paths
(grouped by expert, and every expert at once under CUDA-graph capture) agree, decoding through the KV cache
equals the full forward, and the tiny preset trains as a mixture through ``run_pretrain`` with its routing in
metrics.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_families import _decode
from test_interop import _hf_greedy, _ids, _our_greedy, _same_greedy, _save_tokenizer_json

from llmstack.cli.main import main
from llmstack.inference.engine import Engine
from llmstack.inference.inspect import inspect_text
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.bundle import Bundle
from llmstack.interop.gguf import export_gguf, import_gguf
from llmstack.interop.hf import _moe_state, export_hf, import_hf
from llmstack.interop.load import load_run
from llmstack.model.config import ModelConfig, MoEConfig
from llmstack.model.llama import GPT
from llmstack.model.moe import MoE
from llmstack.training.metrics import read_metrics
from llmstack.training.presets import tiny, with_experts

transformers = pytest.importorskip("transformers")

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
CASES = {  # name -> (HF class name, config keywords)
    "mixtral": ("Mixtral", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2Moe",
        dict(
            intermediate_size=96,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
}


def _hf_model(name: str, vocab_size: int):
    kind, kw = CASES[name]
    cfg = getattr(transformers, f"{kind}Config")(vocab_size=vocab_size, **SHAPE, **kw)
    torch.manual_seed(sorted(CASES).index(name))
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # larger than HF's init: decisive logits, and routers that really choose
        for pname, p in model.named_parameters():
            p.normal_(0.0, 0.2 if p.ndim > 1 else 0.1) if "norm" not in pname else p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def moe_dir(request, tmp_path_factory, tok):
    model = _hf_model(request.param, tok.vocab_size)
    path = tmp_path_factory.mktemp("moe") / request.param
    model.save_pretrained(path)
    _save_tokenizer_json(tok, path)
    return request.param, path, model


def _batch(tok) -> torch.Tensor:
    ids = _ids(tok)
    return torch.cat([ids, ids.flip(1)])  # (2, 24)


def _ours(moe: MoEConfig, vocab_size: int, family: str = "mixtral", seed: int = 0) -> GPT:
    cfg = ModelConfig(vocab_size, 2, 64, 4, 2, moe.expert_size, 64, tie_embeddings=False, family=family, moe=moe)
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return model


# ----------------------------------------------------------------------------- transformers, both directions
def test_import_matches_transformers(moe_dir, tok):
    name, path, reference = moe_dir
    bundle = import_hf(path)
    cfg = bundle.model.config
    assert cfg.family == name and cfg.moe is not None
    assert (cfg.moe.n_experts, cfg.moe.n_active) == (4, 2)
    assert cfg.moe.shared_size == (80 if name == "qwen2_moe" else 0)
    assert cfg.attention_bias == (name == "qwen2_moe")  # Qwen2-MoE's q/k/v biases
    ids = _batch(tok)
    with torch.no_grad():
        assert (bundle.model(ids) - reference(ids).logits).abs().max() < 1e-4
    assert _same_greedy(_our_greedy(bundle.model, ids[:1], 12), _hf_greedy(reference, ids[:1], 12))


def test_transformers_fused_expert_layout_loads(moe_dir, tok):
    """transformers 5 holds experts as 3D tensors in memory (gate_up_proj, down_proj): split per expert."""
    _, path, reference = moe_dir
    ours = GPT(import_hf(path).model.config).eval()
    state = reference.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    ours.load_state_dict(_moe_state(dict(state), ours.config))
    ids = _batch(tok)
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_export_loads_back_in_transformers(family, tok, tmp_path):
    moe = MoEConfig(4, 2, 48, shared_size=40 if family == "qwen2_moe" else 0, norm_topk=family == "mixtral")
    model = _ours(moe, tok.vocab_size, family)
    out = export_hf(Bundle(model, tok, None, "<|bos|>", "<|assistant_end|>"), tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == ("MixtralForCausalLM" if family == "mixtral" else "Qwen2MoeForCausalLM")
    ids = _batch(tok)
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max() < 1e-4
    again = import_hf(out).model
    assert again.config == model.config


def test_gguf_round_trip_in_mixtral_layout(tok, tmp_path):
    """llama.cpp's Mixtral layout (stacked ``*_exps`` tensors): ours out and back with the same logits; a
    shared expert (Qwen2-MoE) is refused by name. (llama.cpp itself ran such a file: docs/moe.md.)"""
    model = _ours(MoEConfig(4, 2, 48), tok.vocab_size)
    bundle = Bundle(model, tok, None, "<|bos|>", "<|assistant_end|>")
    ids = _batch(tok)
    with torch.no_grad():
        want = model(ids)
        back = import_gguf(export_gguf(bundle, tmp_path / "m-f32.gguf", quant="f32")).model
        assert back.config.moe == model.config.moe and back.config.family == "mixtral"
        assert (back(ids) - want).abs().max() < 1e-5
        # q8_0: close, though rounding may flip a near-tied routing choice (and then one position's logits)
        got = import_gguf(export_gguf(bundle, tmp_path / "m-q8.gguf", quant="q8_0")).model(ids)
        assert (got - want).abs().median() < 0.05 and (got - want).norm() < 0.15 * want.norm()
    shared = _ours(MoEConfig(4, 2, 48, shared_size=40, norm_topk=False), tok.vocab_size, "qwen2_moe")
    with pytest.raises(ValueError, match="this model is Qwen2-MoE"):
        export_gguf(Bundle(shared, tok, None, "<|bos|>", "<|assistant_end|>"), tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


def test_routing_changes_the_logits(tok):
    """The parity above means something: the same weights with another top-k answer otherwise."""
    model = _ours(MoEConfig(4, 2, 48), tok.vocab_size)
    other = GPT(replace(model.config, moe=MoEConfig(4, 1, 48))).eval()  # the same weights, one expert per token
    other.load_state_dict(model.state_dict())
    ids = _batch(tok)
    with torch.no_grad():
        assert (model(ids) - other(ids)).abs().max() > 1e-2


# ----------------------------------------------------------------------------- routing and decoding
def test_every_expert_path_equals_the_routed_one(tok):
    model = _ours(MoEConfig(4, 2, 48), tok.vocab_size)
    moe = model.model.layers[0].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(37, 64)
    probs = moe.gate(x).softmax(-1)
    w, e = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    with torch.no_grad():
        routed, dense = moe._routed(x, w, e), moe._dense(x, w, e)
        by_hand = sum(
            w[:, k, None] * torch.stack([moe.experts[int(i)](x[n]) for n, i in enumerate(e[:, k])]) for k in range(2)
        )
    assert (routed - dense).abs().max() < 1e-5
    assert (routed - by_hand).abs().max() < 1e-5


def test_decoding_through_the_cache_equals_the_full_forward(tok):
    model = _ours(MoEConfig(4, 2, 48, shared_size=40, norm_topk=False), tok.vocab_size, "qwen2_moe")
    ids = _batch(tok)
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids)
        for static in (False, True):
            assert (_decode(model, ids, static) - full).abs().max() < 1e-4, static
    prompts = [ids[0, :20].tolist(), ids[0, :5].tolist(), ids[1, :13].tolist()]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    engine = Engine(model)
    assert engine.generate(prompts, greedy) == [engine.generate([p], greedy)[0] for p in prompts]


# ----------------------------------------------------------------------------- training
def test_balancing_loss_shapes_the_gradient_not_the_value(tok):
    ids = _batch(tok)
    grads, losses = [], []
    for coef in (0.0, 1.0):
        model = _ours(MoEConfig(4, 2, 48, aux_loss_coef=coef), tok.vocab_size).train()
        loss = model(ids[:, :-1], targets_BT=ids[:, 1:]) + model.balancing()
        loss.backward()
        losses.append(loss.item())
        grads.append(model.model.layers[0].mlp.gate.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)  # the logged loss stays the cross-entropy
    assert (grads[0] - grads[1]).abs().max() > 1e-4  # the balancing term reaches the router
    stats = model.train_stats()
    assert len(stats["moe_load"]) == 2 and sum(stats["moe_load"][0]) == pytest.approx(1.0)
    assert stats["moe_load_max"] >= 1.0 and stats["moe_aux"] >= 1.0 - 1e-6  # 1 when perfectly balanced
    assert model.train_stats() == {}  # read and reset


def test_collapsed_routing_costs_more_and_capacity_drops(tok):
    model = _ours(MoEConfig(4, 2, 48, capacity_factor=1.0), tok.vocab_size).train()
    moe = model.model.layers[0].mlp
    x = torch.randn(1, 64, 64)
    moe(x)
    balanced = moe.aux_loss.item()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] = 5 * x[0].mean(0) / x[0].mean(0).norm() ** 2  # every token prefers expert 0
    moe.read_stats()
    moe(x)
    assert moe.aux_loss.item() > balanced + 0.3
    load, dropped, _ = moe.read_stats()
    assert dropped > 0.1 and max(load) > 0.45
    model.eval()  # inference is dropless: the same input loses nothing
    moe(x)
    assert moe.read_stats() is None  # nor is it counted


def test_config_counts_and_refusals(tok):
    dense = tiny(tok.vocab_size)[0]
    cfg = with_experts(dense, 8, 2)
    model = GPT(cfg)
    assert cfg.family == "mixtral" and cfg.moe is not None and cfg.moe.expert_size == dense.intermediate_size // 2
    assert cfg.num_params() == model.num_params()
    assert cfg.num_params(active=True) == dense.num_params() + cfg.n_layer * 8 * cfg.n_embd  # + the routers
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="needs moe"):
        replace(cfg, moe=None)
    with pytest.raises(ValueError, match="has no moe"):
        replace(dense, moe=cfg.moe)
    with pytest.raises(ValueError, match="n_active must be between 1 and n_experts=4"):
        MoEConfig(4, 5, 48)
    with pytest.raises(ValueError, match="mixtral has no shared expert"):
        replace(cfg, moe=MoEConfig(8, 2, cfg.intermediate_size, shared_size=32))
    with pytest.raises(ValueError, match="must equal moe.expert_size"):
        replace(cfg, intermediate_size=cfg.intermediate_size + 1)
    with pytest.raises(ValueError, match="dense layers among the sparse"):
        ModelConfig.from_hf_dict(
            dict(
                model_type="qwen2_moe",
                vocab_size=64,
                num_hidden_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                intermediate_size=96,
                mlp_only_layers=[1],
            )
        )


def test_pretrain_experts_dial_trains_exports_and_refuses(tmp_path, tok, shard_dir, capsys):
    """``llmstack pretrain --experts``: the tiny preset as a mixture through the one loop, routing in the
    metrics, exported as a Mixtral that transformers runs with our logits; a bad dial is a clear error."""
    run = tmp_path / "moe"
    tok.save(run / "tokenizer")
    argv = ["pretrain", "--run-dir", str(run), "--shards", str(shard_dir), "--max-steps", "6", "--batch-size", "4"]
    argv += ["--seq-len", "64", "--eval-every", "3", "--experts", "4"]
    assert main(argv) == 0
    assert "2 of 4 experts of width 352" in capsys.readouterr().out
    recs = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
    assert len(recs) == 6 and all(len(r["moe_load"]) == 4 and len(r["moe_load"][0]) == 4 for r in recs)
    assert all(abs(sum(r["moe_load"][0]) - 1) < 1e-6 and r["moe_load_max"] >= 1 for r in recs)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "eval"] == [0, 3, 6]
    bundle = load_run(run)
    assert bundle.model.config.moe == MoEConfig(4, 2, tiny(tok.vocab_size)[0].intermediate_size // 2)
    assert main(["export", "--format", "hf", "--model", str(run), "--out", str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    ids = _batch(tok)
    with torch.no_grad():
        assert (back(ids).logits - bundle.model(ids)).abs().max() < 1e-4
    capsys.readouterr()
    assert main([*argv[:-1], "1", "--no-resume"]) == 2
    assert "n_experts must be at least 2" in capsys.readouterr().err


def test_inside_view_shows_the_experts_transformers_chooses(moe_dir, tok):
    """``inspect_text``'s routing (recomputed from each layer's input) names the experts transformers' own
    router picks (``output_router_logits``), with its weights; a dense model has none."""
    name, path, reference = moe_dir
    bundle = import_hf(path)
    ids = _batch(tok)[0]
    shown = inspect_text(bundle.model, ids.tolist(), bundle.tokenizer)["experts"]
    assert (shown["n"], shown["active"]) == (4, 2) and len(shown["routes"]) == 2
    with torch.no_grad():
        logits = reference(ids[None], output_router_logits=True).router_logits
    for layer, (routes, router_TE) in enumerate(zip(shown["routes"], logits, strict=True)):
        weight_TK, expert_TK = router_TE.float().softmax(-1).topk(2, dim=-1)
        if name == "mixtral":
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        assert [[e for e, _ in token] for token in routes] == expert_TK.tolist(), layer
        assert torch.allclose(torch.tensor([[w for _, w in token] for token in routes]), weight_TK, atol=1e-4)
        assert sum(shown["load"][layer]) == pytest.approx(1.0, abs=1e-3)
    dense = GPT(ModelConfig(tok.vocab_size, 1, 32, 4, 2, 64, 64))
    assert inspect_text(dense, ids.tolist(), bundle.tokenizer)["experts"] is None


def test_the_training_loop_applies_the_balancing_loss(tok, shard_dir, tmp_path):
    """However a stage computes its loss (here logits, then cross-entropy outside the model), the loop adds
    the balancing term: the same run with another coefficient logs the same first loss, then other routers."""
    from llmstack.data.shards import ShardIndex
    from llmstack.training.config import TrainConfig
    from llmstack.training.distributed import DistInfo
    from llmstack.training.loop import train
    from llmstack.training.pretrain import PretrainTask

    cpu = DistInfo(0, 0, 1, torch.device("cpu"))
    cfg = TrainConfig(max_steps=3, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=0, ckpt_every=0)
    routers, first = [], []
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        model = GPT(with_experts(ModelConfig(tok.vocab_size, 2, 32, 4, 2, 64, 64), 4, 2, aux_loss_coef=coef))
        task = PretrainTask(ShardIndex.load(shard_dir), tok, cfg, cpu)
        result = train(model, task, cfg, tmp_path / str(coef), cpu, meta={}, resume=False, progress=False)
        routers.append(model.model.layers[0].mlp.gate.weight.detach().clone())
        first.append(result.losses[0])
    assert first[0] == pytest.approx(first[1], abs=1e-6)
    assert (routers[0] - routers[1]).abs().max() > 1e-5
