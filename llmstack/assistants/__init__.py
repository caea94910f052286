"""Custom assistants ("GPTs"): a base model with its own instructions, knowledge files and tools.

An assistant is a folder (``assistant.yaml`` + ``knowledge/``); see ``assistant.py`` for the format
and ``llmstack assistant --help`` for the commands that create, list and chat with one.
"""

from llmstack.assistants.assistant import (
    Assistant,
    Generation,
    Prepared,
    Retrieval,
    Source,
    cite,
    create_assistant,
    default_root,
    list_assistants,
    load_assistant,
    sources_footer,
)

__all__ = [
    "Assistant",
    "Generation",
    "Prepared",
    "Retrieval",
    "Source",
    "cite",
    "create_assistant",
    "default_root",
    "list_assistants",
    "load_assistant",
    "sources_footer",
]
