"""The arena: two anonymous models answer one prompt, someone picks the better answer, ratings follow.

A battle is a prompt, two answers (sides ``a`` and ``b``) and a verdict: ``a``, ``b``, ``tie`` or
``both_bad`` (a tie in which neither answer was good). People vote in the web UI (``llmstack serve``,
the Battle tab); automatic judges vote in ``arena_battle.py``. Every battle is appended to a battle
log, one JSON object a line (default ``data/arena/battles.jsonl``); a line that is not a valid
battle is reported with its line number and left out, never fatal.

Ratings, scaled the way LM Arena scales them (400 points per factor of 10 in the odds of winning,
the anchor model pinned at a base rating):

* Bradley-Terry by maximum likelihood: P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / 400)), a tie
  counting as half a win for each side; fitted by Newton's method on the wins matrix (the
  log-likelihood is concave). The MLE is finite only when every group of models has won or tied at
  least one game against the rest; ``prior`` adds that many tied games between every pair (a weak
  pull towards equal ratings) for logs too small for that. ``prior=0`` is the pure MLE.
* 95% intervals from the bootstrap: the battles resampled with replacement and refitted.
* online Elo, for comparison: it depends on the order of the battles; Bradley-Terry does not.

What is not here: style control (answer length as a covariate), per-category boards, and choosing
which pair to play next from the intervals.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmstack.io import pyplot, save_png
from llmstack.paths import data_dir

WINNERS = ("a", "b", "tie", "both_bad")
"""``a`` / ``b``: that side won; ``tie``: both as good; ``both_bad``: a tie where both were bad."""
SCALE = 400.0  # rating points per factor of 10 in the odds
BASE = 1000.0  # the anchor model's rating
DEFAULT_ANCHOR = "smollm2"  # a fixed outside model, so boards of different runs line up


def default_log() -> Path:
    return data_dir() / "arena" / "battles.jsonl"


@dataclass(frozen=True)
class RatingConfig:
    anchor: str | None = None  # the model pinned at ``base``; None: smollm2 if it played, else the first by name
    base: float = BASE
    prior: float = 0.0  # tied games added between every pair; 0: the pure MLE
    rounds: int = 1000  # bootstrap resamples
    seed: int = 0


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: str
    judge: str = "human"  # human, verifier, llm:<judge model>
    prompt: str = ""
    answer_a: str = ""
    answer_b: str = ""
    reference: str | None = None  # the known answer, when a verifier judged
    note: str = ""  # the judge's reasons: what the verifier read, the LLM judge's probabilities
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for key in ("model_a", "model_b"):
            name = getattr(self, key)
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{key} must be a model name (a non-empty string)")
        if self.model_a == self.model_b:
            raise ValueError(f"a model cannot battle itself ({self.model_a!r})")
        if self.winner not in WINNERS:
            raise ValueError(f"winner must be one of {', '.join(WINNERS)} (got {self.winner!r})")
        for key in ("judge", "prompt", "answer_a", "answer_b", "note", "id"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string")
        if self.reference is not None and not isinstance(self.reference, str):
            raise ValueError("reference must be a string or null")
        if isinstance(self.time, bool) or not isinstance(self.time, int | float):
            raise ValueError("time must be a number (seconds since the epoch)")

    @property
    def score_a(self) -> float:
        """What side ``a`` scored: 1 for a win, 0 for a loss, 1/2 for either kind of tie."""
        return {"a": 1.0, "b": 0.0}.get(self.winner, 0.5)

    @classmethod
    def from_json(cls, obj: Any) -> Battle:
        if not isinstance(obj, dict):
            raise ValueError("a battle is a JSON object")
        unknown = sorted(set(obj) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(unknown)}")
        missing = [k for k in ("model_a", "model_b", "winner") if k not in obj]
        if missing:
            raise ValueError(f"missing fields: {', '.join(missing)}")
        return cls(**obj)


# ----------------------------------------------------------------------------- the battle log
def append_battles(path: str | Path, battles: Sequence[Battle]) -> None:
    """Append battles to the log as JSON lines, all in one ``write`` under an exclusive lock.

    O_APPEND puts the write at the end of the file even with other writers (other processes, a
    server's threads), and the lock keeps their lines apart. If an earlier writer died half-way
    through a line, ours starts on a new line, so the torn line stays one bad line, reported on read.
    """
    if not battles:
        return
    data = "".join(json.dumps(asdict(b), ensure_ascii=False) + "\n" for b in battles).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:  # one call writes it all on a local file system; a short write goes on from there
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


@dataclass
class BattleLog:
    battles: list[Battle]
    problems: list[str]  # "file:line: why" for each line left out


def read_battles(path: str | Path) -> BattleLog:
    """Every valid battle in the log; each malformed line becomes a problem naming its line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no battle log here (run `llmstack arena battle` or vote in the UI)") from None
    battles, problems = [], []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            battles.append(Battle.from_json(json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError as e:
            problems.append(f"{path}:{n}: not UTF-8 ({e.reason})")
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
        except (ValueError, TypeError) as e:
            problems.append(f"{path}:{n}: {e}")
    return BattleLog(battles, problems)


# ----------------------------------------------------------------------------- Bradley-Terry
class NoMLE(ValueError):
    """The battles leave some ratings unbounded: a group never lost, or never won, against the rest."""


@dataclass(frozen=True)
class Outcomes:
    """Battles as arrays: model indices of each side and the score of side ``a``."""

    models: list[str]
    ia: np.ndarray
    ib: np.ndarray
    score_a: np.ndarray

    @classmethod
    def of(cls, battles: Sequence[Battle]) -> Outcomes:
        models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
        index = {m: i for i, m in enumerate(models)}
        ia = np.array([index[b.model_a] for b in battles], dtype=np.int64)
        ib = np.array([index[b.model_b] for b in battles], dtype=np.int64)
        return cls(models, ia, ib, np.array([b.score_a for b in battles], dtype=np.float64))

    def wins(self, weights: np.ndarray | None = None) -> np.ndarray:
        """W[i, j]: the wins of model i over model j, ties as half a win each (battles weighted)."""
        m = len(self.models)
        w = np.ones_like(self.score_a) if weights is None else weights
        W = np.zeros((m, m))
        np.add.at(W, (self.ia, self.ib), w * self.score_a)
        np.add.at(W, (self.ib, self.ia), w * (1.0 - self.score_a))
        return W


def _reach(edges: np.ndarray, start: int) -> set[int]:
    seen, todo = {start}, [start]
    while todo:
        for j in np.flatnonzero(edges[todo.pop()]):
            if int(j) not in seen:
                seen.add(int(j))
                todo.append(int(j))
    return seen


def _check_mle(W: np.ndarray, models: Sequence[str]) -> None:
    """The MLE is finite iff the graph "i won (or tied) against j" is strongly connected (Zermelo)."""
    everyone = set(range(len(models)))
    beaten = _reach(W > 0, 0)  # whom models[0] beat, directly or through others
    beat_it = _reach((W > 0).T, 0)  # who beat models[0], directly or through others
    for winners, losers in ((everyone - beaten, beaten), (beat_it, everyone - beat_it)):
        if winners and losers:
            names = [", ".join(sorted(models[i] for i in group)) for group in (winners, losers)]
            raise NoMLE(
                f"no maximum-likelihood ratings: {names[0]} never lost to {names[1]}; "
                "add tied games with a prior (--prior 1)"
            )


def _log_likelihood(W: np.ndarray, theta: np.ndarray) -> float:
    d = theta[:, None] - theta[None, :]
    return float(-(W * np.logaddexp(0.0, -d)).sum())


def fit_bradley_terry(
    W: np.ndarray, anchor: int = 0, prior: float = 0.0, names: Sequence[str] | None = None, tol: float = 1e-10
) -> np.ndarray:
    """Log-odds strengths theta (natural units, theta[anchor] = 0) maximising sum W_ij log sigmoid(theta_i - theta_j).

    Newton's method on the models other than the anchor, with step halving. ``prior``: that many tied
    games added between every pair of models.
    """
    m = W.shape[0]
    W = W + (prior / 2) * (1 - np.eye(m))
    if m == 1:
        return np.zeros(1)
    if prior <= 0:
        _check_mle(W, names or [str(i) for i in range(m)])
    N = W + W.T
    free = np.array([i for i in range(m) if i != anchor])
    theta = np.zeros(m)
    for _ in range(200):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # (m, m): P(i beats j)
        grad = (W - N * p).sum(axis=1)
        if np.abs(grad[free]).max() < tol * max(1.0, N.sum()):
            return theta
        C = N * p * (1 - p)  # the negative Hessian is the Laplacian of these weights
        neg_hess = np.diag(C.sum(axis=1)) - C
        step = np.zeros(m)
        step[free] = np.linalg.solve(neg_hess[np.ix_(free, free)], grad[free])
        base, t = _log_likelihood(W, theta), 1.0
        while _log_likelihood(W, theta + t * step) < base - 1e-12 and t > 1e-8:
            t /= 2
        theta = theta + t * step
    raise NoMLE("Bradley-Terry: Newton's method did not converge (a near-unbounded rating?); use a prior")


def to_rating(theta: np.ndarray, base: float = BASE, scale: float = SCALE) -> np.ndarray:
    """Natural log-odds -> LM Arena points: ``scale`` points per factor of 10 in the odds."""
    return base + scale * theta / math.log(10)


def bradley_terry(battles: Sequence[Battle], cfg: RatingConfig = RatingConfig()) -> dict[str, float]:
    """Ratings by maximum likelihood, the anchor model at ``cfg.base``."""
    out = Outcomes.of(battles)
    theta = fit_bradley_terry(out.wins(), _anchor_index(out.models, cfg.anchor), cfg.prior, out.models)
    return dict(zip(out.models, to_rating(theta, cfg.base).tolist(), strict=True))


def _anchor_index(models: list[str], anchor: str | None) -> int:
    if anchor is None:
        return models.index(DEFAULT_ANCHOR) if DEFAULT_ANCHOR in models else 0
    if anchor not in models:
        raise ValueError(f"anchor {anchor!r} has no battles; models: {', '.join(models)}")
    return models.index(anchor)


@dataclass
class Intervals:
    lo: dict[str, float]
    hi: dict[str, float]
    rounds: int
    dropped: int  # resamples with no finite fit (only without a prior), left out


def bootstrap(battles: Sequence[Battle], cfg: RatingConfig = RatingConfig(), level: float = 0.95) -> Intervals:
    """Percentile intervals of the ratings over ``cfg.rounds`` resamples of the battles (with replacement)."""
    out = Outcomes.of(battles)
    a = _anchor_index(out.models, cfg.anchor)
    rng = np.random.default_rng(cfg.seed)
    n, fits, dropped = len(battles), [], 0
    for _ in range(cfg.rounds):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        try:
            fits.append(to_rating(fit_bradley_terry(out.wins(weights), a, cfg.prior, out.models), cfg.base))
        except NoMLE:
            dropped += 1
    if not fits:
        raise NoMLE("no bootstrap resample has finite ratings: too few battles; use a prior")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(np.array(fits), [tail, 100 - tail], axis=0)
    by_model = [dict(zip(out.models, q.tolist(), strict=True)) for q in (lo, hi)]
    return Intervals(by_model[0], by_model[1], cfg.rounds, dropped)


# ----------------------------------------------------------------------------- Elo
def online_elo(
    battles: Iterable[Battle], k: float = 16.0, base: float = BASE, anchor: str | None = None
) -> dict[str, float]:
    """Elo updated battle by battle in log order (zero-sum), then shifted so the anchor sits at ``base``."""
    r: dict[str, float] = {}
    for b in battles:
        ra, rb = r.setdefault(b.model_a, base), r.setdefault(b.model_b, base)
        expected_a = 1.0 / (1.0 + 10 ** ((rb - ra) / SCALE))
        delta = k * (b.score_a - expected_a)
        r[b.model_a], r[b.model_b] = ra + delta, rb - delta
    if r:
        shift = base - r[sorted(r)[_anchor_index(sorted(r), anchor)]]
        r = {m: v + shift for m, v in r.items()}
    return r


# ----------------------------------------------------------------------------- the leaderboard
@dataclass
class Row:
    model: str
    rating: float
    lo: float
    hi: float
    elo: float
    battles: int
    wins: int
    ties: int
    losses: int
    rank: int = 0


@dataclass
class Leaderboard:
    rows: list[Row]
    cfg: RatingConfig  # its anchor named
    intervals: Intervals
    judges: list[str]

    def table(self) -> str:
        head = f"{'rank':>4}  {'model':<20} {'rating':>7}  {'95% CI':>15}  {'elo':>6}  {'battles':>7}  W / T / L"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            ci = f"-{r.rating - r.lo:.0f} / +{r.hi - r.rating:.0f}"
            lines.append(
                f"{r.rank:>4}  {r.model:<20} {r.rating:>7.0f}  {ci:>15}  {r.elo:>6.0f}  {r.battles:>7}  "
                f"{r.wins} / {r.ties} / {r.losses}"
            )
        iv = self.intervals
        notes = [
            f"Bradley-Terry MLE, {self.cfg.anchor} anchored at {self.cfg.base:.0f}; 95% CI from {iv.rounds} bootstrap "
            f"resamples; elo: online, K=16, in log order; judges: {', '.join(self.judges)}"
        ]
        if self.cfg.prior:
            notes.append(f"prior: {self.cfg.prior:g} tied game(s) added between every pair")
        if iv.dropped:
            notes.append(f"{iv.dropped} of {iv.rounds} resamples had no finite fit and were left out")
        return "\n".join(lines + notes)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self.cfg),
            "dropped": self.intervals.dropped,
            "judges": self.judges,
            "rows": [asdict(r) for r in self.rows],
        }

    def plot(self, path: str | Path) -> Path:
        """Ratings with their 95% intervals, best at the top, as a PNG (written atomically)."""
        plt = pyplot()

        rows = self.rows[::-1]
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(rows)))
        y = np.arange(len(rows))
        err = np.array([[r.rating - r.lo for r in rows], [r.hi - r.rating for r in rows]])
        ax.errorbar([r.rating for r in rows], y, xerr=err, fmt="o", capsize=4, color="tab:blue", label="Bradley-Terry")
        ax.scatter([r.elo for r in rows], y, marker="x", color="tab:orange", label="online Elo", zorder=3)
        ax.axvline(self.cfg.base, color="grey", lw=0.8, ls="--")
        ax.margins(x=0.08, y=0.15)
        ax.set_yticks(y, [f"{r.model} ({r.battles})" for r in rows])
        ax.set_xlabel(f"rating ({self.cfg.anchor} = {self.cfg.base:.0f}; 400 points = 10x the odds)")
        ax.set_title("llmstack arena: ratings with 95% bootstrap intervals")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        save_png(fig, path, dpi=120)
        return path


def leaderboard(battles: Sequence[Battle], cfg: RatingConfig = RatingConfig(), **fields: Any) -> Leaderboard:
    """The table behind ``llmstack arena leaderboard``; ``fields`` override ``cfg``'s (``rounds=200``)."""
    if not battles:
        raise ValueError("no battles to rate")
    out = Outcomes.of(battles)
    cfg = replace(cfg, **fields)
    cfg = replace(cfg, anchor=out.models[_anchor_index(out.models, cfg.anchor)])
    ratings = bradley_terry(battles, cfg)
    iv = bootstrap(battles, cfg)
    elo = online_elo(battles, base=cfg.base, anchor=cfg.anchor)
    rows = []
    for m in out.models:
        mine = [b for b in battles if m in (b.model_a, b.model_b)]
        won = sum(b.winner == ("a" if b.model_a == m else "b") for b in mine)
        tied = sum(b.winner in ("tie", "both_bad") for b in mine)
        rows.append(Row(m, ratings[m], iv.lo[m], iv.hi[m], elo[m], len(mine), won, tied, len(mine) - won - tied))
    rows.sort(key=lambda r: -r.rating)
    for r in rows:  # as LM Arena: 1 + the number of models surely better (their interval above ours)
        r.rank = 1 + sum(o.lo > r.hi for o in rows)
    return Leaderboard(rows, cfg, iv, sorted({b.judge for b in battles}))
