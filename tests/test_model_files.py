"""Damaged model files: every loader names the file, every command exits 2, no checkpoint is ever lost.

Each hostile input (a damaged checkpoints/LATEST, a damaged newest checkpoint, truncated / random /
bit-flipped weights, garbage config and tokenizer files, GGUF headers that claim more than the file
holds, leftovers of killed checkpoint writes) goes through the command line and through the library.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from llmstack.chat import finetune
from llmstack.chat.mixture import arithmetic
from llmstack.cli import main
from llmstack.interop.load import load_model
from llmstack.training import checkpoint as ckpt_io
from llmstack.training.checkpoint import ModelFileError

FAST = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--warmup-steps", "1", "--dtype", "float32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tok, shard_dir) -> Path:
    """A pretraining run with checkpoints at steps 2 and 4 (LATEST names step_000004), made by the command line."""
    run = tmp_path_factory.mktemp("files") / "run"
    tok.save(run / "tokenizer")
    argv = ["pretrain", "--run-dir", str(run), "--shards", str(shard_dir), "--max-steps", "4", "--ckpt-every", "2"]
    assert main([*argv, *FAST]) == 0
    return run


@pytest.fixture(scope="module")
def hf_dir(pretrained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("files") / "hf"
    assert main(["export", "--format", "hf", "--model", str(pretrained), "--out", str(out)]) == 0
    return out


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def fails_naming(argv: list[str], path: Path, capsys) -> str:
    """Run the command: exit status 2 and one error line that names ``path`` (no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmstack: error: ") and str(path) in err and "Traceback" not in err, err
    return err


def pretrain_argv(run: Path, shard_dir: Path, steps: int) -> list[str]:
    return ["pretrain", "--run-dir", str(run), "--shards", str(shard_dir), "--max-steps", str(steps), *FAST]


# ----------------------------------------------------------------------------- checkpoints/LATEST
def damage_latest(latest: Path, how: str) -> None:
    if how in ("directory", "missing"):
        latest.unlink()
        if how == "directory":
            latest.mkdir()
        return
    contents = {
        "empty": b"",
        "garbage": b"not a checkpoint\n",
        "binary": b"\xff\xfe\x00\x01\x80",
        "dangling": b"step_000400\n",
    }
    latest.write_bytes(contents[how])


@pytest.mark.parametrize("how", ["empty", "garbage", "binary", "directory", "missing", "dangling"])
def test_a_damaged_latest_is_an_error_naming_it_for_every_command(how, pretrained, shard_dir, tmp_path, capsys):
    run = copy(pretrained, tmp_path)
    ckpts = run / "checkpoints"
    latest = ckpts / "LATEST"
    damage_latest(latest, how)
    before = {d.name: digest(d) for d in ckpts.glob("step_*")}
    with pytest.raises(ModelFileError) as e:
        load_model(run)
    assert e.value.path == latest and "step_000004, step_000002" in str(e.value)  # what there is to recover
    for argv in (
        ["sample", "--model", str(run), "--max-new-tokens", "2"],
        ["chat", "--model", str(run), "--prompt", "hi"],
        ["export", "--format", "hf", "--model", str(run), "--out", str(tmp_path / "hf")],
        pretrain_argv(run, shard_dir, 6),  # before: started over from step 0 and rotated the intact ones away
    ):
        fails_naming(argv, latest, capsys)
    assert {d.name: digest(d) for d in ckpts.glob("step_*")} == before  # nothing deleted, nothing rewritten


def test_pretrain_resumes_past_a_damaged_latest_only_when_asked(pretrained, shard_dir, tmp_path, capsys):
    run = copy(pretrained, tmp_path)
    ckpts = run / "checkpoints"
    (ckpts / "LATEST").write_text("")
    intact = digest(ckpts / "step_000004")
    argv = [*pretrain_argv(run, shard_dir, 6), "--ckpt-every", "2"]
    err = fails_naming(argv, ckpts / "LATEST", capsys)
    assert "--resume-from-latest-valid" in err and "nothing was deleted" in err
    assert digest(ckpts / "step_000004") == intact and (ckpts / "step_000002").is_dir()
    assert main([*argv, "--resume-from-latest-valid"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpts / 'step_000004'} at step 4" in out and "now names step_000004" in out
    assert (ckpts / "LATEST").read_text() == "step_000006\n"
    assert sorted(p.name for p in ckpts.iterdir()) == ["LATEST", "step_000004", "step_000006"]  # 2 rotated out
    assert main([*argv, "--resume-from-latest-valid", "--no-resume"]) == 2


@pytest.mark.parametrize("part", ["model.safetensors", "meta.json", "optimizer.pt"])
def test_a_damaged_newest_checkpoint_is_an_error_then_set_aside_when_asked(
    part, pretrained, shard_dir, tmp_path, capsys
):
    run = copy(pretrained, tmp_path)
    ckpts = run / "checkpoints"
    damaged = ckpts / "step_000004" / part
    truncated = damaged.read_bytes()[: damaged.stat().st_size // 2]
    damaged.write_bytes(truncated)
    argv = pretrain_argv(run, shard_dir, 3)
    fails_naming(argv, damaged, capsys)
    assert (ckpts / "step_000002").is_dir() and (ckpts / "step_000004").is_dir()
    assert main([*argv, "--resume-from-latest-valid"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpts / 'step_000002'} at step 2" in out and "kept as" in out
    assert (ckpts / "step_000004.damaged" / part).read_bytes() == truncated  # kept for inspection
    assert (ckpts / "LATEST").read_text() == "step_000003\n"
    assert sorted(p.name for p in ckpts.iterdir()) == ["LATEST", "step_000002", "step_000003", "step_000004.damaged"]


def test_no_valid_checkpoint_at_all_is_an_error_even_when_asked(pretrained, shard_dir, tmp_path, capsys):
    run = copy(pretrained, tmp_path)
    for step in ("step_000002", "step_000004"):
        (run / "checkpoints" / step / "model.safetensors").write_bytes(b"")
    err = fails_naming([*pretrain_argv(run, shard_dir, 6), "--resume-from-latest-valid"], run / "checkpoints", capsys)
    assert "no valid checkpoint to resume from" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step_000002", "step_000004"]


def test_sft_resumes_past_a_damaged_latest_only_when_asked(pretrained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(finetune, "sft_mixtures", lambda *a, **k: (arithmetic(16, 1), arithmetic(4, 2)))
    out = tmp_path / "sft"
    argv = ["sft", "--model", str(pretrained), "--out", str(out), "--hierarchy", "0", "--ckpt-every", "1"]
    argv += ["--batch-size", "2", "--eval-every", "0", "--warmup-steps", "1", "--dtype", "float32"]
    assert main([*argv, "--max-steps", "2"]) == 0
    latest = out / "checkpoints" / "LATEST"
    latest.write_bytes(b"\x00\x01garbage")
    fails_naming([*argv, "--max-steps", "3"], latest, capsys)
    assert (out / "checkpoints" / "step_000002").is_dir()
    assert main([*argv, "--max-steps", "3", "--resume-from-latest-valid"]) == 0
    assert f"resumed from {out / 'checkpoints' / 'step_000002'} at step 2" in capsys.readouterr().out


# ----------------------------------------------------------------------------- leftovers of killed writes
def test_leftovers_of_killed_checkpoint_writes_are_removed_when_training_starts(
    pretrained, shard_dir, tmp_path, capsys
):
    run = copy(pretrained, tmp_path)
    ckpts = run / "checkpoints"
    killed = ckpts / ".step_000006.k3j_9x0q"  # tempfile.mkdtemp's name for a write of step 6
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(bytes(1 << 20))
    (ckpts / ".LATEST.a1b2c3d4.tmp").write_text("step_000006\n")
    shutil.copytree(ckpts / "step_000002", ckpts / ".step_000002.old")  # a re-save killed before its clean-up
    kept = [ckpts / "notes.txt", ckpts / ".step_000006.keep-me", run / ".step_000006.abcdefgh"]
    for p in kept:
        p.write_text("not ours to remove")
    assert main(pretrain_argv(run, shard_dir, 4)) == 0  # already at step 4: only the start of training
    assert "removed 3 leftovers of killed checkpoint writes" in capsys.readouterr().out
    assert sorted(p.name for p in ckpts.iterdir()) == [".step_000006.keep-me", "LATEST", "notes.txt", "step_000002",
                                                       "step_000004"]  # fmt: skip
    assert all(p.exists() for p in kept)


def test_a_resave_killed_between_its_renames_is_restored_not_removed(pretrained, tmp_path):
    run = copy(pretrained, tmp_path)
    ckpts = run / "checkpoints"
    (ckpts / "step_000004").rename(ckpts / ".step_000004.old")  # the only copy of step 4
    with pytest.raises(ModelFileError, match="names step_000004, which is not a complete checkpoint"):
        load_model(run)
    assert ckpt_io.remove_temp_files(run) == []
    assert load_model(run).checkpoint.step == 4


# ----------------------------------------------------------------------------- weights
def bit_flip(data: bytes) -> bytes:
    """Set every exponent bit of the first float32 in a safetensors file: a flipped bit's NaN / inf."""
    start = 8 + struct.unpack("<Q", data[:8])[0]
    out = bytearray(data)
    out[start + 2] |= 0x80
    out[start + 3] |= 0x7F
    return bytes(out)


WEIGHT_DAMAGE = {
    "truncated": lambda b: b[: len(b) // 3],
    "random": lambda b: random.Random(0).randbytes(len(b)),
    "bit-flipped": bit_flip,
}


@pytest.mark.parametrize("damage", list(WEIGHT_DAMAGE))
@pytest.mark.parametrize("source", ["run", "hf"])
def test_damaged_weights_are_an_error_naming_the_file(source, damage, pretrained, hf_dir, tmp_path, capsys):
    model = copy(pretrained if source == "run" else hf_dir, tmp_path)
    weights = model / ("checkpoints/step_000004/model.safetensors" if source == "run" else "model.safetensors")
    weights.write_bytes(WEIGHT_DAMAGE[damage](weights.read_bytes()))
    with pytest.raises(ModelFileError) as e:
        load_model(model)
    assert e.value.path == weights
    fails_naming(["sample", "--model", str(model), "--max-new-tokens", "2"], weights, capsys)
    fails_naming(["chat", "--model", str(model), "--prompt", "hi"], weights, capsys)


# ----------------------------------------------------------------------------- configs and tokenizers
HF_DAMAGE = [
    ("config.json", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    ("config.json", b"[1, 2, 3]"),
    ("config.json", b'{"model_type": "llama"}'),
    ("config.json", b'{"model_type": "llama", "hidden_size": "wide", "num_attention_heads": 4}'),
    ("tokenizer.json", b'{"version": "1.0", "model": '),
    ("tokenizer_config.json", b"\xff\xfe\x00binary"),
]


@pytest.mark.parametrize(("name", "content"), HF_DAMAGE)
def test_damaged_hf_files_are_an_error_naming_the_file(name, content, hf_dir, tmp_path, capsys):
    hf = copy(hf_dir, tmp_path)
    (hf / name).write_bytes(content)
    with pytest.raises(ModelFileError) as e:
        load_model(hf)
    assert e.value.path == hf / name
    fails_naming(["chat", "--model", str(hf), "--prompt", "hi"], hf / name, capsys)
    fails_naming(["import", str(hf), "--out", str(tmp_path / "imported")], hf / name, capsys)


RUN_DAMAGE = [
    ("checkpoints/step_000004/meta.json", b"\xff\x00binary"),
    ("checkpoints/step_000004/meta.json", b'{"step": 4}'),
    ("checkpoints/step_000004/meta.json", b'{"step": 4, "model_config": {"n_layer": "four"}}'),
    ("tokenizer/tokenizer.json", b"\xff\x00binary"),
    ("tokenizer/tokenizer.tiktoken", b"garbage\n"),
]


@pytest.mark.parametrize(("name", "content"), RUN_DAMAGE)
def test_damaged_run_files_are_an_error_naming_the_file(name, content, pretrained, tmp_path, capsys):
    run = copy(pretrained, tmp_path)
    (run / name).write_bytes(content)
    with pytest.raises(ModelFileError, match=re.escape(str(run / name))):
        load_model(run)
    fails_naming(["sample", "--model", str(run), "--max-new-tokens", "2"], run / name, capsys)


# ----------------------------------------------------------------------------- GGUF headers
def gguf(kvs=(), tensors=(), n_kv: int | None = None, n_tensors: int | None = None, pad_to: int = 0) -> bytes:
    """A GGUF v3 file written byte by byte, counts free to lie."""
    n_kv, n_tensors = len(kvs) if n_kv is None else n_kv, len(tensors) if n_tensors is None else n_tensors
    data = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    return data + bytes(max(0, pad_to - len(data)))


def gstr(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: bytes, dims: list[int], offset: int = 0, ttype: int = 0) -> bytes:  # ttype 0: F32
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


ARCH = kv(b"general.architecture", 8, gstr(b"llama"))  # 8: string, 9: array, 6: float32
HOSTILE_GGUF = {
    "array-2e40": gguf([kv(b"general.architecture", 9, struct.pack("<IQ", 0, 2**40))], pad_to=121),  # the issue's
    "array-past-end": gguf([ARCH, kv(b"tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2**20))]),
    "string-length": gguf([kv(b"general.name", 8, struct.pack("<Q", 2**62))]),
    "key-length": gguf([struct.pack("<Q", 2**50)]),
    "kv-count": gguf([ARCH], n_kv=2**50),
    "tensor-count": gguf([ARCH], n_tensors=2**40),
    "tensor-extent": gguf([ARCH], [tensor_info(b"token_embd.weight", [2**30, 4])]),
    "tensor-offset": gguf([ARCH], [tensor_info(b"token_embd.weight", [4, 4], offset=2**60)]),
}

CHECK_GGUF = r"""
import contextlib, io, json, resource, sys
if sys.platform == "linux":  # a reader that still allocates what a header claims fails fast instead of swapping
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from llmstack.cli import main
from llmstack.interop.gguf import import_gguf

results = {}
for path in sys.argv[2:]:
    r = {}
    try:
        import_gguf(path)
        r["error"] = None
    except Exception as e:  # MemoryError included
        r["error"], r["path"] = type(e).__name__, str(getattr(e, "path", ""))
    out = sys.argv[1] + "/" + path.rsplit("/", 1)[-1]
    for argv in (["chat", "--model", path, "--prompt", "hi"], ["import", path, "--out", out]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except BaseException as e:
                rc = repr(e)
        r[argv[0]] = [rc, err.getvalue()]
    results[path] = r
print(json.dumps(results))
"""


def test_hostile_gguf_headers_are_refused_before_allocating(pretrained, tmp_path):
    paths = []
    for name, data in HOSTILE_GGUF.items():
        paths.append(tmp_path / f"{name}.gguf")
        paths[-1].write_bytes(data)
    assert len(HOSTILE_GGUF["array-2e40"]) == 121
    real = tmp_path / "truncated.gguf"
    assert main(["export", "--format", "gguf", "--model", str(pretrained), "--out", str(real)]) == 0
    real.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    paths.append(real)
    argv = [sys.executable, "-c", CHECK_GGUF, str(tmp_path / "out"), *map(str, paths)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    for path in map(str, paths):
        r = results[path]
        assert (r["error"], r["path"]) == ("ModelFileError", path), (path, r)
        for command in ("chat", "import"):
            rc, err = r[command]
            assert rc == 2 and err.startswith(f"llmstack: error: {path}: ") and "GGUF" in err, (path, command, r)
