"""End to end through the command line: tokenize, pretrain (1 process and 2 under torchrun), sample."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmstack.cli import build_parser, main
from llmstack.data.corpus import Document, write_jsonl
from llmstack.interop.load import load_model
from llmstack.training.metrics import read_metrics


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, texts):
    d = tmp_path_factory.mktemp("cli")
    write_jsonl([Document(f"d{i}", f"u{i}", t) for i, t in enumerate(texts)], d / "corpus.jsonl")
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--run-dir",
                str(d / "run"),
                "--corpus",
                str(d / "corpus.jsonl"),
                "--vocab-size",
                "400",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "tokenize",
                "--run-dir",
                str(d / "run"),
                "--corpus",
                str(d / "corpus.jsonl"),
                "--val-fraction",
                "0.1",
            ]
        )
        == 0
    )
    return d


TRAIN = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--warmup-steps", "1", "--lr", "0.003"]


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    for argv in (
        ["--help"],
        ["data", "fetch", "--help"],
        ["tokenizer", "train", "--help"],
        ["tokenizer", "show", "--help"],
        ["tokenize", "--help"],
        ["pretrain", "--help"],
        ["sample", "--help"],
        ["run", "--help"],
    ):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "torchrun --standalone --nproc_per_node 8" in out and "same seed, same text" in out


def test_pretrain_then_sample_is_seeded_and_streams(workdir, capsys):
    run = workdir / "run"
    assert main(["pretrain", "--run-dir", str(run), "--max-steps", "6", *TRAIN]) == 0
    capsys.readouterr()
    argv = ["sample", "--run-dir", str(run), "--prompt", "the model", "--seed", "7", "--max-new-tokens", "20"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("the model")
    assert main([*argv[:-4], "--seed", "8", "--max-new-tokens", "20", "--temperature", "1.5"]) == 0
    assert capsys.readouterr().out != first


def _torchrun_pretrain(run: Path, *flags: str) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    argv = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "llmstack.cli", "pretrain", "--run-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*argv, "--device", "cpu", *flags], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ddp_and_fsdp_two_cpu_processes_match_one_process_with_accumulation(workdir):
    single, ddp, fsdp = workdir / "single", workdir / "ddp", workdir / "fsdp"
    for d in (single, ddp, fsdp):
        shutil.copytree(workdir / "run" / "tokenizer", d / "tokenizer")
        shutil.copytree(workdir / "run" / "shards", d / "shards")
    assert main(["pretrain", "--run-dir", str(single), "--max-steps", "4", "--grad-accum", "2", *TRAIN]) == 0
    proc = _torchrun_pretrain(ddp, "--max-steps", "4", *TRAIN)
    _torchrun_pretrain(fsdp, "--max-steps", "4", "--parallel", "fsdp", *TRAIN)
    a, b, c = train_losses(single), train_losses(ddp), train_losses(fsdp)
    assert len(a) == len(b) == len(c) == 4
    # FSDP's AdamW runs the foreach kernels (the fused one takes no DTensors): equal to rounding, 3e-4 here
    assert all(abs(x - y) < 1e-4 and abs(x - z) < 2e-3 for x, y, z in zip(a, b, c, strict=True)), (a, b, c)
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["step"] == 4 and Path(summary["checkpoint"]).exists()
    # FSDP's checkpoint is whole tensors, as one process writes them; each run resumes to step 6 alike
    weights = {r: load_model(r).model.state_dict() for r in (single, fsdp)}
    # (a weight whose gradient is near 0 moves by about lr on a rounding difference: atol a few lr)
    assert all(torch.allclose(v, weights[fsdp][k], atol=1e-2) for k, v in weights[single].items())
    assert main(["pretrain", "--run-dir", str(single), "--max-steps", "6", "--grad-accum", "2", *TRAIN]) == 0
    _torchrun_pretrain(fsdp, "--max-steps", "6", "--parallel", "fsdp", *TRAIN)
    a, c = train_losses(single), train_losses(fsdp)
    assert len(a) == len(c) == 6 and all(abs(x - z) < 2e-3 for x, z in zip(a, c, strict=True)), (a, c)


def test_errors_are_clear_and_exit_2(workdir, tmp_path, capsys):
    assert main(["tokenizer", "train", "--run-dir", str(tmp_path), "--corpus", str(tmp_path / "nope.jsonl")]) == 2
    assert "llmstack data fetch" in capsys.readouterr().err
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--run-dir",
                str(tmp_path),
                "--corpus",
                str(workdir / "corpus.jsonl"),
                "--vocab-size",
                "100",
            ]
        )
        == 2
    )
    assert "vocab" in capsys.readouterr().err
    assert (
        main(
            [
                "pretrain",
                "--run-dir",
                str(tmp_path / "empty"),
                "--tokenizer",
                str(workdir / "run" / "tokenizer"),
            ]
        )
        == 2
    )
    assert "llmstack tokenize" in capsys.readouterr().err
    assert main(["sample", "--run-dir", str(tmp_path / "none")]) == 2
    assert "no such model file or directory" in capsys.readouterr().err


def test_prompt_longer_than_context_is_refused(workdir, capsys):
    run = workdir / "run"
    if not (run / "checkpoints").exists():
        assert main(["pretrain", "--run-dir", str(run), "--max-steps", "2", *TRAIN]) == 0
    assert main(["sample", "--run-dir", str(run), "--prompt", "the model " * 300]) == 2
    assert "the model's context is 256" in capsys.readouterr().err


def test_tokenizer_show(workdir, capsys):
    assert main(["tokenizer", "show", "the model 🙂", "--run-dir", str(workdir / "run"), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "|" in out and "tokens" in out
