"""The shared training loop: learning, exact resumption, atomic checkpoints, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model_config

from llmstack.data.shards import ShardIndex
from llmstack.model.llama import GPT
from llmstack.training import checkpoint as ckpt_io
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo
from llmstack.training.loop import train
from llmstack.training.metrics import read_metrics
from llmstack.training.optim import lr_at
from llmstack.training.pretrain import PretrainTask, bits_per_byte, token_byte_lengths

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def run(tok, shard_dir, run_dir, steps, *, resume=True, stop_at=None, **kw):
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=kw.pop("eval_every", 0),
        ckpt_every=kw.pop("ckpt_every", 0),
        eval_batches=2,
        seed=5,
        **kw,
    )
    torch.manual_seed(cfg.seed)
    model = GPT(tiny_model_config(tok.vocab_size))
    task = PretrainTask(ShardIndex.load(shard_dir), tok, cfg, CPU)
    meta = {"stage": "pretrain", "tokenizer_fingerprint": tok.fingerprint}
    return train(model, task, cfg, run_dir, CPU, meta=meta, resume=resume, progress=False, stop_at=stop_at), model


def test_loss_falls_and_metrics_are_written(tok, shard_dir, tmp_path):
    result, _ = run(tok, shard_dir, tmp_path, 40)
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 1.0
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 40]
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert ckpt_io.find_checkpoint(tmp_path).name == "step_000040"


def test_tensorboard_log_holds_the_same_numbers_as_metrics_jsonl(tok, shard_dir, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result, _ = run(tok, shard_dir, tmp_path, 6, log="tensorboard", eval_every=3)
    board = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    losses = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert losses == [(i + 1, pytest.approx(loss, rel=1e-6)) for i, loss in enumerate(result.losses)]
    evals = [(r["step"], r["val_bpb"]) for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in board.Scalars("eval/val_bpb")] == evals
    assert {"train/lr", "train/grad_norm", "train/tok_per_s"} <= set(board.Tags()["scalars"])
    with pytest.raises(ValueError, match="log must be 'jsonl' or 'tensorboard'"):
        TrainConfig(log="wandb")  # type: ignore[arg-type]


def test_resume_gives_identical_losses(tok, shard_dir, tmp_path):
    straight, m1 = run(tok, shard_dir, tmp_path / "a", 12, grad_accum=2)
    first, _ = run(tok, shard_dir, tmp_path / "b", 12, grad_accum=2, stop_at=6)
    # the same run, asked for 12 steps, continues from the step-6 checkpoint
    second, m2 = run(tok, shard_dir, tmp_path / "b", 12, grad_accum=2)
    assert first.losses + second.losses == straight.losses
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_resume_refuses_another_tokenizer(tok, shard_dir, tmp_path):
    run(tok, shard_dir, tmp_path, 2)
    cfg = TrainConfig(max_steps=4, batch_size=4, seq_len=32, eval_batches=1)
    task = PretrainTask(ShardIndex.load(shard_dir), tok, cfg, CPU)
    with pytest.raises(ValueError, match="trained with tokenizer"):
        train(
            GPT(tiny_model_config(tok.vocab_size)),
            task,
            cfg,
            tmp_path,
            CPU,
            meta={"tokenizer_fingerprint": "0" * 64},
            progress=False,
        )


def test_checkpoint_errors_name_the_file(tok, shard_dir, tmp_path):
    run(tok, shard_dir, tmp_path, 3)
    ckpt = ckpt_io.find_checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: unreadable checkpoint weights"):
        ckpt_io.load_gpt(tmp_path)
    (ckpt / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta.json: not valid JSON"):
        ckpt_io.load_gpt(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ckpt_io.load_gpt(tmp_path / "missing")


def test_checkpoint_of_another_shape_is_refused(tok, shard_dir, tmp_path):
    run(tok, shard_dir, tmp_path, 2)
    ckpt = ckpt_io.load_meta(tmp_path)
    wrong = GPT(tiny_model_config(tok.vocab_size, n_embd=64))
    with pytest.raises(ValueError, match="has shape"):
        ckpt_io.load_model_weights(wrong, ckpt)


def test_failed_save_keeps_the_previous_checkpoint(tok, shard_dir, tmp_path, monkeypatch):
    run(tok, shard_dir, tmp_path, 2)
    before = ckpt_io.find_checkpoint(tmp_path)
    model, ckpt = ckpt_io.load_gpt(tmp_path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_checkpoint(tmp_path, 3, model, None, ckpt.meta)
    assert ckpt_io.find_checkpoint(tmp_path) == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    ckpt_io.load_gpt(tmp_path)  # still loads


def test_rotation_deletes_only_checkpoints_older_than_the_one_written(tok, tmp_path):
    model = GPT(tiny_model_config(tok.vocab_size))
    meta = {"model_config": model.config.to_dict()}
    for step in (999_998, 999_999, 1_000_000):  # ordered by step, not by name ("step_1000000" < "step_999998")
        ckpt_io.save_checkpoint(tmp_path, step, model, None, meta, keep=2)

    def names() -> list[str]:
        return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    assert names() == ["LATEST", "step_1000000", "step_999999"]
    ckpt_io.save_checkpoint(tmp_path, 1_000_001, model, None, meta, keep=1, protect={"step_999999"})
    assert names() == ["LATEST", "step_1000001", "step_999999"]
    ckpt_io.save_checkpoint(tmp_path, 3, model, None, meta, keep=1)  # newer checkpoints are never rotated away
    assert names() == ["LATEST", "step_000003", "step_1000001", "step_999999"]
    assert ckpt_io.find_checkpoint(tmp_path).name == "step_000003"


def test_lr_schedules():
    cos = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(55, cos) == pytest.approx(0.55) and lr_at(100, cos) == pytest.approx(0.1)
    wsd = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(89, wsd) == pytest.approx(0.5) and lr_at(99, wsd) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")  # type: ignore[arg-type]


def test_bits_per_byte_of_a_uniform_model(tok):
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, tok.vocab_size)

    ids = torch.tensor([[tok.bos_id, *tok.encode_ordinary("hello world, the model")]])
    x, y = ids[:, :-1], ids[:, 1:]
    lengths = token_byte_lengths(tok)
    n_bytes = int(lengths[y].sum())
    expected = y.numel() * math.log2(tok.vocab_size) / n_bytes
    assert bits_per_byte(Uniform(), [(x, y)], lengths, torch.device("cpu")) == pytest.approx(expected)
    assert lengths[tok.bos_id] == 0 and n_bytes == len(b"hello world, the model")


def test_chunked_cross_entropy_trains_like_the_plain_loss(tok, shard_dir, tmp_path):
    """--chunked-ce (the d12/d20 presets' default) follows the plain loss step for step through the loop."""
    plain, m1 = run(tok, shard_dir, tmp_path / "plain", 8)
    chunked, m2 = run(tok, shard_dir, tmp_path / "chunked", 8, chunked_ce=True)
    assert chunked.losses == pytest.approx(plain.losses, abs=1e-4)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4), k
