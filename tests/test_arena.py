"""The arena: Bradley-Terry against an independent logistic regression, bootstrap, Elo, the battle
log, the judges, the CLI on scripted models and the server's battle endpoints."""

from __future__ import annotations

import itertools
import json
import math
import threading

import numpy as np
import pytest
from conftest import SCRIPT_REPLY, bigram_model, tiny_model_config

from llmstack.eval.arena import (
    Battle,
    NoMLE,
    RatingConfig,
    append_battles,
    bootstrap,
    bradley_terry,
    leaderboard,
    online_elo,
    read_battles,
)
from llmstack.eval.arena_battle import (
    Problem,
    arithmetic_problems,
    final_number,
    readable_tools,
    run_battles,
    swapped_verdict,
    verifier,
)


def battles_from(results: list[tuple[str, str, str]]) -> list[Battle]:
    return [Battle(a, b, w) for a, b, w in results]


# A fixed log: four models, every kind of verdict, no model unbeaten (so the MLE exists).
FIXED = battles_from(
    [("m1", "m2", w) for w in ["a", "a", "b", "tie", "a"]]
    + [("m2", "m3", w) for w in ["a", "b", "a", "a", "both_bad"]]
    + [("m3", "m1", w) for w in ["b", "b", "a", "tie"]]
    + [("m4", "m1", w) for w in ["a", "b", "b", "b"]]
    + [("m2", "m4", w) for w in ["b", "a", "tie", "a"]]
    + [("m3", "m4", w) for w in ["a", "b"]]
)


def logistic_regression_ratings(battles: list[Battle], anchor: str, extra_ties: float = 0.0) -> dict[str, float]:
    """The independent fit: unregularised logistic regression on the +1/-1 design matrix, one row per
    battle (a tie as two half-weighted rows, won and lost), solved by scipy's BFGS."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    rows, ys, ws = [], [], []

    def add(a: str, b: str, y: float, w: float) -> None:
        x = np.zeros(len(models))
        x[models.index(a)], x[models.index(b)] = 1.0, -1.0
        rows.append(x)
        ys.append(y)
        ws.append(w)

    for b in battles:
        if b.winner in ("a", "b"):
            add(b.model_a, b.model_b, 1.0 if b.winner == "a" else 0.0, 1.0)
        else:
            add(b.model_a, b.model_b, 1.0, 0.5)
            add(b.model_a, b.model_b, 0.0, 0.5)
    for x, y in itertools.combinations(models, 2):  # a prior: tied games between every pair
        if extra_ties:
            add(x, y, 1.0, extra_ties / 2)
            add(x, y, 0.0, extra_ties / 2)
    X, y, w = np.array(rows), np.array(ys), np.array(ws)
    keep = [i for i, m in enumerate(models) if m != anchor]  # the anchor's coefficient is 0
    Xk = X[:, keep]

    def loss(beta):
        z = Xk @ beta
        return -(w * (y * log_expit(z) + (1 - y) * log_expit(-z))).sum()

    def grad(beta):
        return -Xk.T @ (w * (y - expit(Xk @ beta)))

    fit = minimize(loss, np.zeros(len(keep)), jac=grad, method="BFGS", options={"gtol": 1e-12, "maxiter": 10_000})
    beta = np.zeros(len(models))
    beta[keep] = fit.x
    return {m: 1000 + 400 * beta[i] / math.log(10) for i, m in enumerate(models)}


@pytest.mark.parametrize("prior", [0.0, 1.0])
def test_bradley_terry_matches_an_independent_logistic_regression(prior):
    ours = bradley_terry(FIXED, RatingConfig(anchor="m2", base=1000, prior=prior))
    reference = logistic_regression_ratings(FIXED, "m2", extra_ties=prior)
    assert ours["m2"] == 1000
    for m in reference:
        assert ours[m] == pytest.approx(reference[m], abs=1e-4), (m, ours, reference)
    # the order of the battles does not matter to Bradley-Terry
    assert bradley_terry(FIXED[::-1], RatingConfig(anchor="m2", prior=prior)) == pytest.approx(ours, abs=1e-6)


def test_ties_count_half_a_win():
    # 3 wins, 1 loss, 1 tie and 1 both_bad: P(x beats y) = (3 + 0.5 + 0.5) / 6, odds 2:1
    log = battles_from([("x", "y", w) for w in ["a", "a", "a", "b", "tie", "both_bad"]])
    r = bradley_terry(log, RatingConfig(anchor="y"))
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10(2), abs=1e-6)
    swapped = bradley_terry([Battle(b.model_b, b.model_a, {"a": "b", "b": "a"}.get(b.winner, b.winner)) for b in log])
    assert swapped["x"] - swapped["y"] == pytest.approx(r["x"] - r["y"], abs=1e-6)
    even = bradley_terry(battles_from([("x", "y", "tie"), ("y", "x", "both_bad")]), RatingConfig(anchor="x"))
    assert even == pytest.approx({"x": 1000, "y": 1000})


def test_an_unbeaten_model_has_no_mle_until_a_prior():
    log = battles_from([("x", "y", "a"), ("y", "z", "a"), ("z", "y", "a")])
    with pytest.raises(NoMLE, match="x never lost to y, z"):
        bradley_terry(log)
    with pytest.raises(NoMLE, match="y, z never lost to x"):
        bradley_terry(battles_from([("x", "y", "b"), ("x", "z", "b"), ("y", "z", "a"), ("z", "y", "a")]))
    r = bradley_terry(log, RatingConfig(anchor="y", prior=1.0))
    assert r["x"] > r["y"] == 1000 and math.isfinite(r["x"])


def simulated(n_per_pair: int, seed: int) -> list[Battle]:
    true = {"strong": 1200.0, "mid": 1000.0, "weak": 850.0}
    rng = np.random.default_rng(seed)
    out = []
    for a, b in itertools.permutations(true, 2):
        p = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
        for _ in range(n_per_pair // 2):
            u = rng.random()
            out.append(Battle(a, b, "tie" if u < 0.1 else "a" if u < 0.1 + 0.9 * p else "b"))
    return out


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_more_battles():
    widths = []
    for n in (40, 800):
        log = simulated(n, seed=n)
        point = bradley_terry(log, RatingConfig(anchor="mid"))
        iv = bootstrap(log, RatingConfig(anchor="mid", rounds=300, seed=1))
        assert iv.dropped == 0
        for m, r in point.items():
            assert iv.lo[m] <= r <= iv.hi[m], (m, iv, point)
        assert iv.lo["mid"] == iv.hi["mid"] == 1000  # the anchor is pinned
        widths.append(np.mean([iv.hi[m] - iv.lo[m] for m in ("strong", "weak")]))
    assert widths[1] < 0.4 * widths[0], widths  # 20x the battles: about 1/sqrt(20) of the width
    big = bradley_terry(simulated(800, seed=800), RatingConfig(anchor="mid"))
    assert big["strong"] > big["mid"] > big["weak"]


def test_online_elo():
    r = online_elo(battles_from([("x", "y", "a")]), k=16, anchor="y")
    assert r["x"] - r["y"] == pytest.approx(16)  # expected 1/2: +8 and -8
    assert online_elo(battles_from([("x", "y", "tie")] * 5), anchor="x") == {"x": 1000, "y": 1000}
    log = simulated(400, seed=3)
    elo = online_elo(log, anchor="mid")
    assert elo["strong"] > elo["mid"] > elo["weak"]
    raw = online_elo(log, anchor=None)
    assert sum(raw.values()) - sum(elo.values()) == pytest.approx(3 * (raw["mid"] - 1000), abs=1e-6)
    # Elo depends on the order of the battles (Bradley-Terry does not)
    ordered = sorted(battles_from([("x", "y", "a")] * 10 + [("x", "y", "b")] * 10), key=lambda b: b.winner)
    assert online_elo(ordered, anchor="y")["x"] < 1000 < online_elo(ordered[::-1], anchor="y")["x"]


def test_leaderboard_table_and_plot(tmp_path):
    board = leaderboard(simulated(100, seed=5), RatingConfig(anchor="mid", rounds=100))
    assert [r.model for r in board.rows] == ["strong", "mid", "weak"] and board.rows[0].rank == 1
    assert board.rows[-1].rank == 3  # the intervals do not overlap at this size
    row = board.rows[0]
    assert row.battles == row.wins + row.ties + row.losses == 200
    text = board.table()
    assert "strong" in text and "95% CI" in text and "mid anchored at 1000" in text
    png = board.plot(tmp_path / "board.png")
    assert png.read_bytes().startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- the battle log
def test_battles_are_validated():
    with pytest.raises(ValueError, match="winner"):
        Battle("x", "y", "draw")
    with pytest.raises(ValueError, match="itself"):
        Battle("x", "x", "a")
    with pytest.raises(ValueError, match="model_b"):
        Battle("x", "", "a")
    with pytest.raises(ValueError, match="unknown fields: colour"):
        Battle.from_json({"model_a": "x", "model_b": "y", "winner": "a", "colour": "red"})


def test_log_appends_and_reports_malformed_lines(tmp_path):
    log = tmp_path / "arena" / "battles.jsonl"
    append_battles(log, battles_from([("x", "y", "a"), ("y", "x", "tie")]))
    with open(log, "ab") as f:
        f.write(b"{not json\n")
        f.write(b'{"model_a": "x", "model_b": "y"}\n')
        f.write(b'{"model_a": "x", "model_b": "y", "winner": "draw"}\n')
        f.write(b"[1, 2]\n\n")
        f.write(b'\xff\xfe{"model_a"\n')
        f.write(b'{"model_a": "x", "model_b": "y", "win')  # a writer died mid-line
    append_battles(log, battles_from([("x", "z", "b")]))
    read = read_battles(log)
    assert [(b.model_a, b.model_b, b.winner) for b in read.battles] == [
        ("x", "y", "a"),
        ("y", "x", "tie"),
        ("x", "z", "b"),
    ]
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in read.problems] == ["3", "4", "5", "6", "8", "9"]
    assert "not valid JSON" in read.problems[0] and "missing fields: winner" in read.problems[1]
    assert "draw" in read.problems[2] and "not UTF-8" in read.problems[4]
    with pytest.raises(FileNotFoundError, match="no battle log"):
        read_battles(tmp_path / "nothing.jsonl")


def test_concurrent_appends_never_interleave(tmp_path):
    log = tmp_path / "battles.jsonl"
    answer = "x" * 20_000  # lines longer than a pipe buffer

    def writer(k: int) -> None:
        for i in range(25):
            append_battles(log, [Battle(f"w{k}", "other", "a", answer_a=answer, note=str(i))])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read = read_battles(log)
    assert read.problems == [] and len(read.battles) == 150
    assert all(b.answer_a == answer for b in read.battles)


# ----------------------------------------------------------------------------- judges
def test_final_number_and_the_verifier():
    assert final_number("The answer is 1,234.") == "1234"
    assert final_number("5 - 3 equals -4") == "-4"
    assert final_number("8.0") == "8" and final_number("2.5") == "2.5" and final_number("none") is None
    assert final_number("6*7=42.") == "42" and final_number("It is (15)!") == "15"
    assert final_number("Assl-8 and 1.0.0.0.") is None  # digits inside words are not an answer
    tools = readable_tools(
        "<|tool_call_start|>calculator: 6*7<|tool_call_end|><|tool_result_start|>42<|tool_result_end|>41"
    )
    assert tools == "⟦calculator: 6*7 → 42⟧ 41"
    p = Problem("What is 6 times 7?", "42", "test")
    assert final_number(tools) == "41" and not p.correct(tools)  # the tool's number is not the model's answer
    assert verifier(p, "It is 42.", "43")[0] == "a"
    assert verifier(p, "41", "6*7 = 42")[0] == "b"
    assert verifier(p, "42", "42.0")[0] == "tie"
    winner, note = verifier(p, "41", "")
    assert winner == "both_bad" and "reference 42" in note
    with pytest.raises(ValueError, match="no known answer"):
        verifier(Problem("Why?"), "a", "b")


def test_arithmetic_problems_are_verifiable():
    problems = arithmetic_problems(10)
    assert len(problems) == 10 and {p.source.split(":")[0] for p in problems} >= {"reasoning_gym", "template*"}
    assert problems == arithmetic_problems(10)  # the same problems every time
    for p in problems:
        assert p.correct(f"The answer is {p.answer}.") and not p.correct(f"{int(p.answer) + 1}")


def test_swapped_verdict_cancels_position_bias():
    assert swapped_verdict(0.9, 0.8) == "tie"  # always prefers the first shown
    assert swapped_verdict(0.2, 0.1) == "tie"  # always the second
    assert swapped_verdict(0.7, 0.3) == "a"
    assert swapped_verdict(0.4, 0.6) == "b"


def test_llm_judge_reads_its_letters_and_swaps(tok):
    import torch

    from llmstack.eval.arena_battle import LLMJudge
    from llmstack.interop.bundle import llmstack_bundle
    from llmstack.model.llama import GPT

    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=1024)).eval()
    bundle = llmstack_bundle(model, tok)
    a_id = LLMJudge(bundle, "llm:first").letter_ids[0]
    model.register_forward_hook(
        lambda m, i, out: out + 30 * torch.nn.functional.one_hot(torch.tensor(a_id), out.shape[-1])
    )
    judge = LLMJudge(bundle, "llm:first")  # a judge that always says "A"
    assert judge.prefer_first("2+2?", "4", "5") > 0.99
    winner, note = judge(Problem("2+2?"), "4", "5")
    assert winner == "tie" and "a first 1.000, b first 1.000" in note


def test_run_battles_plays_every_pair_on_every_problem():
    class Fixed:
        def __init__(self, name: str, reply: str) -> None:
            self.name, self.reply = name, reply

        def answer(self, prompts, max_new_tokens=64):
            return [self.reply for _ in prompts]

    players = [Fixed("right", "42"), Fixed("wrong", "41"), Fixed("silent", "")]
    problems = [Problem("6*7?", "42"), Problem("7*6?", "42")]
    battles = run_battles(players, problems, verifier, "verifier")  # type: ignore[arg-type]
    assert len(battles) == 6 and {b.judge for b in battles} == {"verifier"}
    assert {b.model_a for b in battles} | {b.model_b for b in battles} == {"right", "wrong", "silent"}
    for b in battles:
        sides = {"a": b.model_a, "b": b.model_b}
        if "right" in sides.values():
            assert sides[b.winner] == "right"
        else:
            assert b.winner == "both_bad"


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def answers_42(tmp_path_factory, tok):
    """A scripted chat model whose every answer is "42"."""
    from llmstack.interop.bundle import llmstack_bundle, save_run
    from llmstack.tokenizer import special as S

    n4, n2 = tok.encode_ordinary("42")  # digits are single tokens
    start, end = tok.special_id(S.ASSISTANT_START), tok.special_id(S.ASSISTANT_END)
    out = tmp_path_factory.mktemp("answers42") / "run"
    save_run(llmstack_bundle(bigram_model(tok, {start: n4, n4: n2, n2: end}), tok), out, "test: always 42")
    return out


def test_cli_battle_then_leaderboard(tmp_path, scripted_run, answers_42, capsys):
    from llmstack.cli import main

    problems = tmp_path / "problems.jsonl"
    rows = [{"prompt": "What is 6 times 7?", "answer": "42"}] * 3 + [{"prompt": "What is 3 + 4?", "answer": 7}]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = tmp_path / "battles.jsonl"
    models = f"right={answers_42},tiny={scripted_run}"
    argv = ["arena", "battle", "--models", models, "--problems", str(problems), "--log", str(log), "--dtype", "float32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "right vs tiny: 3 wins, 1 ties (1 both bad), 0 losses" in out and "4 battles (verifier)" in out
    battles = read_battles(log).battles
    assert len(battles) == 4 and all(b.reference in ("42", "7") for b in battles)
    tiny = next(b.answer_a if b.model_a == "tiny" else b.answer_b for b in battles)
    assert tiny == SCRIPT_REPLY.strip()

    png = tmp_path / "board.png"
    argv = ["arena", "leaderboard", "--log", str(log), "--anchor", "tiny", "--rounds", "50", "--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    right = next(line for line in out.splitlines() if " right " in line)
    # P(right beats tiny) = 3.5 / 4: 400 * log10(7) = 338 points above tiny's 1000
    assert right.split()[2] == "1338" and "3 / 1 / 0" in right
    assert "resamples had no finite fit" in out and png.read_bytes().startswith(b"\x89PNG")

    # no tie at all: the pure MLE does not exist, the CLI says so and names the fix
    append_battles(log, [Battle("right", "other", "a")])
    assert main(["arena", "leaderboard", "--log", str(log), "--rounds", "10", "--plot", str(png)]) == 2
    assert "never lost" in capsys.readouterr().err
    assert main(["arena", "leaderboard", "--log", str(log), "--rounds", "10", "--plot", str(png), "--prior", "1"]) == 0


def test_cli_battle_needs_two_models_and_known_answers(tmp_path, scripted_run, capsys):
    from llmstack.cli import main

    assert main(["arena", "battle", "--models", f"tiny={scripted_run}", "--log", str(tmp_path / "l")]) == 2
    assert "at least two models" in capsys.readouterr().err
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"prompt": "Why?"}\n')
    argv = ["arena", "battle", "--models", f"a={scripted_run},b={scripted_run}", "--problems", str(problems)]
    assert main([*argv, "--log", str(tmp_path / "l")]) == 2
    assert "known answer" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_gets_an_empty_answer(scripted_run):
    from llmstack.eval.arena_battle import Contestant

    c = Contestant.load("tiny", str(scripted_run))
    assert c.style == "chat"
    base = Contestant("tiny", c.bundle, "document")  # the conversation document is over 128 tokens here
    assert base.answer(["hi"]) == [""]
    assert c.answer(["hi", "x " * 200]) == [SCRIPT_REPLY.strip(), ""]


# ----------------------------------------------------------------------------- the server's battle endpoints
@pytest.fixture(scope="module")
def arena_app(scripted_run, tmp_path_factory):
    from fastapi.testclient import TestClient

    from llmstack.serve import build_registry
    from llmstack.serve.app import create_app

    app = create_app(build_registry([f"tiny={scripted_run}", f"tiny2={scripted_run}"]))
    app.state.arena_log = tmp_path_factory.mktemp("arena") / "battles.jsonl"
    with TestClient(app) as http:
        yield app, http


def test_battle_endpoints(arena_app):
    app, http = arena_app
    with http.stream("POST", "/api/arena/battles", json={"prompt": "hi", "temperature": 0}) as r:
        assert r.status_code == 200
        raw = "".join(r.iter_text())
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert "tiny" not in raw  # anonymous until the vote
    bid = events[0]["battle"]
    for side in "ab":
        text = "".join(e["delta"].get("content", "") for e in events[1:] if e["side"] == side)
        assert text == SCRIPT_REPLY
        assert [e["finish_reason"] for e in events[1:] if e["side"] == side][-1] == "stop"

    bad = http.post(f"/api/arena/battles/{bid}/vote", json={"winner": "draw"})
    assert bad.status_code == 400 and "winner" in bad.json()["error"]["message"]
    r = http.post(f"/api/arena/battles/{bid}/vote", json={"winner": "a"}).json()
    assert {r["model_a"], r["model_b"]} == {"tiny", "tiny2"} and r["winner"] == "a"
    again = http.post(f"/api/arena/battles/{bid}/vote", json={"winner": "b"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "battle_not_found"
    (logged,) = read_battles(app.state.arena_log).battles
    assert (logged.model_a, logged.model_b, logged.winner, logged.judge) == (r["model_a"], r["model_b"], "a", "human")
    assert logged.answer_a == logged.answer_b == SCRIPT_REPLY and logged.prompt == "hi" and logged.id == bid

    board = http.get("/api/arena/leaderboard").json()  # one win: no finite MLE yet
    assert board["rows"] == [] and "never lost" in board["message"]
    board = http.get("/api/arena/leaderboard?prior=1").json()
    assert [row["model"] for row in board["rows"]] == [r["model_a"], r["model_b"]]
    assert http.get("/api/arena/leaderboard?prior=x").status_code == 400
    assert http.post("/api/arena/battles", json={"prompt": ""}).status_code == 400


def test_a_battle_needs_two_models(scripted_run):
    from fastapi.testclient import TestClient

    from llmstack.serve import build_registry
    from llmstack.serve.app import create_app

    with TestClient(create_app(build_registry([f"tiny={scripted_run}"]))) as http:
        r = http.post("/api/arena/battles", json={"prompt": "hi"})
    assert r.status_code == 400 and "two models" in r.json()["error"]["message"]
