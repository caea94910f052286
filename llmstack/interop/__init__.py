"""Interoperability: Hugging Face and GGUF import/export, tokenizers across formats, chat templates."""
