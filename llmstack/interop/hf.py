"""Hugging Face model directories: import (Llama, Qwen2, Mistral, Mixtral, Qwen2-MoE and GPT-2) and export.

Import reads ``config.json``, the weights (``model.safetensors``, a sharded safetensors index, or
``pytorch_model.bin``) and the tokenizer (``tokenizer.json``, or GPT-2's ``vocab.json`` + ``merges.txt``)
with ``tokenizer_config.json`` for bos/eos and the chat template. It needs neither ``transformers``
nor network access. ``LlamaForCausalLM`` (Llama 1-3.x, SmolLM2), ``Qwen2ForCausalLM`` (Qwen2 / 2.5),
``MistralForCausalLM``, ``MixtralForCausalLM`` and ``Qwen2MoeForCausalLM`` directories become our ``GPT``
(``ModelConfig.family`` records which; rope scaling, q/k/v biases, sliding windows and experts as
``model/config.py`` lists), ``GPT2LMHeadModel`` our ``GPT2``. Weights keep the file's dtype (bf16 stays
bf16) unless ``import_hf(path, dtype=...)`` asks for another. What is not covered: SentencePiece (non
byte-level) tokenizers, other architectures, and the config features ``ModelConfig.from_hf_dict`` refuses
(longrope, partial rotary, Llama's o_proj bias, MLP biases, a sliding window on some layers only, dense
layers among Qwen2-MoE's sparse ones); each is refused with its name.

Export writes the model's own family (``LlamaForCausalLM`` for ours, ``Qwen2ForCausalLM`` for an
imported Qwen2, ...) with float32 weights, as ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(dir)``
read it offline: ``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` (with the chat template) and ``special_tokens_map.json``. The directory is
assembled under a temporary name and renamed at the end, so a failure never leaves half of one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as RawHF
from tokenizers import decoders, models, pre_tokenizers

from llmstack.interop.bundle import Bundle, check_vocab
from llmstack.interop.tokenizer import HFTokenizer, adds_bos, hf_from_ranks, with_bos
from llmstack.io import write_json
from llmstack.model.config import FAMILIES, ModelConfig
from llmstack.model.gpt2 import GPT2, GPT2Config
from llmstack.model.llama import GPT
from llmstack.tokenizer.bpe import Tokenizer
from llmstack.tokenizer.special import PAD
from llmstack.training.checkpoint import ModelFileError, load_state, read_json_object, read_safetensors

IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
"""Buffers some HF versions save in the state dict; recomputed by the model, never learned."""

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""GPT-2 weights HF stores as ``Conv1D`` (in, out); ``nn.Linear`` wants (out, in)."""


# ----------------------------------------------------------------------------- import
def import_hf(path: str | Path, dtype: torch.dtype | None = None) -> Bundle:
    """Load a local HF model directory (Llama, Qwen2, Mistral or GPT-2 family) into our engine.

    ``dtype``: the model's parameter dtype; None keeps the file's (that of most of its weights).
    A damaged file (config.json, weights, tokenizer files) raises ``ModelFileError`` naming it."""
    path = Path(path)
    config_file = path / "config.json"
    config = read_json_object(config_file)
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise ModelFileError(config_file, f"'architectures' must be a list, found {archs!r}")
    model: GPT | GPT2
    if model_type == "gpt2" or "GPT2LMHeadModel" in archs:
        model = GPT2(_parse_config(GPT2Config.from_hf_dict, config, config_file))
        state = _gpt2_state(read_weights(path))
    elif model_type in FAMILIES or set(FAMILIES.values()) & set(archs):
        model = GPT(_parse_config(ModelConfig.from_hf_dict, config, config_file))
        state = _moe_state(read_weights(path), model.config)
        if not model.config.tie_embeddings and "lm_head.weight" not in state:
            raise ValueError(f"{path}: lm_head.weight is missing and tie_word_embeddings is false")
    else:
        supported = ", ".join(f"{family} / {arch}" for family, arch in FAMILIES.items())
        raise ValueError(
            f"{config_file}: unsupported architecture {archs or model_type!r} "
            f"(supported: {supported}, gpt2 / GPT2LMHeadModel)"
        )
    model.to(dtype or _weights_dtype(state))
    load_state(model, state, str(weights_file(path)), tied=isinstance(model, GPT2) or model.config.tie_embeddings)
    tok, tok_config = read_tokenizer(path)
    check_vocab(model.config.vocab_size, tok, str(path))
    return Bundle(model.eval(), tok, _chat_template(path, tok_config), tok.bos_token, tok.eos_token)


def _parse_config(parse: Callable[[dict[str, Any]], Any], config: dict[str, Any], where: Path) -> Any:
    """A model config from config.json; a missing or mistyped field raises ModelFileError naming the file."""
    try:
        return parse(config)
    except KeyError as e:
        raise ModelFileError(where, f"missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(where, f"not a usable model configuration ({e})") from None


def weights_file(path: Path) -> Path:
    """The file an HF directory's weights are read from (a sharded checkpoint: its index)."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(
        f"{path}: no weights (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory in their stored dtypes, whichever of the usual file layouts it uses."""
    f = weights_file(path)
    if f.name == "model.safetensors":
        state = read_safetensors(f)
    elif f.name.endswith(".index.json"):
        weight_map = read_json_object(f).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and Path(v).name == v for v in weight_map.values()
        ):
            raise ModelFileError(f, "'weight_map' must map tensor names to file names in this directory")
        state = {k: v for shard in sorted(set(weight_map.values())) for k, v in read_safetensors(path / shard).items()}
    else:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a damaged zip or pickle
            raise ModelFileError(f, f"unreadable weights, the file is truncated or corrupt ({e})") from None
    return {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}


def _weights_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most of the weights (a checkpoint may keep a few small tensors in fp32)."""
    sizes: Counter[torch.dtype] = Counter()
    for v in state.values():
        if v.is_floating_point():
            sizes[v.dtype] += v.numel()
    return sizes.most_common(1)[0][0] if sizes else torch.float32


MIXTRAL_NAMES = {".mlp.": ".block_sparse_moe.", ".gate_proj.": ".w1.", ".down_proj.": ".w2.", ".up_proj.": ".w3."}
"""Our (Qwen2-MoE's) names of a mixture's weights -> Mixtral's."""


def _rename(key: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        key = key.replace(old, new)
    return key


def _moe_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A mixture's weights under our names: Mixtral's renamed; experts stored fused as 3D tensors
    (transformers 5's in-memory layout: ``experts.gate_up_proj`` (E, 2I, C), ``experts.down_proj`` (E, C, I))
    split per expert; a zero-width shared expert dropped. Dense families pass through."""
    if cfg.moe is None:
        return state
    if cfg.family == "mixtral":
        back = {new: old for old, new in MIXTRAL_NAMES.items()}
        state = {_rename(k, back) if ".block_sparse_moe." in k else k: v for k, v in state.items()}
    out = {}
    for k, v in state.items():
        prefix = k.rsplit("experts.", 1)[0] + "experts."
        if k.endswith("experts.gate_up_proj") and v.ndim == 3:
            for e, (gate, up) in enumerate(t.chunk(2, dim=0) for t in v.unbind(0)):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif k.endswith("experts.down_proj") and v.ndim == 3:
            out.update({f"{prefix}{e}.down_proj.weight": t for e, t in enumerate(v.unbind(0))})
        elif not (cfg.moe.shared_size == 0 and ".shared_expert" in k):
            out[k] = v
    return out


def _gpt2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 names -> ours: add the ``transformer.`` prefix a bare ``GPT2Model`` lacks; transpose Conv1D."""
    out = {}
    for k, v in state.items():
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        out[k] = v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v
    return out


def read_tokenizer(path: Path) -> tuple[HFTokenizer, dict[str, Any]]:
    """The directory's byte-level BPE tokenizer as an ``HFTokenizer``, plus its ``tokenizer_config.json``."""
    tok_config: dict[str, Any] = {}
    config_file = path / "tokenizer_config.json"
    if config_file.exists():
        tok_config = read_json_object(config_file)
    tok_json, vocab, merges = path / "tokenizer.json", path / "vocab.json", path / "merges.txt"
    if not tok_json.exists() and not (vocab.exists() and merges.exists()):
        raise FileNotFoundError(f"{path}: no tokenizer (expected tokenizer.json, or vocab.json + merges.txt)")
    try:
        if tok_json.exists():
            raw = RawHF.from_file(str(tok_json))
        else:
            raw = RawHF(models.BPE.from_file(str(vocab), str(merges)))
            raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            raw.decoder = decoders.ByteLevel()
    except Exception as e:  # the tokenizers library raises a plain Exception for a damaged file
        where = tok_json if tok_json.exists() else f"{vocab} + {merges.name}"
        raise ModelFileError(where, f"unreadable tokenizer ({e})") from None
    decoder = json.loads(raw.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise ValueError(f"{path}: unsupported tokenizer (decoder {decoder.get('type')!r}); only byte-level BPE")
    bos, eos = _token_name(tok_config.get("bos_token")), _token_name(tok_config.get("eos_token"))
    # add_bos: tokenizer_config.json's word where it has one (Llama's tokenizer classes follow it), else what
    # the tokenizer.json post-processor does (transformers 5 reads only that)
    add_bos = tok_config.get("add_bos_token")
    add_bos = add_bos if isinstance(add_bos, bool) else adds_bos(raw, bos)
    try:
        return HFTokenizer(raw, bos, eos, add_bos=add_bos), tok_config
    except ValueError as e:
        raise ModelFileError(config_file, str(e)) from None


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(path: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(jinja, f"unreadable chat template ({e})") from None
    template = tok_config.get("chat_template")
    return template if isinstance(template, str) else None


# ----------------------------------------------------------------------------- export
def export_hf(bundle: Bundle, out: str | Path) -> Path:
    """Write ``bundle`` (a ``GPT`` of any family, mixtures of experts included) as an HF directory of its family."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new --out (export never overwrites)")
    if not isinstance(bundle.model, GPT):
        raise ValueError(f"HF export supports Llama-architecture models, not {bundle.architecture}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _write_hf(bundle, bundle.model, tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_hf(bundle: Bundle, model: GPT, tmp: Path) -> None:
    cfg, tok = model.config, bundle.tokenizer
    ids = {name: (tok.special_tokens.get(name) if name else None) for name in (bundle.bos_token, bundle.eos_token)}
    pad = PAD if PAD in tok.special_tokens else None
    bos_id, eos_id = ids.get(bundle.bos_token), ids.get(bundle.eos_token)
    add_bos = bool(bundle.add_bos) and bos_id is not None
    # bos before every text, as Llama's tokenizer.json does it (a post-processor): transformers' tokenizer(text)
    # and harnesses that tokenize with it (lm-eval's add_bos_token=True) see what the model was trained on;
    # apply_chat_template tokenizes without it, so the template's own <|bos|> stays the only one
    raw = with_bos(hf_from_ranks(tok) if isinstance(tok, Tokenizer) else tok.raw, bundle.bos_token, add_bos)
    pad_id = tok.special_tokens.get(pad) if pad else None
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.family == "mixtral":
        state = {_rename(k, MIXTRAL_NAMES): v for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_json(
        tmp / "config.json",
        {
            **cfg.to_hf_dict(),
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "dtype": "float32",
        },
    )
    write_json(tmp / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id})
    (tmp / "tokenizer.json").write_text(raw.to_str(pretty=False), encoding="utf-8")
    specials = {"bos_token": bundle.bos_token, "eos_token": bundle.eos_token, "pad_token": pad}
    specials = {k: v for k, v in specials.items() if v}
    write_json(
        tmp / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.max_seq_len,
            "chat_template": bundle.chat_template,
        },
    )
    write_json(tmp / "special_tokens_map.json", specials)
