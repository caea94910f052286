"""Byte-level BPE tokenizer (trained with HF ``tokenizers``, run with ``tiktoken``)."""

from __future__ import annotations

from llmstack.tokenizer.bpe import Tokenizer
from llmstack.tokenizer.special import SPECIAL_TOKENS

__all__ = ["SPECIAL_TOKENS", "Tokenizer"]
