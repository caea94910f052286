"""Atomic file writes: nothing already saved is damaged by a crash or a bad input.

Every file llmstack writes goes to a temporary sibling first and is renamed into place,
so a reader sees either the old file or the complete new one, never half of one. Figures too:
``pyplot()`` gives matplotlib on its file-only backend and ``save_png`` writes a figure atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: figures are drawn to files, no display is needed."""
    import matplotlib  # heavy: ~0.4 s to import with pyplot, and only the plotting functions need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: see above

    return plt


def save_png(fig: Any, path: str | Path, dpi: int | None = None) -> Path:
    """Write a matplotlib figure as a PNG atomically, then close it (figures hold memory until closed)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", **({"dpi": dpi} if dpi else {}))
    pyplot().close(fig)
    return path


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_text(path: str | Path, missing: str = "file not found") -> str:
    """A UTF-8 file's text; a missing file or other bytes raise an error naming the file (``missing`` says
    what to do about it)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def jsonl_objects(path: str | Path, example: str, missing: str = "file not found") -> Iterator[tuple[str, dict]]:
    """(``path:line``, object) for each non-blank line of a JSONL file of objects; a line that is not JSON,
    or not an object (``example`` shows one), raises an error naming the file and line."""
    for n, line in enumerate(read_text(path, missing).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object {example}")
        yield where, obj
