"""Serving: an OpenAI-compatible API, a web chat UI and custom assistants over the engine."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from llmstack.assistants import list_assistants
from llmstack.serve.models import ModelRegistry


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after the path: ``runs/tiny/sft`` -> ``tiny-sft``)."""
    name, sep, path = spec.partition("=")
    if sep and name and path:
        return name, path
    if spec == "smollm2":
        return "smollm2", spec
    p = Path(spec).resolve()
    name = f"{p.parent.name}-{p.name}" if p.parent.name else p.name
    return name, spec


def build_registry(
    model_specs: list[str],
    assistants_root: Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    vlm_specs: list[str] | None = None,
) -> ModelRegistry:
    """Load every model named (and every assistant found under ``assistants_root``) onto ``device``, in
    ``dtype`` (``None``: as the files hold them; imports of quantized GGUF files come as float32)."""
    registry = ModelRegistry(device, dtype)
    now = int(time.time())
    for spec in model_specs:
        name, path = parse_model_spec(spec)
        registry.add(name, path, created=now)
    for spec in vlm_specs or []:  # vision-language models (``llmstack vlm train``): they also read images
        name, path = parse_model_spec(spec)
        registry.add_vlm(name, path, created=now)
    if assistants_root is not None and assistants_root.is_dir():
        errors: list[str] = []
        for assistant in list_assistants(assistants_root, errors=errors):
            registry.add_assistant(assistant, created=now)
        for e in errors:  # a broken assistant folder is reported, and the rest are served
            print(f"llmstack serve: skipped an assistant: {e}", file=sys.stderr)
    if not registry.models:
        raise ValueError("no models to serve: name one with --model PATH (a run, HF directory, .gguf or smollm2)")
    return registry
