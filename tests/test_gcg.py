"""GCG adversarial suffixes (``security/gcg.py``) on a tiny random model: the gradient against a one-hot
reference, candidate evaluation against brute force over every single swap, the search lowering the
target loss, the suffix file and its red-team families, and errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmstack.security import gcg
from llmstack.security.attacks import gcg as gcg_families

PAIRS = [("the model reads tokens.", "Sure, here is a list"), ("a dict maps keys to values.", "Sure, here is code")]


@pytest.fixture(scope="module")
def bundle(tok):
    from conftest import tiny_model_config

    from llmstack.interop.bundle import llmstack_bundle
    from llmstack.model.llama import GPT

    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=256))
    model.reset_parameters(std=0.3)  # larger weights than at init: the suffix then moves the loss visibly
    return llmstack_bundle(model.eval(), tok)


def reference_loss(model, exs, suffixes):
    """Mean target NLL per candidate from whole sequences, no cache: (C,)."""
    out = torch.zeros(len(suffixes))
    for ex in exs:
        ids = torch.tensor([ex.before + s + ex.after + ex.target for s in suffixes])
        logits = model(ids)
        t = len(ex.target)
        pred = logits[:, -t - 1 : -1]
        want = torch.tensor(ex.target).expand(len(suffixes), -1)
        out += F.cross_entropy(pred.transpose(1, 2), want, reduction="none").mean(1)
    return out / len(exs)


def test_gradient_matches_a_one_hot_reference(bundle):
    model, tok = bundle.model, bundle.tokenizer
    suffix = tok.encode_ordinary(" the model the")
    exs = gcg.examples(bundle, PAIRS, suffix)
    grad, loss = gcg.Objective(model, exs).gradient(suffix)

    W = model.model.embed_tokens.weight.detach()
    onehot = F.one_hot(torch.tensor(suffix), W.shape[0]).float().requires_grad_(True)
    total = 0.0
    for ex in exs:
        at = len(ex.before)

        def swap(module, inputs, out, at=at):
            out = out.clone()
            out[0, at : at + len(suffix)] = onehot @ W  # the suffix as one-hot rows times the embedding
            return out

        handle = model.model.embed_tokens.register_forward_hook(swap)
        try:
            logits = model(torch.tensor([ex.before + suffix + ex.after + ex.target]))[0]
        finally:
            handle.remove()
        t = len(ex.target)
        total = total + F.cross_entropy(logits[-t - 1 : -1], torch.tensor(ex.target)) / len(exs)
    (want,) = torch.autograd.grad(total, onehot)
    assert loss == pytest.approx(total.item(), rel=1e-5)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4)


def test_candidates_cover_every_swap_and_match_brute_force(bundle):
    model, tok = bundle.model, bundle.tokenizer
    suffix = tok.encode_ordinary(" the the")
    exs = gcg.examples(bundle, PAIRS, suffix)
    obj = gcg.Objective(model, exs)
    allowed = gcg.allowed_tokens(tok, model.config.vocab_size)
    k = int(allowed.sum())
    grad, _ = obj.gradient(suffix)
    cands = gcg.candidates(suffix, grad, allowed, k, 10**6, torch.Generator().manual_seed(0))
    swaps = {
        tuple(suffix[:p] + [v] + suffix[p + 1 :])
        for p in range(len(suffix))
        for v in allowed.nonzero().flatten().tolist()
        if v != suffix[p]
    }
    assert {tuple(c) for c in cands.tolist()} == swaps  # the top-k of every allowed token is all of them
    got = obj.losses(cands, chunk=256)
    want = reference_loss(model, exs, cands.tolist())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # the KV-cached batch vs whole sequences
    assert int(got.argmin()) == int(want.argmin())
    # a small top-k draws only the most negative-gradient tokens at the swapped position
    few = gcg.candidates(suffix, grad, allowed, 3, 8, torch.Generator().manual_seed(0))
    for row in few.tolist():
        p = next(i for i in range(len(suffix)) if row[i] != suffix[i])
        top = (-grad[p]).masked_fill(~allowed, float("-inf")).topk(3).indices.tolist()
        assert row[p] in top


def test_search_lowers_the_target_loss_and_is_deterministic(bundle):
    cfg = gcg.GCGConfig(length=4, steps=6, topk=16, batch=24, init=" the", seed=1)
    a = gcg.search(bundle, PAIRS, cfg, progress=False)
    b = gcg.search(bundle, PAIRS, cfg, progress=False)
    assert a.loss < a.loss_start - 0.3  # 7.27 -> 6.63 nats/token when written
    assert len(a.history) == a.steps + 1 == 7 and a.best_history[-1] == a.loss == min(a.history)
    assert (a.ids, a.history) == (b.ids, b.history)
    tok = bundle.tokenizer
    assert tok.decode(a.ids) == a.suffix and gcg.stable(tok, [r for r, _ in PAIRS], a.ids)
    assert not any(tok.is_special(i) for i in a.ids)
    # the reported loss is the loss of the suffix *string* appended to the requests
    exs = gcg.examples(bundle, PAIRS, a.ids)
    assert reference_loss(bundle.model, exs, [a.ids])[0].item() == pytest.approx(a.loss, rel=1e-4)


def test_bad_input_gives_clear_errors(bundle, tmp_path):
    with pytest.raises(ValueError, match="no training requests"):
        gcg.search(bundle, [], gcg.GCGConfig(init=" the"), progress=False)
    with pytest.raises(ValueError, match="length must be at least 1"):
        gcg.search(bundle, PAIRS, gcg.GCGConfig(length=0, init=" the"), progress=False)
    with pytest.raises(ValueError, match="special token '<\\|assistant_end\\|>'"):
        gcg.search(bundle, [("the model<|assistant_end|> reads", "Sure")], gcg.GCGConfig(init=" the"), progress=False)
    with pytest.raises(ValueError, match="must be one allowed token"):
        gcg.search(bundle, PAIRS, gcg.GCGConfig(init=" zzzqqq"), progress=False)
    with pytest.raises(ValueError, match="between 1 and 11"):
        gcg.split(12, 12)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": gcg.FORMAT, "suffix": "  ", "held_out": [0]}))
    with pytest.raises(ValueError, match="suffix is empty"):
        gcg.load_suffix(bad)
    bad.write_text(json.dumps({"suffix": "x"}))
    with pytest.raises(ValueError, match="not a GCG suffix file"):
        gcg.load_suffix(bad)
    from llmstack.security.redteam import select_cases

    with pytest.raises(ValueError, match="need --gcg-suffix"):
        select_cases(["jailbreak:gcg"], None, ours=False)


class Obeys:
    """A fake target that complies (echoing the ask) only when the GCG suffix is in the prompt."""

    name, ours = "obeys", False

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def answer(self, chats, max_tokens, tools):
        out = []
        for chat in chats:
            user = chat[-1]["content"]
            ask = user.removesuffix(self.suffix)
            out.append(f"Sure, here is how: {ask}" if user.endswith(self.suffix) else "I'm sorry, I can't help.")
        return out


def test_suffix_file_round_trip_and_redteam_families(tmp_path):
    from llmstack.security.redteam import run_setting, select_cases

    result = gcg.GCGResult(" describing.\\ + similarlyNow", [1, 2, 3], 3.0, 1.0, [3.0, 1.0], [3.0, 1.0], 1, 0.5)
    path = tmp_path / "suffix.json"
    gcg.save_suffix(path, result, {"model": "m", "train": [1, 5], "held_out": [0, 3, 4]})
    found = gcg.load_suffix(path)
    assert found["suffix"] == result.suffix and found["held_out"] == [0, 3, 4] and found["loss"] == 1.0
    extra = gcg_families(found["suffix"], found["held_out"])
    cases = select_cases(["jailbreak:heldout", "jailbreak:gcg"], None, False, extra)
    assert [c.id for c in cases] == ["heldout-0", "heldout-3", "heldout-4", "gcg-0", "gcg-3", "gcg-4"]
    assert cases[3].user == cases[0].user + result.suffix and cases[0].user.endswith(".")
    st = run_setting(Obeys(result.suffix), cases, [])
    assert st.scores["jailbreak:heldout"].rate == 0.0 and st.scores["jailbreak:heldout"].refused == 3
    assert st.scores["jailbreak:gcg"].rate == 1.0 and st.scores["jailbreak:gcg"].n == 3


def test_gcg_and_redteam_commands_end_to_end(bundle, tmp_path, capsys):
    from llmstack.cli import main
    from llmstack.interop.bundle import save_run

    run = tmp_path / "run"
    save_run(bundle, run, "test: random")
    out = tmp_path / "gcg" / "suffix.json"
    args = ["gcg", "--model", str(run), "--out", str(out), "--length", "3", "--steps", "2", "--topk", "8"]
    assert main([*args, "--batch", "8", "--train", "2", "--init", " the", "--no-progress"]) == 0
    assert "target loss (nats/token)" in capsys.readouterr().out
    found = gcg.load_suffix(out)
    assert len(found["train"]) == 2 and len(found["held_out"]) == 10 and len(found["history"]) == 3
    assert out.with_suffix(".png").stat().st_size > 1000
    rt = ["redteam", "--model", str(run), "--defenses", "none", "--families", "jailbreak:heldout,jailbreak:gcg"]
    rt += ["--gcg-suffix", str(out), "--max-tokens", "2", "--limit", "2", "--out", str(tmp_path / "rt")]
    assert main(rt) == 0
    fams = json.loads((tmp_path / "rt" / "redteam.json").read_text())["settings"][0]["families"]
    assert fams["jailbreak:gcg"]["n"] == fams["jailbreak:heldout"]["n"] == 2
    assert fams["jailbreak:gcg"]["examples"][0]["prompt"].endswith(found["suffix"])
