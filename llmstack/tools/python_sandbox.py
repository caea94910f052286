"""A Python interpreter tool: the model's code runs in a jail, in a separate, resource-limited process.

Where the kernel allows it (as root, or as a user with unprivileged user namespaces), the code runs
in the jail that ``jail.py`` builds for each run: its own PID, mount, network, IPC and UTS
namespaces; a minimal read-only root (the system's ``/usr/bin``, ``/usr/lib``; ``/dev`` basics; a
fresh ``/proc`` showing only its own processes; no host path visible); a bounded tmpfs ``/tmp`` as the
working folder; no new privileges; and, as root, a fresh unprivileged uid per run. Every process it
starts dies with it (the kernel kills a PID namespace with its first process). Whether the jail can
be built is probed once per interpreter (``jail_problem``).

Layers that hold in every case: a fresh interpreter (``python -I -S``: no site-packages, no PYTHON*
variables), a scrubbed environment, a temporary working folder deleted afterwards; rlimits on CPU
seconds, address space, file size, open files and processes; a wall-clock timeout that kills the
process group (and, as root, every process of the run's uid); output written to unnamed files the
parent opened before the child started and reads back through its own descriptors, bounded, so the
child can swap nothing the parent reads by path. Without the jail (``LLMSTACK_SANDBOX_NO_JAIL=1``,
or a kernel that refuses the namespaces) only these layers, no network and the fresh uid remain;
``SandboxResult.isolation`` says which layers were in force.

Not covered: a kernel exploit (there is no seccomp filter), and CPU/memory taken from other
processes within the limits.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
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

from llmstack.tools.jail import CLONE_NEWNET, CLONE_NEWUSER

RUN_UIDS = range(3_000_000, 3_900_000)  # fresh uids for runs: above every system and subuid range in use
SANDBOX_DIR = "/tmp/sandbox"  # the working folder, inside the jail
JAIL = Path(__file__).with_name("jail.py")  # the launcher that builds the jail (a stdlib-only script)


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
    """Without the jail: runs in the child between fork and exec (no network, rlimits, a fresh uid)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare(CLONE_NEWNET if as_root else CLONE_NEWUSER | CLONE_NEWNET)
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
    """Whether the unshare of the jail-less path can work here (probe in a throwaway child)."""
    flags = CLONE_NEWNET if as_root else CLONE_NEWUSER | CLONE_NEWNET
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        rc = ctypes.CDLL(None, use_errno=True).unshare(flags)
        os._exit(0 if rc == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _binds(python: str) -> list[str]:
    """What the jail mounts read-only: the system's programs and libraries (not /usr/local, /usr/share,
    /usr/src), and, for an interpreter installed elsewhere, its executable and its lib folder."""
    binds = [d for d in ("/usr/bin", "/usr/lib", "/usr/lib64") if os.path.isdir(d)]
    exe = Path(os.path.realpath(python))
    if exe.parent != Path("/usr/bin"):
        binds += [str(exe), str(exe.parent.parent / "lib")]
    return binds


_jail_status: dict[tuple[str, bool], str] = {}


def jail_problem(python: str, as_root: bool) -> str:
    """Why the jail cannot be built here ('' when it can): probed once per interpreter and mode."""
    key = (python, as_root)
    if key not in _jail_status:
        probe = _run(python, "print('ok')", SandboxLimits(wall_seconds=20), as_root, jail=True)
        ok = probe.exit_code == 0 and probe.stdout.strip() == "ok"
        _jail_status[key] = "" if ok else (probe.stderr.strip() or f"exit status {probe.exit_code}")[-300:]
    return _jail_status[key]


def _run(python: str, code: str, limits: SandboxLimits, as_root: bool, jail: bool) -> SandboxResult:
    uid = _fresh_uid() if as_root else os.getuid()
    # RLIMIT_NPROC counts every process of the uid: a fresh uid has none, the caller's own has its others
    nproc = limits.max_processes + (0 if as_root else len(_processes_of(uid)))
    workdir = Path(tempfile.mkdtemp(prefix="llmstack-sandbox-"))
    isolation = ["separate process", "rlimits (cpu, memory, file size, files, processes)", "scrubbed env"]
    isolation.append("output read through the parent's own descriptors, never by path")
    if jail:
        isolation += [
            "own PID namespace (sees only its own processes; all killed when it ends)",
            "no network (own network namespace)",
            "minimal read-only root (/usr and /dev basics; no host path visible)",
            f"private /tmp with the working folder, at most {limits.work_mb} MB and {limits.work_files} files",
            "no new privileges (setuid binaries gain nothing)",
        ]
    elif _network_isolated(as_root):
        isolation.append("no network (own network namespace)")
    if as_root:
        isolation.append(f"a fresh unprivileged uid ({uid}), every process of it killed at the end")
    home = SANDBOX_DIR if jail else str(workdir)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}
    t0 = time.monotonic()
    timed_out = False
    try:
        (workdir / "main.py").write_text(code, encoding="utf-8")
        if jail:
            (workdir / "root").mkdir(mode=0o700)
            cfg = {
                "as_root": as_root,
                "uid": uid if as_root else 0,
                "python": python,
                "env": env,
                "root": str(workdir / "root"),
                "binds": _binds(python),
                "work_mb": limits.work_mb,
                "work_files": limits.work_files,
                "cpu_seconds": limits.cpu_seconds,
                "memory_mb": limits.memory_mb,
                "file_bytes": limits.output_bytes * 4,
                "open_files": limits.max_open_files,
                "processes": nproc,
            }
            argv, setup = [python, "-I", "-S", "-B", str(JAIL), json.dumps(cfg)], None
        else:
            if as_root:
                os.chown(workdir, uid, uid)
            argv = [python, "-I", "-S", "-B", "main.py"]
            setup = lambda: _child_setup(limits, as_root, nproc, uid)  # noqa: E731
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=setup,  # noqa: PLW1509 - the point
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


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` in the jail (or, where it cannot be built, the layers that remain) and return its output."""
    limits = limits or SandboxLimits()
    as_root = os.geteuid() == 0
    python = _interpreter(drop_to_nobody=as_root)
    if not python:  # no interpreter an unprivileged uid may run: keep root's, without the user switch
        python, as_root = sys.executable, False
    jail = not os.environ.get("LLMSTACK_SANDBOX_NO_JAIL") and not jail_problem(python, as_root)
    return _run(python, code, limits, as_root, jail)


def python_tool(code: str) -> str:
    """The tool's entry point: what the program printed, or what went wrong."""
    return run_python(code).as_tool_output()
