"""Muon beside AdamW: the Newton-Schulz iteration against an SVD, one step against the published update
written out by hand, exact resumption, learning, and the training loop's checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import tiny_model_config

from llmstack.data.shards import ShardIndex
from llmstack.model.llama import GPT
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo
from llmstack.training.loop import train
from llmstack.training.optim import MuonAdamW, build_optimizer, newton_schulz
from llmstack.training.pretrain import PretrainTask

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def conditioned_square(n: int) -> torch.Tensor:
    """A square matrix with singular values 0.05..1 (a random square one has some near 0, which five
    iterations cannot lift into the band, by design: they only grow ~3.4x per iteration)."""
    U, _ = torch.linalg.qr(torch.randn(n, n))
    V, _ = torch.linalg.qr(torch.randn(n, n))
    return U @ torch.diag(torch.linspace(0.05, 1.0, n)) @ V.T


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (48, 96), (64, 64)])
def test_newton_schulz_is_near_orthogonal_with_the_svd_singular_vectors(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape) if shape[0] != shape[1] else conditioned_square(shape[0])
    X = newton_schulz(G)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.mT @ X @ Vh.mT  # X = U f(S) V^T: diagonal in G's singular bases
    off_diagonal = D - torch.diag(torch.diagonal(D))
    assert off_diagonal.abs().max() < 1e-4
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())  # the quintic's band, not exactly 1
    # a batch is orthogonalised matrix by matrix
    batch = torch.stack([G, 2 * G.flip(0)])
    out = newton_schulz(batch)
    assert torch.allclose(out[0], X, atol=1e-5) and torch.allclose(out[1], newton_schulz(2 * G.flip(0)), atol=1e-5)


def reference_ns(G: torch.Tensor) -> torch.Tensor:
    """The published quintic iteration, written out independently of the optimizer."""
    X = G / G.norm()
    flip = X.shape[0] > X.shape[1]
    if flip:
        X = X.T
    for _ in range(5):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return X.T if flip else X


def test_one_and_two_steps_equal_the_update_by_hand():
    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-3, optimizer="muon", muon_lr=0.02, muon_momentum=0.95, weight_decay=0.1)
    model = GPT(tiny_model_config(64, tie_embeddings=False))
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    w_up, w_emb, w_norm = model.model.layers[0].mlp.up_proj.weight, model.lm_head.weight, model.model.norm.weight
    before = {n: p.detach().clone() for n, p in (("up", w_up), ("emb", w_emb), ("norm", w_norm))}
    grads = []
    m, b1, b2, eps = 0.95, cfg.beta1, cfg.beta2, 1e-8
    lr_now = 0.5 * cfg.lr  # what the loop writes into every group mid-warmup
    for _ in range(2):
        x = torch.randint(0, 64, (2, 16))
        model(x, targets_BT=x.roll(-1, 1)).backward()
        grads.append({n: p.grad.clone() for n, p in (("up", w_up), ("emb", w_emb), ("norm", w_norm))})
        for group in opt.param_groups:
            group["lr"] = lr_now
        opt.step()
        opt.zero_grad()
    g1, g2 = grads

    # Muon on a (rows 64) x (cols 32) matrix: Nesterov momentum, orthogonalise, scale by sqrt(rows / cols)
    muon_lr = lr_now * cfg.muon_lr / cfg.lr
    buf1 = (1 - m) * g1["up"]
    buf2 = m * buf1 + (1 - m) * g2["up"]
    up = before["up"] - muon_lr * math.sqrt(64 / 32) * reference_ns((1 - m) * g1["up"] + m * buf1)
    up = up - muon_lr * math.sqrt(64 / 32) * reference_ns((1 - m) * g2["up"] + m * buf2)
    assert torch.allclose(w_up, up, atol=1e-6, rtol=0)
    assert (w_up - before["up"]).abs().max() > 1e-4  # it did move

    # AdamW with bias correction; decoupled weight decay on the head, none on the norm gain
    def adamw(w, ga, gb, wd):
        m1, v1 = (1 - b1) * ga, (1 - b2) * ga**2
        w = w * (1 - lr_now * wd) - lr_now * (m1 / (1 - b1)) / ((v1 / (1 - b2)).sqrt() + eps)
        m2, v2 = b1 * m1 + (1 - b1) * gb, b2 * v1 + (1 - b2) * gb**2
        return w * (1 - lr_now * wd) - lr_now * (m2 / (1 - b1**2)) / ((v2 / (1 - b2**2)).sqrt() + eps)

    assert torch.allclose(w_emb, adamw(before["emb"], g1["emb"], g2["emb"], 0.1), atol=1e-7, rtol=0)
    assert torch.allclose(w_norm, adamw(before["norm"], g1["norm"], g2["norm"], 0.0), atol=1e-7, rtol=0)


def test_parameters_split_by_role():
    model = GPT(tiny_model_config(64))  # tied: one embedding matrix serves as the head
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    kinds = {id(p): g["kind"] for g in opt.param_groups for p in g["params"]}
    assert len(kinds) == len({id(p) for p in model.parameters()})
    assert kinds[id(model.model.embed_tokens.weight)] == "adamw"
    assert kinds[id(model.model.norm.weight)] == "adamw"
    assert kinds[id(model.model.layers[1].self_attn.k_proj.weight)] == "muon"
    assert sum(k == "muon" for k in kinds.values()) == 2 * 7  # q, k, v, o, gate, up, down per layer
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, TrainConfig(optimizer="sgd"), torch.device("cpu"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [model.model.norm.weight], "kind": "muon"}], lr=0.1)


def steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 64, (2, 16), generator=g)
        model(x, targets_BT=x.roll(-1, 1)).backward()
        opt.step()
        opt.zero_grad()


def test_state_dict_round_trip_resumes_bit_identically():
    torch.manual_seed(0)
    cfg = TrainConfig(optimizer="muon", lr=1e-3)
    model = GPT(tiny_model_config(64))
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    steps(model, opt, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    steps(model, opt, 3, seed=2)

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = GPT(tiny_model_config(64))
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, cfg, torch.device("cpu"))
    opt2.load_state_dict(saved["opt"])
    steps(resumed, opt2, 3, seed=2)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def run(tok, shard_dir, run_dir, n, **kw):
    cfg = TrainConfig(
        max_steps=n,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=0,
        ckpt_every=0,
        eval_batches=2,
        seed=5,
        optimizer="muon",
    )
    torch.manual_seed(cfg.seed)
    model = GPT(tiny_model_config(tok.vocab_size))
    task = PretrainTask(ShardIndex.load(shard_dir), tok, cfg, CPU)
    meta = {"stage": "pretrain", "tokenizer_fingerprint": tok.fingerprint}
    return train(model, task, cfg, run_dir, CPU, meta=meta, progress=False, **kw), model


def test_muon_training_lowers_the_loss_and_resumes_from_a_checkpoint(tok, shard_dir, tmp_path):
    straight, m1 = run(tok, shard_dir, tmp_path / "a", 30)
    assert sum(straight.losses[-5:]) / 5 < straight.losses[0] - 1.0
    assert straight.evals[-1]["val_bpb"] < straight.evals[0]["val_bpb"]
    first, _ = run(tok, shard_dir, tmp_path / "b", 30, stop_at=12)  # saves a checkpoint at step 12
    second, m2 = run(tok, shard_dir, tmp_path / "b", 30)  # loads it, Muon's momentum included
    assert first.losses + second.losses == straight.losses
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_newton_schulz_in_bf16_on_cuda_stays_in_the_band():
    torch.manual_seed(0)
    G = torch.randn(4, 768, 2048, device="cuda")
    X = newton_schulz(G)
    assert X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())
