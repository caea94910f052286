"""Where llmstack keeps downloaded data and run outputs.

Everything fetched at set-up lives under ``data_dir()`` (``./data`` or ``$LLMSTACK_DATA``);
everything a run writes lives under ``runs_dir()`` (``./runs`` or ``$LLMSTACK_RUNS``).
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    return Path(os.environ.get("LLMSTACK_DATA", "data")).resolve()


def runs_dir() -> Path:
    return Path(os.environ.get("LLMSTACK_RUNS", "runs")).resolve()
