"""The python tool's jail, attacked for real: every attempt below must be contained.

Each attempt is a program that prints ``ESCAPED ...`` if its attack worked and ``DONE`` when it ran to
the end (so an attempt that crashes early cannot pass unnoticed); a few are judged from the host side
(a file that must not appear, a process that must survive). The host plants what there is to steal:
a world-readable file under /tmp, a process whose command line holds a secret, a TCP listener on
127.0.0.1, an abstract unix socket, a SysV shared-memory segment, and a variable in its environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from llmstack.tools.python_sandbox import SandboxLimits, jail_problem, run_python

LIMITS = SandboxLimits(wall_seconds=8, cpu_seconds=2, memory_mb=256)
AS_ROOT = sys.platform == "linux" and os.geteuid() == 0
PYTHON = "/usr/bin/python3" if AS_ROOT else sys.executable
NO_JAIL = "" if sys.platform != "linux" else jail_problem(PYTHON, AS_ROOT)
jailed = pytest.mark.skipif(sys.platform != "linux" or bool(NO_JAIL), reason=f"no jail here: {NO_JAIL}")
SECRET = f"llmstack-host-secret-{os.getpid()}"
PROJECT = Path(__file__).resolve().parents[1]
SHM_KEY = 0x11A5_0000 + os.getpid() % 0xFFFF


@pytest.fixture(scope="module")
def host():
    """What the host holds that sandboxed code must never reach."""
    public = Path("/tmp") / f"{SECRET}.txt"
    public.write_text(SECRET)
    public.chmod(0o644)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", SECRET])
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0{SECRET}")
    abstract.listen()
    libc = ctypes.CDLL(None, use_errno=True)
    shm = libc.shmget(SHM_KEY, 4096, 0o1000 | 0o666)  # IPC_CREAT, readable by all
    os.environ["LLMSTACK_HOST_SECRET"] = SECRET
    yield {"public": public, "sleeper": sleeper.pid, "tcp": tcp.getsockname()[1]}
    os.environ.pop("LLMSTACK_HOST_SECRET", None)
    if shm >= 0:
        libc.shmctl(shm, 0, None)  # IPC_RMID
    sleeper.kill()
    sleeper.wait()
    tcp.close()
    abstract.close()
    public.unlink()


def _attempt(body: str, **fmt: object) -> str:
    code = "import ctypes, os, socket, subprocess, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    return code + body.format(**fmt) + "\nprint('DONE')\n"


# name -> program. {public}, {secret}, {project}, {sleeper}, {tcp}, {shm} are filled in from the host.
ESCAPES = {
    # host files and paths (S8)
    "list /work": "try:\n    print('ESCAPED', os.listdir('/work'))\nexcept OSError: pass",
    "list /opt": "try:\n    print('ESCAPED', os.listdir('/opt'))\nexcept OSError: pass",
    "list /home": "try:\n    print('ESCAPED', os.listdir('/home'))\nexcept OSError: pass",
    "list /root": "try:\n    print('ESCAPED', os.listdir('/root'))\nexcept OSError: pass",
    "list /usr/local": "try:\n    print('ESCAPED', os.listdir('/usr/local'))\nexcept OSError: pass",
    "read /etc/shadow": "try:\n    print('ESCAPED', open('/etc/shadow').read()[:40])\nexcept OSError: pass",
    "read /etc/passwd": "try:\n    print('ESCAPED', open('/etc/passwd').read()[:40])\nexcept OSError: pass",
    "read a world-readable host file": "try:\n    print('ESCAPED', open('{public}').read())\nexcept OSError: pass",
    "read the project's source": (
        "try:\n    print('ESCAPED', open('{project}/llmstack/__init__.py').read()[:40])\nexcept OSError: pass"
    ),
    "read the project's .git": "try:\n    print('ESCAPED', open('{project}/.git/HEAD').read())\nexcept OSError: pass",
    "walk the whole tree for host files": (
        "for root, dirs, files in os.walk('/'):\n"
        "    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ('/proc', '/usr')]\n"
        "    for f in files:\n"
        "        p = os.path.join(root, f)\n"
        "        if '{secret}' in p or p.endswith(('.git', 'pyproject.toml')):\n"
        "            print('ESCAPED', p)"
    ),
    "mountinfo names host paths": (
        "info = open('/proc/self/mountinfo').read()\n"
        "for host in ('/work', '/tmp/llmstack-sandbox', '/root', '{project}', 'overlay'):\n"
        "    if host in info:\n"
        "        print('ESCAPED', host)"
    ),
    "reach the host root through /proc/self/root/..": (
        "try:\n    print('ESCAPED', os.listdir('/proc/self/root/../../work'))\nexcept OSError: pass"
    ),
    "reach the host root through /proc/1/root": (
        "try:\n    print('ESCAPED', os.listdir('/proc/1/root/work'))\nexcept OSError: pass"
    ),
    "classic chroot breakout": (
        "try:\n    os.mkdir('x'); os.chroot('x'); os.chdir('../../..'); os.chroot('.')\n"
        "    print('ESCAPED', os.listdir('/'))\nexcept OSError: pass"
    ),
    "read /sys": "try:\n    print('ESCAPED', os.listdir('/sys/class/net'))\nexcept OSError: pass",
    "open a block device": (
        "for d in ('/dev/vda', '/dev/sda', '/dev/nvme0n1', '/dev/mem', '/dev/kmsg', '/dev/port'):\n"
        "    try:\n        open(d, 'rb').read(16); print('ESCAPED', d)\n    except OSError: pass"
    ),
    "mknod a disk device": (
        "try:\n    os.mknod('disk', 0o60600, os.makedev(254, 0)); print('ESCAPED')\nexcept OSError: pass"
    ),
    "mount a fresh proc": (
        "os.makedirs('p', exist_ok=True)\n"
        "if libc.mount(b'proc', b'p', b'proc', 0, None) == 0:\n    print('ESCAPED', os.listdir('p'))"
    ),
    "mount a tmpfs over /usr": "if libc.mount(b'tmpfs', b'/usr', b'tmpfs', 0, None) == 0:\n    print('ESCAPED')",
    "import the project": "try:\n    import llmstack; print('ESCAPED', llmstack.__file__)\nexcept ImportError: pass",
    "import host site-packages": "try:\n    import torch; print('ESCAPED', torch.__file__)\nexcept ImportError: pass",
    "see host variables": "print('ESCAPED' if '{secret}' in str(os.environ) else '', end='')",
    # writes that must not persist or land (S6, S7)
    "write to /": "try:\n    open('/evil', 'w').write('x'); print('ESCAPED')\nexcept OSError: pass",
    "write to /usr/bin": "try:\n    open('/usr/bin/evil', 'w').write('x'); print('ESCAPED')\nexcept OSError: pass",
    "write to /etc": "try:\n    open('/etc/evil', 'w').write('x'); print('ESCAPED')\nexcept OSError: pass",
    "write to /dev": "try:\n    open('/dev/evil', 'w').write('x'); print('ESCAPED')\nexcept OSError: pass",
    "write to /proc/sys": (
        "try:\n    open('/proc/sys/kernel/hostname', 'w').write('evil'); print('ESCAPED')\nexcept OSError: pass"
    ),
    "trigger sysrq": "try:\n    open('/proc/sysrq-trigger', 'w').write('h'); print('ESCAPED')\nexcept OSError: pass",
    # privileges
    "become root": "try:\n    os.setuid(0); print('ESCAPED')\nexcept OSError: pass",
    "run a setuid binary": (
        "for prog in (['su', '-c', 'id -u'], ['mount', '-t', 'tmpfs', 'none', '/usr'], ['passwd', '-S']):\n"
        "    try:\n"
        "        r = subprocess.run(prog, capture_output=True, text=True, timeout=3)\n"
        "        if r.returncode == 0 and r.stdout.strip() in ('0', ''):\n            print('ESCAPED', prog)\n"
        "    except (OSError, subprocess.SubprocessError): pass"
    ),
    "has capabilities": (
        "status = open('/proc/self/status').read()\n"
        "eff = [line for line in status.splitlines() if line.startswith('CapEff')][0].split()[1]\n"
        "nnp = [line for line in status.splitlines() if line.startswith('NoNewPrivs')][0].split()[1]\n"
        "if int(eff, 16) or nnp != '1':\n    print('ESCAPED', eff, nnp)"
    ),
    "raise a hard limit": (
        "import resource\ntry:\n    resource.setrlimit(resource.RLIMIT_AS, (-1, -1)); print('ESCAPED')\n"
        "except (ValueError, OSError): pass"
    ),
    "a user namespace to become root": (
        "if libc.unshare(0x10000000) == 0:\n"
        "    try:\n        print('ESCAPED', open('{public}').read())\n    except OSError: pass\n"
        "    try:\n        print('ESCAPED', os.listdir('/work'))\n    except OSError: pass"
    ),
    "set the hostname": "if libc.sethostname(b'evil', 4) == 0:\n    print('ESCAPED')",
    "ptrace a host process": "if libc.ptrace(16, {sleeper}, None, None) == 0:\n    print('ESCAPED')",  # ATTACH
    # processes (S3, S4, S5)
    "list host processes": (
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\nif len(pids) > 3:\n    print('ESCAPED', pids)"
    ),
    "read host command lines": (
        "for p in os.listdir('/proc'):\n"
        "    try:\n"
        "        if '{secret}' in open(f'/proc/{{p}}/cmdline').read():\n            print('ESCAPED', p)\n"
        "    except OSError: pass"
    ),
    "signal a host pid": "try:\n    os.kill({sleeper}, 9); print('ESCAPED')\nexcept OSError: pass",
    "signal every process": "try:\n    os.kill(-1, 9)\nexcept OSError: pass",
    "read the parent's environment": (
        "try:\n    e = open(f'/proc/{{os.getppid()}}/environ').read()\n"
        "    if '{secret}' in e: print('ESCAPED')\nexcept OSError: pass"
    ),
    "read /proc/1/environ": (
        "try:\n    print('ESCAPED' if '{secret}' in open('/proc/1/environ').read() else '', end='')\n"
        "except OSError: pass"
    ),
    # network and IPC
    "connect out over TCP": (
        "s = socket.socket(); s.settimeout(2)\n"
        "try:\n    s.connect(('1.1.1.1', 80)); print('ESCAPED')\nexcept OSError: pass"
    ),
    "send DNS over UDP": (
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n    s.sendto(b'x', ('8.8.8.8', 53)); print('ESCAPED')\nexcept OSError: pass"
    ),
    "connect to a host port on localhost": (
        "s = socket.socket(); s.settimeout(2)\n"
        "try:\n    s.connect(('127.0.0.1', {tcp})); print('ESCAPED')\nexcept OSError: pass"
    ),
    "connect to a host abstract unix socket": (
        "s = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect('\\0{secret}'); print('ESCAPED')\nexcept OSError: pass"
    ),
    "open a raw socket": (
        "try:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); print('ESCAPED')\n"
        "except OSError: pass"
    ),
    "see host interfaces": "if [n for _, n in socket.if_nameindex() if n != 'lo']:\n    print('ESCAPED')",
    "attach host shared memory": "if libc.shmget({shm}, 0, 0) >= 0:\n    print('ESCAPED')",
}


@jailed
@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_is_contained(name, host):
    fill = {"public": host["public"], "secret": SECRET, "project": PROJECT, "sleeper": host["sleeper"]}
    code = _attempt(ESCAPES[name], **fill, tcp=host["tcp"], shm=SHM_KEY)
    r = run_python(code, LIMITS)
    assert "DONE" in r.stdout, f"the attempt did not run to its end: {r.stderr[-500:]}"
    assert "ESCAPED" not in r.stdout and SECRET not in r.stdout + r.stderr, r.stdout
    assert os.path.exists(f"/proc/{host['sleeper']}"), "a host process was killed from inside"


# attempts judged from the host side, or whose containment is the program being stopped
@jailed
def test_writes_to_host_temp_folders_do_not_land():
    markers = [Path(d) / f"{SECRET}-{i}" for i, d in enumerate(("/tmp", "/var/tmp", "/dev/shm", "/run/lock"))]
    body = "".join(f"try:\n    open({str(m)!r}, 'w').write('x')\nexcept OSError: pass\n" for m in markers)
    r = run_python(_attempt(body), LIMITS)
    assert "DONE" in r.stdout and not [m for m in markers if m.exists()]


@jailed
def test_disk_and_inodes_are_bounded():
    code = (
        "n = 0\ntry:\n    for n in range(100_000):\n        open(f'f{n}', 'w').write('x' * 60_000)\n"
        "except OSError as e:\n    print('stopped', n, e.errno)\n"
    )
    limits = SandboxLimits(wall_seconds=20, cpu_seconds=10, work_mb=8, work_files=256)
    r = run_python(code, limits)
    stopped, n, errno_ = r.stdout.split()
    assert stopped == "stopped" and int(n) <= 256 and int(errno_) in (28, 122), r  # ENOSPC / EDQUOT
    tiny = run_python(
        "n = 0\ntry:\n    while True:\n        open(f'i{n}', 'w'); n += 1\nexcept OSError:\n    print(n)", limits
    )
    assert int(tiny.stdout) < 256


@jailed
def test_a_double_forked_setsid_child_dies_with_the_run():
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(0.3)\n"
        "        open('/tmp/sandbox/alive', 'w').write(str(os.getuid()))\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(os.getuid())\n"
    )
    r = run_python(code, LIMITS)
    uid = int(r.stdout)
    time.sleep(0.5)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _uid_of(p) == uid]
    assert not left, f"processes of the run outlived it: {left}"


def _uid_of(p: Path) -> int | None:
    with contextlib.suppress(OSError):
        return p.stat().st_uid
    return None


@jailed
def test_concurrent_runs_cannot_see_or_signal_each_other():
    victim_code = f"import time\nprint('{SECRET}-victim', flush=True)\ntime.sleep(3)\nprint('survived')"
    attacker = _attempt(
        "import signal\n"
        "for p in os.listdir('/proc'):\n"
        "    if not p.isdigit() or int(p) == os.getpid(): continue\n"
        "    try:\n"
        "        print('ESCAPED', open(f'/proc/{{p}}/cwd/main.py').read()[:30]); os.kill(int(p), 9)\n"
        "    except OSError: pass"
    )
    results = {}
    victim = threading.Thread(target=lambda: results.setdefault("victim", run_python(victim_code, LIMITS)))
    victim.start()
    time.sleep(1.0)
    results["attacker"] = run_python(attacker, LIMITS)
    victim.join()
    assert "ESCAPED" not in results["attacker"].stdout and "DONE" in results["attacker"].stdout
    assert "survived" in results["victim"].stdout


@jailed
@pytest.mark.parametrize(
    "code, sign",
    [
        ("import os\nwhile True:\n    os.fork()", "fork bomb"),
        ("import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()", "threads"),
        ("x = bytearray(1024**3)\nprint('ESCAPED')", "memory"),
        ("while True: pass", "cpu"),
        ("import time; time.sleep(60)\nprint('ESCAPED')", "sleep"),
        ("while True: print('x' * 1000)", "output"),
        ("fs = [open('/dev/null') for _ in range(100_000)]\nprint('ESCAPED')", "files"),
        ("open('big', 'wb').write(b'x' * 200_000_000)\nprint('ESCAPED')", "one huge file"),
    ],
    ids=["fork bomb", "threads", "memory", "cpu", "sleep", "output", "files", "one huge file"],
)
def test_resource_attacks_are_stopped(code, sign):
    limits = SandboxLimits(wall_seconds=4, cpu_seconds=2, memory_mb=256)
    r = run_python(code, limits)
    assert "ESCAPED" not in r.stdout
    assert r.timed_out or r.exit_code != 0, sign
    assert r.seconds < 8 and len(r.stdout) <= limits.output_bytes + 50


@jailed
@pytest.mark.parametrize("swap", ["symlink", "fifo"])
def test_output_cannot_be_swapped_for_a_host_file(swap, host):
    """The parent never opens the child's output by path: a symlink to a host file, /dev/zero or
    /proc/1/environ, or a FIFO, where output files could be, reads back nothing of them (S1, S2)."""
    targets = [str(host["public"]), "/dev/zero", "/proc/1/environ", "/etc/shadow"]
    make = "os.mkfifo(name)" if swap == "fifo" else "os.symlink(target, name)"
    code = (
        f"for i, target in enumerate({targets!r}):\n"
        "    for name in (f'.stdout{{i}}', '.stdout', '.stderr', f'/proc/self/cwd/out{{i}}'):\n"
        "        try:\n            os.unlink(name)\n        except OSError: pass\n"
        f"        try:\n            {make}\n        except OSError: pass\n"
    )
    before = set(Path(tempfile.gettempdir()).glob("llmstack-sandbox-*"))
    r = run_python(_attempt(code), LIMITS)
    assert r.stdout == "DONE\n" and SECRET not in r.stderr
    assert r.seconds < LIMITS.wall_seconds and not r.timed_out  # a FIFO in place of output hangs nothing
    assert not set(Path(tempfile.gettempdir()).glob("llmstack-sandbox-*")) - before  # working folder removed


@jailed
def test_every_run_gets_a_fresh_unprivileged_uid():
    uids = {int(run_python("import os; print(os.getuid())", LIMITS).stdout) for _ in range(3)}
    assert len(uids) == 3 if AS_ROOT else len(uids) == 1
    assert 0 not in uids or not AS_ROOT


def test_ordinary_code_still_works():
    code = (
        "import json, math, re, collections, decimal, fractions, itertools, statistics, subprocess, tempfile\n"
        "print(json.dumps({'sqrt2': round(math.sqrt(2), 4)}))\n"
        "print(sum(1 for c in 'strawberry' if c == 'r'))\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    open(d + '/a', 'w').write('ok')\n    print(open(d + '/a').read())\n"
        "print(subprocess.run(['echo', 'hi'], capture_output=True, text=True).stdout.strip())\n"
    )
    r = run_python(code, LIMITS)
    assert r.stdout.split("\n")[:4] == ['{"sqrt2": 1.4142}', "3", "ok", "hi"], r


def test_errors_come_back_and_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("LLMSTACK_SECRET_TOKEN", "hunter2")
    r = run_python("import os; print(sorted(os.environ)); print(os.listdir('.'))", LIMITS)
    assert "hunter2" not in r.stdout and "['HOME', 'LANG', 'PATH', 'TMPDIR']" in r.stdout
    bad = run_python("raise ValueError('boom')", LIMITS)
    assert bad.exit_code == 1 and "ValueError: boom" in bad.stderr and "exit status 1" in bad.as_tool_output()


@jailed
def test_isolation_is_reported():
    r = run_python("print(1)", LIMITS)
    text = " ".join(r.isolation)
    for layer in ("own PID namespace", "no network", "minimal read-only root", "no new privileges"):
        assert layer in text


def test_without_the_jail_the_remaining_layers_still_hold(monkeypatch):
    """LLMSTACK_SANDBOX_NO_JAIL (and machines without namespaces) fall back to rlimits, no network
    and a fresh uid; the report says so."""
    monkeypatch.setenv("LLMSTACK_SANDBOX_NO_JAIL", "1")
    r = run_python("x = bytearray(1024**3)", LIMITS)
    assert "MemoryError" in r.stderr
    assert not any("minimal read-only root" in i for i in r.isolation)
