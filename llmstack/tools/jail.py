"""The python tool's jail: run as a script (stdlib only) by ``python_sandbox.run_python``.

    python -I -S -B jail.py CONFIG_JSON

It starts as root (or as an ordinary user, inside a new user namespace) and builds, for one run:

* new PID, mount, network, IPC and UTS namespaces: the code is PID 1 of its own PID namespace, sees
  only its own processes in a fresh ``/proc``, and when it ends the kernel kills every process it
  left behind (double-forked, ``setsid`` ones included); no network interface but a down loopback;
* a minimal root filesystem on an empty tmpfs, entered with ``pivot_root`` (the host's root is
  detached, so no host path is reachable or listed in ``/proc/self/mountinfo``):
  ``/usr`` (the interpreter and its stdlib) read-only, nosuid, nodev, with the ``/bin``, ``/lib``...
  links of the host; ``/dev`` with null, zero, full, random and urandom only; a size- and
  inode-limited tmpfs ``/tmp`` holding the working folder ``/tmp/sandbox`` with ``main.py``;
  the root itself read-only;
* then rlimits, no new privileges (setuid binaries gain nothing), and, as root, the fresh
  unprivileged uid the caller chose; the parent-death signal is SIGKILL, so the whole namespace
  dies with this launcher.

If any step fails the launcher prints ``jail: <step>: <error>`` to stderr and exits 125 without
running the code: the caller then knows the jail is not available here.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
DEVICES = ("null", "zero", "full", "random", "urandom")
JAIL_FAILED = 125  # exit status when the jail could not be built (the code never ran)
ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    pass


def _check(rc: int, step: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise JailError(f"{step}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, opts: str | None = None) -> None:
    enc = [s.encode() if s is not None else None for s in (src, dst, fstype, opts)]
    _check(libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {dst}")


def _bind_readonly(src: str, dst: str) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()  # noqa: SIM115 - a mount point
    _mount(src, dst, None, MS_BIND | MS_REC)
    _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _map_ids(uid: int, gid: int) -> None:
    """In a new user namespace: be root inside, the caller outside."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def _build_root(cfg: dict, code: bytes) -> None:
    """Inside the new namespaces: a fresh minimal root, then pivot into it."""
    new = cfg["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    os.makedirs(new, exist_ok=True)
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=256,mode=755")
    for d in cfg["binds"]:  # /usr, and an interpreter prefix that lies elsewhere
        _bind_readonly(d, new + d)
    for name in ROOT_LINKS:
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), f"{new}/{name}")
        elif os.path.isdir(host):
            _bind_readonly(host, f"{new}/{name}")
    os.makedirs(f"{new}/dev")
    _mount("tmpfs", f"{new}/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for dev in DEVICES:
        if os.path.exists(f"/dev/{dev}"):
            open(f"{new}/dev/{dev}", "a").close()  # noqa: SIM115 - a mount point
            _mount(f"/dev/{dev}", f"{new}/dev/{dev}", None, MS_BIND)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{new}/dev/{name}")
    os.symlink("/proc/self/fd", f"{new}/dev/fd")
    os.makedirs(f"{new}/proc")
    _mount("proc", f"{new}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(f"{new}/tmp")
    opts = f"size={cfg['work_mb']}m,nr_inodes={cfg['work_files']},mode=1777"
    _mount("tmpfs", f"{new}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts)
    work = f"{new}/tmp/sandbox"
    os.makedirs(work, mode=0o700)
    with open(f"{work}/main.py", "wb") as f:
        f.write(code)
    for path in (work, f"{work}/main.py"):
        os.chown(path, cfg["uid"], cfg["uid"])
    os.makedirs(f"{new}/etc")
    os.makedirs(f"{new}/.old")
    os.chdir(new)
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise JailError(f"pivot_root: unknown system call number on {platform.machine()}")
    _check(libc.syscall(number, b".", b".old"), "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.old", MNT_DETACH), "umount old root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    libc.sethostname(b"sandbox", 7)


def _limit(cfg: dict) -> None:
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_mb"] * mb, cfg["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["open_files"], cfg["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _init(cfg: dict, code: bytes) -> None:
    """PID 1 of the new PID namespace: build the root, drop everything, become the program."""
    _build_root(cfg, code)
    os.chdir("/tmp/sandbox")
    _limit(cfg)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if cfg["as_root"]:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["processes"], cfg["processes"]))
    # set after the uid change (which clears it): the namespace dies with its launcher (the caller
    # also kills every process of the run's uid, which covers the instant between the two)
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-B", "main.py"], cfg["env"])


def main() -> None:
    cfg = json.loads(sys.argv[1])
    with open("main.py", "rb") as f:  # the caller's working folder, read before anything changes
        code = f.read()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    try:
        if not cfg["as_root"]:
            uid, gid = os.getuid(), os.getgid()
            _check(libc.unshare(flags | CLONE_NEWUSER), "unshare")
            _map_ids(uid, gid)
        else:
            _check(libc.unshare(flags), "unshare")
    except (JailError, OSError) as e:
        print(f"jail: {e}", file=sys.stderr)
        sys.exit(JAIL_FAILED)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            _init(cfg, code)
        except (JailError, OSError) as e:
            print(f"jail: {e}", file=sys.stderr, flush=True)
        os._exit(JAIL_FAILED)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):  # die the same way, so the caller sees the signal
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
