"""The report card (llmstack/eval/report.py) on run directories built here: every section from the files a
run leaves, a missing or broken file as a "not available" line, never an error."""

from __future__ import annotations

import json
import random

import pytest

from llmstack.cli import main
from llmstack.data.refine import STAGES
from llmstack.data.shards import write_shards
from llmstack.eval import report
from llmstack.eval.report import PASS1_LABEL, REWARD_LABEL, SECTIONS, write_report_card
from llmstack.tokenizer.bpe import format_ranks

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSTACK_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LLMSTACK_RUNS", str(tmp_path / "runs"))
    return tmp_path / "data", tmp_path / "runs"


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def rl_metrics(steps: int = 30, eval_every: int = 10) -> list[dict]:
    """What GRPO's stage writes (llmstack/rl/grpo.py, the loop): per step a ``kind: rl`` record (reward,
    solved, kl, ...) and a ``kind: train`` one (the policy loss, near zero); ``kind: eval`` records with
    held-out pass@1 / pass@8 at step 0 (the SFT model) and every ``eval_every`` steps."""
    rng = random.Random(0)
    recs: list[dict] = []
    for s in range(1, steps + 1):
        reward = rng.uniform(0.2, 0.8)
        recs.append({"kind": "rl", "step": s, "reward": reward, "solved": reward / 2, "kl": 0.01, "entropy": 1.0})
        recs.append({"kind": "train", "step": s, "loss": rng.uniform(-1e-3, 1e-3), "tok_per_s": 500.0, "dt": 2.0})
    for s in range(0, steps + 1, eval_every):
        recs.append({"kind": "eval", "step": s, "pass@1": rng.uniform(0.3, 0.7), "pass@8": 0.9})
    return recs


@pytest.fixture
def fake_run(dirs, tok, texts):
    """A run as the main job leaves it (base, SFT, a broken RL eval), a pipeline's stats, a corpus, a sweep."""
    data, runs = dirs
    run = runs / "fake"
    tok.save(run / "tokenizer")
    write_shards(((f"doc{i}", t) for i, t in enumerate(texts)), tok, run / "shards", val_fraction=0.1, progress=False)
    (run / "summary.json").write_text(
        json.dumps(
            {
                "preset": "tiny",
                "params": 123456,
                "steps": 20,
                "val_bpb_initial": 3.5,
                "val_bpb_final": 2.0,
                "seconds": {"pretrain": 30.0, "data": 1.0, "sft": 20.0},
                "assistant": {"identity": 0.5},
            }
        )
    )
    _jsonl(
        run / "metrics.jsonl",
        [{"kind": "train", "step": s, "loss": 8 - s / 5, "tok_per_s": 1000.0, "dt": 0.5} for s in range(1, 21)]
        + [{"kind": "eval", "step": s, "val_bpb": 3.5 - s / 15} for s in (0, 10, 20)],
    )
    _jsonl(
        run / "sft" / "metrics.jsonl",
        [{"kind": "train", "step": s, "loss": 5 - s / 5, "dt": 0.5} for s in range(1, 11)]
        + [{"kind": "eval", "step": s, "val_loss": 5 - s / 4} for s in (0, 10)],
    )
    (run / "sft" / "eval.json").write_text(
        json.dumps({"identity": {"accuracy": 0.5, "correct": 9, "total": 18, "interval": [0.29, 0.71]}})
    )
    (run / "sft" / "eval_tasks.json").write_text(
        json.dumps(
            {
                "model": "fake/sft",
                "results": [
                    {"task": "heldout_bpb", "metric": "bpb", "score": 2.25, "interval": [2.2, 2.3], "n": 40},
                    {"task": "winowhy", "metric": "acc", "score": 0.52, "interval": [0.45, 0.59], "n": 200},
                    {"task": "broken", "metric": "acc", "score": None, "n": 0},
                ],
            }
        )
    )
    _jsonl(run / "rl" / "metrics.jsonl", rl_metrics())
    (run / "rl" / "eval.json").write_text("{not json")
    stats = {
        "stages": {
            s: {"docs_in": 10, "docs_out": 8, "bytes_in": 1e6, "bytes_out": 8e5, "seconds": 1.0} for s in STAGES
        },
        "drops": {s: {"too_short": 2} for s in STAGES},
    }
    (data / "pipeline" / "run").mkdir(parents=True)
    (data / "pipeline" / "run" / "stats.json").write_text(json.dumps(stats))
    _jsonl(data / "corpus" / "web.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts[:7])])
    (data / "assets").mkdir()
    (data / "assets" / "gpt2.tiktoken").write_bytes(format_ranks(tok.mergeable_ranks))  # "GPT-2" = our ranks
    point = {"N": 1000, "D": 5000, "C": 3e7, "val_loss": 5.5, "val_bpb": 2.5, "seconds": 3.0}
    (runs / "scaling" / "mini").mkdir(parents=True)
    (runs / "scaling" / "mini" / "scaling.json").write_text(json.dumps({"points": {"d1_s5": point}, "plots": []}))
    return run


def section(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


def test_report_card_reads_every_piece_of_a_run(fake_run, capsys):
    assert main(["report", "--run", str(fake_run)]) == 0
    out = fake_run / "report"
    assert str(out / "report.md") in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == [t for t, _ in SECTIONS]

    assert "| python |" in section(md, "Environment") and "| cores |" in section(md, "Environment")
    run = section(md, "The run")
    assert "| val bits/byte | 3.500 -> 2.000 |" in run and "| assistant: identity | 50.0% |" in run
    stages = [line.split("|")[1].strip() for line in run.splitlines() if line.startswith("| ") and "s |" not in line]
    assert stages[-4:] == ["data", "pretrain", "sft", "total"]  # pipeline order, not the JSON's

    data = section(md, "Data")
    assert "| too_short 2 |" in data and "| 7 |" in data  # the pipeline's table; the corpus's documents
    assert "| train |" in data and "| val |" in data

    tok_rows = [line for line in section(md, "Tokenizer").splitlines() if line.startswith("| val split")]
    assert tok_rows and tok_rows[0].endswith("| 1.00 |")  # the same ranks compress the same

    training = section(md, "Training")
    assert "| base | 20 | loss 7.800 -> 4.000 | val bits/byte: 3.500 -> 2.167 | 1,000 | 10 |" in training
    assert "| sft | 10 |" in training and "val loss (nats/token): 5.000 -> 2.500" in training
    rl = [r for r in rl_metrics() if r["kind"] == "rl"]
    passes = [r["pass@1"] for r in rl_metrics() if r["kind"] == "eval"]
    reward_cell = f"mean reward {rl[0]['reward']:.3f} -> {rl[-1]['reward']:.3f}"
    assert f"| rl | 30 | {reward_cell} | pass@1: {passes[0]:.1%} -> {passes[-1]:.1%} | 500 | 60 |" in training

    evals = section(md, "Evaluation")
    assert "| task | metric | sft | sft (eval_tasks) |" in evals
    assert "| identity | accuracy | 50.0% [29.0%, 71.0%] of 18 |  |" in evals
    assert "| heldout_bpb | bpb |  | 2.250 [2.200, 2.300] of 40 |" in evals
    assert "broken" not in evals  # a row without a score is left out
    assert "rl/eval.json`: not available:" in evals and "not valid JSON" in evals

    assert section(md, "Arena").startswith("not available:") and "battles.jsonl" in section(md, "Arena")
    assert "d1_s5" in section(md, "Scaling laws")
    for png in ("timings.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG
        assert f"]({png})" in md
    assert not list(out.glob(".*.tmp"))


def test_an_empty_run_gets_a_card_of_reasons(dirs, tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    md = write_report_card(run, tmp_path / "card").read_text()
    for title, _ in SECTIONS[1:]:
        body = section(md, title)
        assert "not available" in body, title
    assert "summary.json is missing" in section(md, "The run")
    assert "llmstack data fetch --assets-only" in section(md, "Tokenizer")


def test_report_of_a_missing_run_is_an_error(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_rl_panel_plots_reward_and_heldout_pass_at_1(tmp_path, monkeypatch):
    """The RL stage's panel draws the rollouts' mean reward per step and pass@1 at each evaluation, read from
    its metrics.jsonl, and not the policy loss (near zero by construction)."""
    run, recs = tmp_path / "run", rl_metrics()
    _jsonl(run / "metrics.jsonl", [{"kind": "train", "step": s, "loss": 8 - s / 5} for s in range(1, 11)])
    _jsonl(run / "rl" / "metrics.jsonl", recs)
    figures = []
    real_save_png = report.save_png

    def keep(fig, path, *args):
        figures.append(fig)
        return real_save_png(fig, path, *args)

    monkeypatch.setattr(report, "save_png", keep)
    report.loss_curves(run, tmp_path / "card")
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["base", "rl"]
    rl = fig.axes[1]
    lines = {line.get_label(): line for line in rl.get_lines()}

    rewards = [(r["step"], r["reward"]) for r in recs if r["kind"] == "rl"]
    passes = [(r["step"], r["pass@1"]) for r in recs if r["kind"] == "eval"]
    for label, points in ((REWARD_LABEL, rewards), (PASS1_LABEL, passes)):
        x, y = zip(*points, strict=True)
        assert list(lines[label].get_xdata()) == list(x), label
        assert list(lines[label].get_ydata()) == pytest.approx(y), label
    assert passes[0][0] == 0  # the SFT model's pass@1 is the curve's start
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    for line in rl.get_lines():
        assert list(line.get_ydata()) != pytest.approx(losses)
    assert (tmp_path / "card" / "loss_curves.png").read_bytes()[:8] == PNG
