"""Checkpoints: safetensors weights + JSON metadata + optimizer state, written atomically.

A run directory holds::

    checkpoints/step_000600/model.safetensors   weights, HF Llama names (a tied lm_head is not stored)
    checkpoints/step_000600/optimizer.pt        optimizer state and RNG states (torch.save)
    checkpoints/step_000600/meta.json           model config, train config, step, tokenizer
                                                fingerprint, data-loader state, metrics
    checkpoints/LATEST                          the name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place, and LATEST is replaced
atomically after that; a crash at any moment leaves the previous checkpoint intact and LATEST
pointing at a complete one.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmstack.io import atomic_write, read_json, write_json
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT

CKPT_VERSION = 1


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
) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = ckpt_root / name
    cfg = ModelConfig.from_dict(meta["model_config"])
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{name}."))
    try:
        save_file(model_state_for_saving(model, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if optimizer is not None:
            rng: dict[str, Any] = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "optimizer.pt")
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
    _prune(ckpt_root, keep, protect=name)
    return final


def _prune(ckpt_root: Path, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for p in steps[:-keep]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """Accept a run directory, its ``checkpoints`` folder, or one checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if (path / "meta.json").exists():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = root / "LATEST"
    if latest.exists():
        name = latest.read_text().strip()
        if (root / name / "meta.json").exists():
            return root / name
        raise FileNotFoundError(f"{latest} names {name!r}, which is not a complete checkpoint")
    raise FileNotFoundError(f"{path}: no checkpoint here (expected meta.json or checkpoints/LATEST)")


def load_meta(path: str | Path) -> Checkpoint:
    ckpt = find_checkpoint(path)
    meta = read_json(ckpt / "meta.json")
    for key in ("model_config", "step"):
        if key not in meta:
            raise ValueError(f"{ckpt / 'meta.json'}: missing '{key}'")
    return Checkpoint(ckpt, meta)


def read_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    f = ckpt.path / "model.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{f}: checkpoint weights are missing")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{f}: unreadable checkpoint weights, the file is truncated or corrupt ({e})") from None


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, tied: bool) -> None:
    """Load weights strictly (a tied head may be absent), naming the first missing / extra / misshapen tensor."""
    expected = model.state_dict()
    if tied:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"{where}: tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)


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


def load_training_state(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    f = ckpt.path / "optimizer.pt"
    if not f.exists():
        raise FileNotFoundError(f"{f}: optimizer state is missing; cannot resume training exactly")
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a damaged zip
        raise ValueError(f"{f}: unreadable optimizer state, the file is truncated or corrupt ({e})") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise ValueError(f"{f}: optimizer state does not match this model ({e})") from None
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
