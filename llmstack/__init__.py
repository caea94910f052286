"""llmstack: the whole life of a small LLM, runnable and inspectable.

``llmstack.load_model(source)`` opens any model (a run, a checkpoint, a Hugging Face folder, a GGUF
file, ``smollm2``) as a ``Bundle``: model, tokenizer, chat format, metadata.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load_model":  # lazy: `import llmstack.io` must not pull in torch and the interop readers
        from llmstack.interop.load import load_model

        return load_model
    raise AttributeError(f"module 'llmstack' has no attribute {name!r}")
