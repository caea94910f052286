"""Atomic file writes, and reads whose cost a hostile file cannot choose.

Every file llmstack writes goes to a temporary sibling first and is renamed into place,
so a reader sees either the old file or the complete new one, never half of one. Figures too:
``pyplot()`` gives matplotlib on its file-only backend and ``save_png`` writes a figure atomically.

Reading other people's files: ``open_capped`` streams a file in blocks, gunzipped when it starts with
gzip's magic, and raises ``OversizedInput`` past a number of expanded bytes (a gzip bomb costs time
up to the cap, never memory); ``bounded_lines`` gives its lines up to a length, skipping longer ones
without holding them; ``json_deeper_than`` finds a JSON text nested too deeply before parsing it
(Python's parser recurses: a line of 200,000 ``[`` raises RecursionError).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

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
        if json_deeper_than(line, MAX_JSON_DEPTH):
            raise ValueError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} deep")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object {example}")
        yield where, obj


# ---------------------------------------------------------------------------------------------
# Bounded reads
# ---------------------------------------------------------------------------------------------

GZIP_MAGIC = b"\x1f\x8b"
BLOCK = 1 << 20  # what a stream reads, and a skip holds, at a time
MAX_JSON_DEPTH = 100  # our own files nest 5 deep at most


class OversizedInput(Exception):
    """A file gave more bytes, once decompressed, than its reader allows."""


class _Capped(io.RawIOBase):
    """A binary stream that raises ``OversizedInput`` past ``cap`` bytes read."""

    def __init__(self, f: io.BufferedIOBase, cap: int) -> None:
        self._f, self._cap, self.n_read = f, cap, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]  # (any writable buffer)
        # One read below (readinto1): a gzip error in the next member must not take this one's bytes with it
        n = self._f.readinto1(b)
        self.n_read += n
        if self.n_read > self._cap:
            raise OversizedInput(f"more than {self._cap:,} bytes once decompressed")
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def open_capped(path: str | Path, max_bytes: int) -> io.BufferedReader:
    """The file's bytes, gunzipped if it starts with gzip's magic (whatever its name), read in blocks;
    reading past ``max_bytes`` of them raises ``OversizedInput``.

    Gzip errors surface while reading: ``gzip.BadGzipFile`` (an OSError), ``EOFError`` (truncated),
    ``zlib.error``.
    """
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == GZIP_MAGIC
    # gzip decompresses ~8 KiB of input at a time; the reader returned closes the file
    f: io.BufferedIOBase = gzip.open(path, "rb") if gzipped else open(path, "rb")  # noqa: SIM115
    return io.BufferedReader(_Capped(f, max_bytes), BLOCK)


def bounded_lines(f: BinaryIO, max_bytes: int) -> Iterator[bytes | None]:
    """Each line of ``f`` (with its newline), or ``None`` for one longer than ``max_bytes`` (skipped in blocks)."""
    while line := f.readline(max_bytes + 1):
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = f.readline(BLOCK)
        yield None


def skip(f: BinaryIO, n: int) -> None:
    """Read past ``n`` bytes a block at a time; EOFError if the stream ends first."""
    while n > 0:
        got = len(f.read(min(n, BLOCK)))
        if not got:
            raise EOFError(f"the input ends {n:,} bytes early")
        n -= got


_JSON_TOKEN = re.compile(r'\\.|["\[\]{}]', re.S)  # an escape pair, a quote or a bracket: one pass, no backtracking


def json_deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON text nests arrays and objects more than ``limit`` deep, without parsing it.

    Brackets inside strings do not count. A text with at most ``limit`` opening brackets cannot nest
    deeper (two counts: the common case); otherwise one pass over the quotes, escapes and brackets,
    which stops as soon as the limit is passed.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_string = 0, False
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c == '"':
            in_string = not in_string
        elif in_string or len(c) == 2:
            continue
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
