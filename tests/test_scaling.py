"""Scaling laws (llmstack/eval/scaling.py, scaling_law.py): the Chinchilla fit against known parameters and an outlier,
the compute-optimal frontier's calculus, and a real tiny sweep through the training loop (JSON, plots,
the held-out prediction written before its run, resumption without retraining)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from llmstack.data.shards import ShardIndex
from llmstack.eval import scaling
from llmstack.eval.scaling import SweepConfig, run_sweep
from llmstack.eval.scaling_law import CHINCHILLA, Law, fit_law
from llmstack.training.presets import model_for_depth

TRUE = Law(E=1.9, A=350.0, B=700.0, alpha=0.38, beta=0.3)
FAR = (5e7, 1e8)  # 10x the largest N and D of the synthetic grid: an extrapolation


def synthetic(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Losses from TRUE on a 5 x 4 grid of (N, D), with multiplicative log-normal noise."""
    N, D = np.meshgrid(np.geomspace(5e4, 5e6, 5), np.geomspace(1e5, 1e7, 4))
    N, D = N.ravel(), D.ravel()
    return N, D, TRUE.loss(N, D) * np.exp(np.random.default_rng(seed).normal(0, noise, N.shape))


def far_error(law: Law) -> float:
    return abs(law.loss(*FAR) / TRUE.loss(*FAR) - 1)


def test_fit_recovers_known_parameters_from_noisy_losses():
    law, objective = fit_law(*synthetic(0.002))
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.03)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.03)
    assert abs(law.E / TRUE.E - 1) < 0.1
    assert far_error(law) < 0.01
    assert objective < 1e-4


def test_huber_fit_shrugs_off_an_outlier_that_drags_least_squares():
    N, D, L = synthetic(0.002)
    L[7] *= 1.4  # one diverged run
    robust, _ = fit_law(N, D, L)
    least_squares, _ = fit_law(N, D, L, delta=10.0)  # Huber with a huge delta is plain squared error
    assert far_error(robust) < 0.01
    assert far_error(least_squares) > 3 * far_error(robust)
    assert robust.alpha == pytest.approx(TRUE.alpha, abs=0.03)


@pytest.mark.parametrize("C", [1e15, 1e19, 1e24])
def test_compute_optimal_point_is_the_minimum_on_its_iso_flop_line(C):
    n, d = CHINCHILLA.compute_optimal(C)
    assert 6 * n * d == pytest.approx(C)
    others = n * np.geomspace(0.05, 20, 401)
    assert CHINCHILLA.loss(n, d) <= CHINCHILLA.loss(others, C / (6 * others)).min() + 1e-12
    a, b = CHINCHILLA.exponents()
    assert (a, a + b) == pytest.approx((0.28 / 0.62, 1.0))
    n10, _ = CHINCHILLA.compute_optimal(10 * C)
    assert n10 / n == pytest.approx(10**a)


def test_a_tiny_real_sweep_writes_results_plots_and_resumes(shard_dir, tok, tmp_path, monkeypatch):
    sweep = SweepConfig(
        depths=(1, 2), steps=(3, 6), holdout=(3, 6), batch_size=4, seq_len=32, warmup_steps=1, eval_batches=2
    )
    shards = ShardIndex.load(shard_dir)
    quiet = dict(device="cpu", progress=False, log=lambda _: None, bootstrap=5)
    state = run_sweep(sweep, shards, tok, tmp_path, **quiet)

    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert saved == json.loads(json.dumps(state))
    assert set(saved["points"]) == {"d1_s3", "d1_s6", "d2_s3", "d2_s6"}
    ratios = set()
    for p in saved["points"].values():
        assert p["N"] == model_for_depth(p["depth"], tok.vocab_size, 32, head_dim=64).num_params(
            include_embedding=False
        )
        assert p["D"] == p["steps"] * 4 * 32 and p["C"] == 6 * p["N"] * p["D"]
        assert 0 < p["val_loss"] < 2 * math.log(tok.vocab_size)
        ratios.add(round(p["val_loss"] / p["val_bpb"], 9))  # the same val batches at every point
    assert len(ratios) == 1
    h = saved["holdout"]
    assert h["N"] > max(p["N"] for p in saved["points"].values())
    assert math.isfinite(h["predicted_loss"]) and math.isfinite(h["actual_loss"])
    assert h["error"] == pytest.approx(h["predicted_loss"] - h["actual_loss"])
    for png in ("fit.png", "frontier.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "points").glob("*/checkpoints"))  # recorded points keep no weights
    assert not list(tmp_path.glob("**/*.tmp"))

    # the 3-step budget branched off the 6-step run at its decay start, and ends where training it alone does
    assert saved["points"]["d1_s3"]["branched_at"] == 2 and saved["points"]["d1_s6"]["branched_at"] is None
    alone = scaling.train_point("alone", 1, 3, sweep, shards, tok, tmp_path / "alone", "cpu", False)
    assert alone["val_loss"] == pytest.approx(saved["points"]["d1_s3"]["val_loss"], rel=1e-6)

    trained = []
    real_train_point = scaling.train_point

    def counting(name, *args, **kwargs):
        trained.append(name)
        return real_train_point(name, *args, **kwargs)

    monkeypatch.setattr(scaling, "train_point", counting)
    again = run_sweep(sweep, shards, tok, tmp_path, **quiet)
    assert trained == []  # finished points and the trained held-out run are not retrained
    assert again["holdout"]["predicted_at"] == h["predicted_at"]

    run_sweep(replace(sweep, steps=(3, 6, 9)), shards, tok, tmp_path, **quiet)
    assert trained == ["d1_s9", "d2_s9"]

    with pytest.raises(ValueError, match="use another --out"):
        run_sweep(replace(sweep, batch_size=8), shards, tok, tmp_path, **quiet)
