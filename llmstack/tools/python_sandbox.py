"""A Python interpreter tool: the model's code runs in a separate, resource-limited process.

Containment, in layers (each one independent of the others):

* a fresh interpreter (``python -I -S``: no site-packages, no PYTHON* variables, no user site),
  a scrubbed environment, an empty temporary working directory that is deleted afterwards;
* rlimits: CPU seconds, address space (memory), file size (so output is bounded), open files,
  and number of processes (fork bombs), plus a wall-clock timeout that kills the process group;
* when run as root: its own network namespace (no interfaces but a down loopback: no network)
  and a fresh unprivileged uid for each run (cannot read root-only files, cannot see or signal
  another run's processes, and its process limit counts this run alone); every process left with
  that uid (a double-forked, ``setsid`` child included) is killed when the run ends;
  as an ordinary user: an unprivileged user+network namespace where the kernel allows it.
* output goes to unnamed files the parent opened before the child started and reads back through
  its own descriptors, bounded: the child can replace nothing the parent reads by path (a symlink
  to ``/etc/shadow``, a FIFO or ``/dev/zero`` in place of its output is never opened).

What is not covered: a kernel exploit, reading world-readable files outside the working directory
(no minimal root filesystem yet), other processes' ``/proc/PID/cmdline`` (no PID namespace yet),
and CPU/memory taken from other processes within the limits. ``SandboxResult.isolation`` says which
layers were in force.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
RUN_UIDS = range(3_000_000, 3_900_000)  # fresh uids for runs: above every system and subuid range in use
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
SANDBOX_DIR = "/tmp/sandbox"  # where the working directory appears inside the mount namespace
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # every world-writable folder of the host


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    output_bytes: int = 16_384
    max_processes: int = 16
    max_open_files: int = 64
    work_mb: int = 64  # the working folder and each private temp folder: a tmpfs of this size ...
    work_files: int = 2048  # ... and this many files and folders


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None: killed at the wall-clock limit
    timed_out: bool
    seconds: float
    isolation: list[str] = field(default_factory=list)

    def as_tool_output(self) -> str:
        parts = []
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append("stderr:\n" + self.stderr.rstrip("\n"))
        if self.timed_out:
            parts.append("error: the program ran past its time limit and was stopped")
        elif self.exit_code not in (0, None):
            parts.append(f"exit status {self.exit_code}")
        return "\n".join(parts) if parts else "(no output)"


def _processes_of(uid: int) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if p.stat().st_uid == uid:
                    pids.append(int(p.name))
    return pids


def _fresh_uid() -> int:
    """A uid no process has: runs never share one (so they cannot see or signal each other)."""
    for _ in range(100):
        uid = RUN_UIDS[int.from_bytes(os.urandom(4), "little") % len(RUN_UIDS)]
        if not _processes_of(uid):
            return uid
    raise RuntimeError("no free sandbox uid found")


def _kill_all(uid: int, seconds: float = 2.0) -> None:
    """SIGKILL every process of ``uid`` until none is left (escaped process groups included)."""
    deadline = time.monotonic() + seconds
    while (pids := _processes_of(uid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _read_bounded(f: BinaryIO, limit: int) -> str:
    """What the child wrote to ``f``, through the parent's own descriptor, at most ``limit`` bytes."""
    f.seek(0)
    data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")


def _child_setup(limits: SandboxLimits, as_root: bool, nproc: int, uid: int) -> None:
    """Runs in the child between fork and exec: namespaces first (they need privileges), then rlimits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if as_root:
        libc.unshare(CLONE_NEWNET)
        # a private mount namespace with empty, bounded tmpfs over the host's world-writable folders:
        # what the code writes there vanishes with it. The working folder is made inside the new /tmp
        # (bounded too), holding a copy of main.py; the host's working folder is never written to.
        if libc.unshare(CLONE_NEWNS) == 0 and libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
            code = Path("main.py").read_bytes()  # still root, in the host's working folder
            opts = f"size={limits.work_mb}m,nr_inodes={limits.work_files},mode=1777".encode()
            mounted = [
                libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, opts) == 0 for d in PRIVATE_TMP if os.path.isdir(d)
            ]
            if mounted and all(mounted):
                os.makedirs(SANDBOX_DIR, mode=0o700)
                (Path(SANDBOX_DIR) / "main.py").write_bytes(code)
                for path in (SANDBOX_DIR, f"{SANDBOX_DIR}/main.py"):
                    os.chown(path, uid, uid)
            else:  # no tmpfs here: the host's working folder, bind-mounted at the same place
                workdir_fd = os.open(".", os.O_RDONLY)
                os.makedirs(SANDBOX_DIR, exist_ok=True)
                libc.mount(f"/proc/self/fd/{workdir_fd}".encode(), SANDBOX_DIR.encode(), None, MS_BIND, None)
                os.close(workdir_fd)
            os.chdir(SANDBOX_DIR)
    else:
        libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes * 4, limits.output_bytes * 4))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if as_root:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _world_executable(path: str) -> bool:
    """Can an unprivileged user run this file (every directory on the way searchable by others)?"""
    real = Path(os.path.realpath(path))
    if not real.is_file() or not os.stat(real).st_mode & 0o001:
        return False
    return all(os.stat(d).st_mode & 0o001 for d in real.parents)


def _interpreter(drop_to_nobody: bool) -> str:
    """This interpreter, or, when 'nobody' cannot run it (a venv under /root), the system python3."""
    if not drop_to_nobody or _world_executable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if _world_executable(candidate):
            return candidate
    return ""


def _network_isolated(as_root: bool) -> bool:
    """Whether the unshare above can work here (probe in a throwaway child)."""
    flags = CLONE_NEWNET if as_root else CLONE_NEWUSER | CLONE_NEWNET
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        rc = ctypes.CDLL(None, use_errno=True).unshare(flags)
        os._exit(0 if rc == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` in a sandboxed interpreter and return what it printed."""
    limits = limits or SandboxLimits()
    as_root = os.geteuid() == 0
    python = _interpreter(drop_to_nobody=as_root)
    if not python:  # no interpreter an unprivileged uid may run: keep root's, without the user switch
        python, as_root = sys.executable, False
    uid = _fresh_uid() if as_root else os.getuid()
    nproc = limits.max_processes + (0 if as_root else len(_processes_of(uid)))
    workdir = Path(tempfile.mkdtemp(prefix="llmstack-sandbox-"))
    isolation = ["separate process", "rlimits (cpu, memory, file size, files, processes)", "scrubbed env"]
    isolation.append("output read through the parent's own descriptors, never by path")
    if _network_isolated(as_root):
        isolation.append("no network (own network namespace)")
    if as_root:
        isolation.append(
            f"private /tmp, /var/tmp, /dev/shm, /run/lock and working folder, each at most {limits.work_mb} MB "
            f"and {limits.work_files} files (own mount namespace)"
        )
        isolation.append(f"a fresh unprivileged uid ({uid}), every process of it killed at the end")
    t0 = time.monotonic()
    timed_out = False
    try:
        (workdir / "main.py").write_text(code, encoding="utf-8")
        if as_root:
            os.chown(workdir, uid, uid)
        home = SANDBOX_DIR if as_root else str(workdir)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [python, "-I", "-S", "-B", "main.py"],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=lambda: _child_setup(limits, as_root, nproc, uid),  # noqa: PLW1509 - the point
            )
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                if as_root:
                    _kill_all(uid)
                proc.wait()
            stdout, stderr = _read_bounded(out, limits.output_bytes), _read_bounded(err, limits.output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - t0
    code_ = None if timed_out else proc.returncode
    if code_ is not None and code_ < 0:
        stderr += f"\nkilled by signal {signal.Signals(-code_).name}"
    return SandboxResult(stdout, stderr, code_, timed_out, seconds, isolation)


def python_tool(code: str) -> str:
    """The tool's entry point: what the program printed, or what went wrong."""
    return run_python(code).as_tool_output()
