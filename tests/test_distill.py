"""Logit distillation: the KL against torch.distributions, masks and top-k, training towards a teacher, the command."""

from __future__ import annotations

import pytest
import torch
from conftest import make_texts, tiny_model_config
from torch.distributions import Categorical, kl_divergence

from llmstack.chat.distill import run_distill
from llmstack.cli import main
from llmstack.data.corpus import Document, write_jsonl
from llmstack.data.shards import ShardIndex, write_shards
from llmstack.interop.bundle import llmstack_bundle, save_run
from llmstack.interop.load import load_model
from llmstack.model.llama import GPT
from llmstack.tokenizer import Tokenizer
from llmstack.training.config import TrainConfig
from llmstack.training.distill import DistillConfig, DistillTask, distill_loss, text_byte_lengths
from llmstack.training.distributed import DistInfo
from llmstack.training.loop import train
from llmstack.training.metrics import read_metrics
from llmstack.training.pretrain import token_byte_lengths

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
TRAIN = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--warmup-steps", "1", "--dtype", "float32"]


def logits(seed: int, shape=(2, 5, 11), scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_forward_and_reverse_kl_match_torch_distributions():
    s, t = logits(0), logits(1)
    forward = kl_divergence(Categorical(logits=t), Categorical(logits=s)).mean()
    reverse = kl_divergence(Categorical(logits=s), Categorical(logits=t)).mean()
    assert distill_loss(s, t, kind="forward") == pytest.approx(float(forward), rel=1e-5)
    assert distill_loss(s, t, kind="reverse") == pytest.approx(float(reverse), rel=1e-5)
    assert float(forward) != pytest.approx(float(reverse), rel=1e-2)  # the two directions are different losses


def test_temperature_scales_both_softmaxes_and_multiplies_by_t_squared():
    s, t = logits(2), logits(3)
    expected = 4.0 * kl_divergence(Categorical(logits=t / 2), Categorical(logits=s / 2)).mean()
    assert distill_loss(s, t, temperature=2.0) == pytest.approx(float(expected), rel=1e-5)


def test_top_k_renormalises_over_the_teachers_top_tokens():
    s, t = logits(4), logits(5)
    V = s.size(-1)
    for kind in ("forward", "reverse"):
        assert distill_loss(s, t, kind=kind, top_k=V) == pytest.approx(float(distill_loss(s, t, kind=kind)), rel=1e-5)
    ids = t.topk(3, dim=-1).indices
    p = Categorical(logits=t.gather(-1, ids))  # the teacher over its top 3, renormalised
    q = Categorical(logits=s.gather(-1, ids))  # the student at those ids, renormalised over them
    assert distill_loss(s, t, top_k=3) == pytest.approx(float(kl_divergence(p, q).mean()), rel=1e-5)
    assert distill_loss(s, t, kind="reverse", top_k=3) == pytest.approx(float(kl_divergence(q, p).mean()), rel=1e-5)


def test_identical_logits_give_zero_loss_and_zero_gradient():
    for kind in ("forward", "reverse"):
        s = logits(6).requires_grad_(True)
        loss = distill_loss(s, s.detach().clone(), kind=kind, top_k=4)
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        assert s.grad is not None and s.grad.abs().max() < 1e-6


def test_the_mask_leaves_positions_out():
    s, t = logits(7), logits(8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    per_token = kl_divergence(Categorical(logits=t), Categorical(logits=s))  # (B, T)
    assert distill_loss(s, t, mask) == pytest.approx(float(per_token[mask].mean()), rel=1e-5)
    s2 = s.clone()
    s2[~mask] = 100.0 * torch.randn_like(s2[~mask])  # what happens outside the mask does not count
    assert float(distill_loss(s2, t, mask)) == pytest.approx(float(distill_loss(s, t, mask)), rel=1e-6)
    with pytest.raises(ValueError, match="same vocabulary"):
        distill_loss(s, logits(9, (2, 5, 12)))


def test_byte_lengths_agree_with_pretrainings(tok):
    assert torch.equal(text_byte_lengths(tok), token_byte_lengths(tok))


def sharp_teacher(vocab_size: int) -> GPT:
    """A random model whose next-token distributions are far from uniform, hence far from a fresh student's."""
    torch.manual_seed(123)
    teacher = GPT(tiny_model_config(vocab_size, tie_embeddings=False))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)
    return teacher


def test_distillation_brings_the_student_to_the_teacher(tok, shard_dir, tmp_path):
    cfg = TrainConfig(max_steps=30, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0,
                      eval_batches=2, dtype="float32", seed=3)  # fmt: skip
    evals = {}
    for alpha in (0.0, 1.0):  # the teacher's KL alone; cross-entropy alone (the same student, data and steps)
        teacher = sharp_teacher(tok.vocab_size)
        torch.manual_seed(0)
        student = GPT(tiny_model_config(tok.vocab_size))
        task = DistillTask(teacher, ShardIndex.load(shard_dir), tok, DistillConfig(alpha=alpha), cfg, CPU)
        meta = {"stage": "distill", "tokenizer_fingerprint": tok.fingerprint}
        result = train(student, task, cfg, tmp_path / str(alpha), CPU, meta=meta, progress=False)
        evals[alpha] = result.evals
        assert sum(result.losses[-5:]) / 5 < result.losses[0]
        assert not any(p.requires_grad for p in teacher.parameters())
    (first, kd), (_, ce) = evals[0.0], evals[1.0]
    assert kd["val_kl"] < 0.7 * first["val_kl"]  # measured: 0.62 -> 0.36
    assert ce["val_kl"] > first["val_kl"]  # the text alone leads elsewhere (-> 1.25): this teacher is random
    assert kd["teacher_bpb"] == first["teacher_bpb"] == ce["teacher_bpb"]  # the teacher is frozen


def test_shards_of_another_tokenizer_are_refused(tok, texts, tmp_path):
    other = Tokenizer.train(texts, 300)
    shards = write_shards(
        ((f"d{i}", t) for i, t in enumerate(texts)), other, tmp_path, val_fraction=0.1, progress=False
    )
    with pytest.raises(ValueError, match="teacher's"):
        DistillTask(sharp_teacher(tok.vocab_size), shards, tok, DistillConfig(), TrainConfig(seq_len=32), CPU)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("teacher") / "run"
    save_run(llmstack_bundle(sharp_teacher(tok.vocab_size), tok), out, "test: a sharp random teacher")
    return out


def test_a_student_with_another_tokenizer_is_refused(tok, texts, teacher_run, shard_dir, tmp_path):
    other = Tokenizer.train(texts, 300)
    student = tmp_path / "student"
    save_run(llmstack_bundle(GPT(tiny_model_config(other.vocab_size)), other), student, "test: another tokenizer")
    with pytest.raises(ValueError, match="different tokenizers"):
        run_distill(teacher_run, student, tmp_path / "out", shards=shard_dir, log=lambda _: None)


def test_the_command_distills_into_a_run_that_loads(teacher_run, tok, tmp_path):
    corpus = tmp_path / "corpus.jsonl"  # no shards given: the command tokenizes this into <out>/shards
    write_jsonl([Document(f"d{i}", f"u{i}", t) for i, t in enumerate(make_texts(200, seed=1))], corpus)
    out = tmp_path / "kd"
    args = ["distill", "--teacher", str(teacher_run), "--student-depth", "1", "--corpus", str(corpus)]
    assert main([*args, "--out", str(out), "--top-k", "16", "--alpha", "0.1", "--max-steps", "3", *TRAIN]) == 0
    bundle = load_model(out)
    assert bundle.tokenizer.fingerprint == tok.fingerprint and bundle.meta["stage"] == "distill"
    assert bundle.meta["distill"] == {"kind": "forward", "top_k": 16, "temperature": 1.0, "alpha": 0.1}
    assert (out / "shards" / "index.json").exists() and bundle.model.config.n_layer == 1
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3] and all("val_kl" in e for e in evals)

    base = tmp_path / "ce"  # the baseline: the same fresh student (same seed) on the same shards, no teacher
    more = ["--shards", str(out / "shards"), "--out", str(base), "--no-teacher", "--max-steps", "3", *TRAIN]
    assert main([*args, *more]) == 0
    baseline = [r for r in read_metrics(base / "metrics.jsonl") if r["kind"] == "eval"]
    assert baseline[0]["val_bpb"] == pytest.approx(evals[0]["val_bpb"])  # one initialisation for both
    assert load_model(base).meta["distill"]["alpha"] == 1.0
