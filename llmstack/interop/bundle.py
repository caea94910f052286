"""What import produces and every stage consumes: a model, its tokenizer, its chat format, its metadata.

A ``Bundle`` is format-free: ``hf.py`` and ``gguf.py`` read and write it, ``save_run`` stores it in
llmstack's own checkpoint layout (``<run>/checkpoints/step_000000`` + ``<run>/tokenizer``), and
``load.py`` opens one from any source.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmstack.interop.tokenizer import (
    AnyTokenizer,
    HFTokenizer,
    as_tiktoken,
)
from llmstack.io import atomic_write, write_json
from llmstack.model.gpt2 import GPT2
from llmstack.model.llama import GPT
from llmstack.tokenizer.bpe import Tokenizer
from llmstack.tokenizer.special import ASSISTANT_END, BOS, CHAT_TEMPLATE
from llmstack.training.checkpoint import CKPT_VERSION, Checkpoint

END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", ASSISTANT_END, "</s>")
"""Special tokens that end an assistant turn in the chat formats we have met."""


@dataclass
class Bundle:
    model: GPT | GPT2
    tokenizer: AnyTokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    checkpoint: Checkpoint | None = None  # set for our runs and checkpoints (its meta: stage, fingerprint, ...)
    tokenizer_dir: Path | None = None  # where the tokenizer was read from, for our runs
    source: str = ""
    add_bos: bool | None = None  # a text starts with bos (a completion prompt, a scored text); None: as below

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer, HFTokenizer) and self.chat_template:
            self.tokenizer.chat_template = self.chat_template  # so that (model, tokenizer) is enough to chat
        elif isinstance(self.tokenizer, Tokenizer) and self.chat_template and self.chat_template != CHAT_TEMPLATE:
            # an import converted to our format: its own template and its bos/eos names go with it
            self.tokenizer.chat_template = self.chat_template
            self.tokenizer.bos_token, self.tokenizer.eos_token = self.bos_token, self.eos_token
        if self.add_bos is None:  # what the model's files say (HF, GGUF); ours: every document started with bos
            tok = self.tokenizer
            self.add_bos = tok.add_bos if isinstance(tok, HFTokenizer) else self.bos_token is not None

    @property
    def meta(self) -> dict[str, Any]:
        """The checkpoint's metadata (empty for a model read straight from HF or GGUF)."""
        return self.checkpoint.meta if self.checkpoint else {}

    def to(self, device: str | torch.device | None) -> Bundle:
        self.model.to(device or "cpu")
        return self

    def copy_tokenizer(self, run: Path) -> None:
        """Put this model's tokenizer beside the checkpoints a stage writes into ``run`` (kept if already there)."""
        if not (run / "tokenizer").exists():
            if self.tokenizer_dir is None:
                self.tokenizer.save(run / "tokenizer")
            else:
                shutil.copytree(self.tokenizer_dir, run / "tokenizer", dirs_exist_ok=True)

    def ours(self) -> Tokenizer:
        """Our tokenizer, for the stages that need its special tokens (training, our chat format, tools)."""
        if not isinstance(self.tokenizer, Tokenizer) or not isinstance(self.model, GPT):
            raise ValueError(
                f"{self.source or 'this model'}: this stage needs an llmstack model and tokenizer (with our special "
                f"tokens); got {type(self.model).__name__} with {type(self.tokenizer).__name__}"
            )
        return self.tokenizer

    def format_meta(self) -> dict[str, Any]:
        """What a checkpoint trained from this model stores to be opened with the same chat format: nothing for
        ours (our template is implied, today's or the one exported before tool calls matched the server), the
        template, bos/eos names and add_bos for any other."""
        ours = (None, CHAT_TEMPLATE)
        if isinstance(self.tokenizer, Tokenizer) and self.chat_template in ours:
            return {}
        return {
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos": self.add_bos,
        }

    @property
    def architecture(self) -> str:
        return "gpt2" if isinstance(self.model, GPT2) else "llama"

    def stop_ids(self) -> set[int]:
        """Ids that end a generated reply: eos, plus any end-of-turn special the tokenizer has."""
        return stop_ids_of(self.tokenizer, self.eos_token)

    def template(self) -> str:
        if self.chat_template:
            return self.chat_template
        if ASSISTANT_END in self.tokenizer.special_tokens:
            return CHAT_TEMPLATE
        raise ValueError("this model has no chat template (tokenizer_config.json / tokenizer.chat_template)")


def stop_ids_of(tok: AnyTokenizer, eos_token: str | None) -> set[int]:
    """Ids that end a generated reply under ``tok``: eos, plus any end-of-turn special it has."""
    names = {n for n in (eos_token, *END_OF_TURN_NAMES) if n}
    ids = {tok.special_tokens[n] for n in names if n in tok.special_tokens}
    if isinstance(tok, HFTokenizer) and tok.eos_id is not None:
        ids.add(tok.eos_id)
    return ids


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
    return Bundle(model, tok, CHAT_TEMPLATE if eos else None, bos, eos)


def bundle_of(model: GPT, tok: AnyTokenizer) -> Bundle:
    """The bundle of a model being trained and its tokenizer: ours (our specials and template), or any other
    with the chat template its tokenizer carries."""
    if isinstance(tok, Tokenizer):
        return llmstack_bundle(model, tok)
    return Bundle(model, tok, tok.chat_template, tok.bos_token, tok.eos_token)


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
        "add_bos": bundle.add_bos,
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
