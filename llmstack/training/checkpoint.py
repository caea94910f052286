"""Checkpoints: safetensors weights + JSON metadata + optimizer state, written atomically, never lost.

A run directory holds::

    checkpoints/step_000600/model.safetensors   weights, HF Llama names (a tied lm_head is not stored)
    checkpoints/step_000600/optimizer.pt        optimizer state and RNG states (torch.save)
    checkpoints/step_000600/meta.json           model config, train config, step, tokenizer
                                                fingerprint, data-loader state, metrics
    checkpoints/LATEST                          the name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place, and LATEST is replaced
atomically after that; a crash at any moment leaves the previous checkpoint intact and LATEST
pointing at a complete one. What a killed write leaves behind (``.step_000600.<random>/``,
``.LATEST.<random>.tmp``) is removed by ``remove_temp_files`` when training starts.

Damage is never guessed around: a LATEST that is empty, binary, a directory, missing beside saved
checkpoints, or naming an incomplete one, and a checkpoint whose files do not read back, raise
``ModelFileError`` naming the file. Only ``use_newest_valid`` (``--resume-from-latest-valid``) moves
past a damaged checkpoint, and it renames it aside rather than deleting it. Rotation deletes only
checkpoints older than the one just written.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmstack.io import atomic_write, write_json
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT

CKPT_VERSION = 1
CHECKPOINT_NAME = re.compile(r"step_(\d{6,})")
TEMP_NAME = re.compile(r"\.(step_\d{6,}\.([a-z0-9_]{8}|old|copy)|LATEST\.[a-z0-9_]{8}\.tmp)")
"""What killed writes leave in ``checkpoints/``: ``save_checkpoint``'s and ``save_run``'s temporary directories
(``tempfile.mkdtemp``: 8 random characters), the ``.old`` copy of a re-saved step, ``eval/scaling.py``'s
``.copy``, and ``atomic_write``'s ``.LATEST.<random>.tmp``."""


class ModelFileError(ValueError):
    """A model file (checkpoint pointer, weights, optimizer state, config, tokenizer, GGUF) is damaged or
    unreadable. ``path`` names it; a ``ValueError``, so the command line reports it and exits 2."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes despite the two-argument __init__
        return (type(self), (self.path, self.reason))


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in a model file (meta.json, config.json, tokenizer_config.json, ...): a missing file
    raises FileNotFoundError, any other problem ModelFileError."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except OSError as e:  # a directory in its place, unreadable permissions
        raise ModelFileError(path, f"unreadable ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ModelFileError(path, "not UTF-8 text: the file is damaged or not JSON") from None
    except json.JSONDecodeError as e:
        raise ModelFileError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated, random or otherwise damaged one raises ModelFileError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} are missing")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError for a bad header or short file, OSError, and others
        raise ModelFileError(path, f"unreadable {what}, the file is truncated or corrupt ({e})") from None


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.meta["model_config"])


def step_of(path: Path) -> int:
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """The ``step_NNNNNN`` directories under ``root``, newest first (by step, not by name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of, reverse=True)


def model_state_for_saving(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # shares storage with model.embed_tokens.weight
    return state


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    keep: int = 2,
    protect: Collection[str] = (),
    state: dict[str, torch.Tensor] | None = None,
    extra: Callable[[Path], Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step``, point LATEST at it, then rotate: of the checkpoints older than this one, all
    but the newest ``keep - 1`` are deleted (``keep <= 0`` keeps everything); names in ``protect`` never are.

    ``state`` replaces the model's own state dict (a LoRA run saves its merged weights); ``extra(folder)``
    writes more files into the checkpoint before it appears (a LoRA run's adapter); ``optimizer_state``
    replaces ``optimizer.state_dict()`` (FSDP's full state, gathered from every process)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = ckpt_root / name
    cfg = ModelConfig.from_dict(meta["model_config"])
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{name}."))
    try:
        weights = model_state_for_saving(model, cfg) if state is None else state
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if extra is not None:
            extra(tmp)
        if optimizer is not None or optimizer_state is not None:
            rng: dict[str, Any] = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            opt = optimizer_state if optimizer_state is not None else optimizer.state_dict()  # type: ignore[union-attr]
            torch.save({"optimizer": opt, "rng": rng}, tmp / "optimizer.pt")
        write_json(tmp / "meta.json", {**meta, "step": step, "format_version": CKPT_VERSION})
        if final.exists():  # re-saving the same step (e.g. after a resume): swap it out
            old = ckpt_root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_write(ckpt_root / "LATEST") as f:
        f.write(name + "\n")
    if keep > 0:
        older = [p for p in checkpoint_dirs(ckpt_root) if step_of(p) < step and p.name not in protect]
        for p in older[keep - 1 :]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def remove_temp_files(run_dir: str | Path) -> list[Path]:
    """Remove what killed checkpoint writes left in ``run_dir/checkpoints`` (names matching ``TEMP_NAME`` only;
    nothing else is touched) and return what was removed.

    A ``.step_N.old`` without its ``step_N`` (a re-save killed between its two renames) is that checkpoint's
    only copy: it is renamed back instead.
    """
    root = Path(run_dir) / "checkpoints"
    removed = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if not TEMP_NAME.fullmatch(p.name):
            continue
        if p.name.endswith(".old") and p.is_dir() and not (root / p.name[1:-4]).exists():
            p.rename(root / p.name[1:-4])
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def read_latest(latest: Path) -> str:
    """The checkpoint name in a LATEST file; ModelFileError for anything but a checkpoint name."""
    if latest.is_dir():
        raise ModelFileError(latest, "is a directory; expected a file naming the newest checkpoint (step_NNNNNN)")
    try:
        text = latest.read_bytes().decode("ascii")
    except OSError as e:
        raise ModelFileError(latest, f"unreadable ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ModelFileError(latest, "holds binary data; expected the name of a checkpoint (step_NNNNNN)") from None
    name = text.strip()
    if not CHECKPOINT_NAME.fullmatch(name):
        holds = f"holds {name[:40]!r}" if name else "is empty"
        raise ModelFileError(latest, f"{holds}; expected the name of a checkpoint (step_NNNNNN)")
    return name


def find_checkpoint(path: str | Path) -> Path:
    """Accept a run directory, its ``checkpoints`` folder, or one checkpoint directory.

    FileNotFoundError when there is no checkpoint at all; ModelFileError when LATEST is damaged, missing beside
    saved checkpoints, or names an incomplete one (it lists the checkpoints there are).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if (path / "meta.json").exists():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = root / "LATEST"
    saved = [p for p in checkpoint_dirs(root) if (p / "meta.json").exists() or (p / "model.safetensors").exists()]
    there = f" (checkpoints there: {', '.join(p.name for p in saved[:5])})" if saved else ""
    if not latest.exists():
        if saved:
            raise ModelFileError(latest, f"missing beside saved checkpoints{there}")
        raise FileNotFoundError(f"{path}: no checkpoint here (expected meta.json or checkpoints/LATEST)")
    try:
        name = read_latest(latest)
    except ModelFileError as e:
        raise ModelFileError(latest, e.reason + there) from None
    if not (root / name / "meta.json").is_file():
        raise ModelFileError(latest, f"names {name}, which is not a complete checkpoint{there}")
    return root / name


def load_meta(path: str | Path) -> Checkpoint:
    ckpt = find_checkpoint(path)
    meta = read_json_object(ckpt / "meta.json")
    for key in ("model_config", "step"):
        if key not in meta:
            raise ModelFileError(ckpt / "meta.json", f"missing '{key}'")
    if not isinstance(meta["model_config"], dict) or not isinstance(meta["step"], int):
        raise ModelFileError(ckpt / "meta.json", "'model_config' must be an object and 'step' an integer")
    return Checkpoint(ckpt, meta)


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The checkpoint training resumes from: None for a run with no checkpoints yet, ModelFileError if the
    newest one (or LATEST) is damaged."""
    try:
        return load_meta(Path(run_dir) / "checkpoints")
    except FileNotFoundError:
        return None


def read_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return read_safetensors(ckpt.path / "model.safetensors", "checkpoint weights")


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, tied: bool) -> None:
    """Load weights strictly (a tied head may be absent), naming the first missing / extra / misshapen tensor,
    and the first one holding NaN or infinity (a bit flipped on disk)."""
    expected = model.state_dict()
    if tied:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            where, f"weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ModelFileError(
                where, f"tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
            )
    check_finite(state, where)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """A weight holding NaN or infinity is a damaged file (training stops before it saves a non-finite loss)."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ModelFileError(where, f"tensor {k} holds NaN or infinite values: the weights are damaged")


def load_model_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """A checkpoint's weights into a model built from its config (training resume, reward models)."""
    where = str(ckpt.path / "model.safetensors")
    load_state(model, read_weights(ckpt), where, ckpt.model_config.tie_embeddings)


def load_gpt(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Checkpoint]:
    """Our GPT from a checkpoint, without its tokenizer (reward models, checkpoint tests); the stages that
    need a model with its tokenizer use ``llmstack.interop.load.load_model``."""
    ckpt = load_meta(path)
    model = GPT(ckpt.model_config)
    load_model_weights(model, ckpt)
    return model.to(device), ckpt


def read_training_state(ckpt: Checkpoint) -> dict[str, Any]:
    """A checkpoint's optimizer and RNG states, as ``save_checkpoint`` wrote them."""
    f = ckpt.path / "optimizer.pt"
    if not f.exists():
        raise FileNotFoundError(f"{f}: optimizer state is missing; cannot resume training exactly")
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a damaged zip
        raise ModelFileError(f, f"unreadable optimizer state, the file is truncated or corrupt ({e})") from None
    if not (isinstance(state, dict) and "optimizer" in state and isinstance(state.get("rng"), dict)):
        raise ModelFileError(f, "not an llmstack optimizer state (expected 'optimizer' and 'rng')")
    return state


def load_training_state(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    f = ckpt.path / "optimizer.pt"
    state = read_training_state(ckpt)
    try:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelFileError(f, f"optimizer state does not match this model ({e})") from None
    if "cuda" in state["rng"] and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def validate_checkpoint(path: Path) -> Checkpoint:
    """Read all of one checkpoint directory back (metadata, weights, optimizer state): ModelFileError if any
    part is damaged or missing."""
    if not (path / "meta.json").is_file():
        raise ModelFileError(path / "meta.json", "missing: the checkpoint is incomplete")
    ckpt = load_meta(path)
    check_finite(read_weights(ckpt), str(path / "model.safetensors"))
    try:
        read_training_state(ckpt)
    except FileNotFoundError:
        raise ModelFileError(path / "optimizer.pt", "missing: training cannot resume from this checkpoint") from None
    return ckpt


def use_newest_valid(run_dir: str | Path) -> tuple[Checkpoint | None, list[str]]:
    """Point LATEST at the newest checkpoint that reads back whole, to resume past a damaged one.

    Damaged checkpoints newer than it are renamed ``step_N.damaged`` (kept for inspection, out of rotation's
    reach) and a damaged LATEST is rewritten; nothing is deleted. Returns that checkpoint (None for a run with
    no checkpoints) and one line for each thing it changed; ModelFileError if no checkpoint is valid.
    """
    root = Path(run_dir) / "checkpoints"
    latest = root / "LATEST"
    damaged: list[tuple[Path, ModelFileError]] = []
    for path in checkpoint_dirs(root):
        try:
            ckpt = validate_checkpoint(path)
        except ModelFileError as e:
            damaged.append((path, e))
            continue
        notes = []
        for bad, problem in damaged:
            aside = _free_name(root, f"{bad.name}.damaged")
            bad.rename(aside)
            notes.append(f"skipped damaged checkpoint {bad.name}, kept as {aside}: {problem}")
        pointed = None
        try:
            pointed = read_latest(latest) if latest.exists() else None
        except ModelFileError as problem:
            notes.append(str(problem))
        if pointed != path.name:
            if latest.is_dir():
                latest.rename(_free_name(root, "LATEST.damaged"))
            with atomic_write(latest) as f:
                f.write(path.name + "\n")
            notes.append(f"{latest} now names {path.name}")
        return ckpt, notes
    if damaged or latest.exists():  # a LATEST with no checkpoint to name
        problems = "; ".join(str(e) for _, e in damaged) or f"{latest} exists but there is no step_NNNNNN checkpoint"
        raise ModelFileError(root, f"no valid checkpoint to resume from ({problems})")
    return None, []


def _free_name(root: Path, name: str) -> Path:
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}.{n}"
    return candidate
