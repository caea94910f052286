"""The agent's files: a workspace folder it can list, read and write, and a memory file it reads and appends to.

Every path the model names is relative to the workspace root. Refused, each with an error that says why:
absolute paths, any ``..`` component, and a path whose real location (symlinks followed, in every folder
along the way and in the last component) is outside the root. A write never follows a symlink in the last
component (``O_NOFOLLOW``), and files and listings are bounded in size so a tool result fits the context.

What is not covered: a process outside the agent swapping a folder for a symlink between the check and the
open (the workspace is the agent's own folder; nothing else is meant to write there while it runs), and
the python tool, which runs in its own jail and sees none of these files.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_READ_CHARS = 4000  # what one read returns (the rest is cut, and says so)
MAX_WRITE_CHARS = 100_000
MAX_LIST = 200  # entries in one listing
MAX_MEMORY_CHARS = 4000  # what the agent sees of its memory (the newest notes)


class WorkspaceError(ValueError):
    """A path or a write the workspace refuses; the message names the path and the reason."""


class Workspace:
    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"workspace {root}: not a folder (make it first: mkdir -p {root})")
        self.root = root.resolve()

    def path(self, name: str) -> Path:
        """The real path of ``name`` inside the workspace, or WorkspaceError."""
        name = name.strip().strip("'\"`")
        if not name:
            raise WorkspaceError("a path inside the workspace is needed")
        if "\x00" in name:
            raise WorkspaceError(f"{name!r}: a path cannot hold a NUL character")
        p = Path(name)
        if p.is_absolute():
            raise WorkspaceError(
                f"{name!r}: absolute paths are refused; name a file inside the workspace (e.g. notes.txt)"
            )
        if ".." in p.parts:
            raise WorkspaceError(f"{name!r}: '..' is refused; the agent works only inside its workspace")
        real = (self.root / p).resolve()
        if real != self.root and self.root not in real.parents:
            raise WorkspaceError(f"{name!r} leads outside the workspace (through a symlink)")
        return real

    def read(self, name: str) -> str:
        p = self.path(name)
        if p.is_dir():
            raise WorkspaceError(f"{name.strip()!r} is a folder; list it instead")
        if not p.is_file():
            raise WorkspaceError(f"no file {name.strip()!r} in the workspace")
        with p.open(encoding="utf-8", errors="replace") as f:
            text = f.read(MAX_READ_CHARS + 1)
        return text if len(text) <= MAX_READ_CHARS else text[:MAX_READ_CHARS] + "\n[file truncated]"

    def list(self, name: str = ".") -> str:
        p = self.path(name or ".")
        if not p.is_dir():
            raise WorkspaceError(f"no folder {name.strip()!r} in the workspace")
        entries = sorted(p.iterdir(), key=lambda e: e.name)
        lines = [f"{e.name}/" if e.is_dir() else f"{e.name} ({e.stat().st_size} bytes)" for e in entries[:MAX_LIST]]
        if len(entries) > MAX_LIST:
            lines.append(f"[{len(entries) - MAX_LIST} more entries]")
        return "\n".join(lines) if lines else "(empty folder)"

    def write(self, name: str, content: str) -> str:
        if len(content) > MAX_WRITE_CHARS:
            raise WorkspaceError(f"{name.strip()!r}: at most {MAX_WRITE_CHARS} characters per write")
        p = self.path(name)
        if p == self.root or p.is_dir():
            raise WorkspaceError(f"{name.strip()!r} is a folder, not a file")
        p.parent.mkdir(parents=True, exist_ok=True)  # inside the root: checked by path()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        return f"wrote {len(content)} characters to {p.relative_to(self.root)}"

    # ------------------------------------------------------------------------- the tools' text interface
    def read_tool(self, argument: str) -> str:
        return self.read(argument)

    def list_tool(self, argument: str) -> str:
        return self.list(argument.strip() or ".")

    def write_tool(self, argument: str) -> str:
        """``PATH`` on the first line and the content after it; or ``PATH CONTENT`` on one line."""
        head, newline, rest = argument.strip().partition("\n")
        if not newline:
            head, _, rest = head.partition(" ")
        if not head.strip():
            raise WorkspaceError("write needs a path, then the content: 'answer.txt\\n42'")
        return self.write(head, rest)


class Memory:
    """A text file of notes that outlives an episode: read at the start of each one, appended to by ``remember``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise WorkspaceError(f"memory file {self.path} is a folder")

    def read(self) -> str:
        if not self.path.is_file():
            return ""
        text = self.path.read_text(encoding="utf-8", errors="replace")
        return text if len(text) <= MAX_MEMORY_CHARS else text[-MAX_MEMORY_CHARS:]

    def append(self, note: str) -> str:
        note = " ".join(note.split())
        if not note:
            raise WorkspaceError("remember needs something to remember")
        if len(note) > 1000:
            raise WorkspaceError("a note is at most 1000 characters")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(f"- {note}\n")
        return "remembered"

    def recall_tool(self, argument: str) -> str:
        return self.read() or "(memory is empty)"
