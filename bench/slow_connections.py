"""Slow connections (slowloris) against ``llmstack serve``: does the server keep answering?

Starts a real server on localhost, opens N connections from this process that send a request's
headers a byte at a time and never finish them (one byte on each every ``--interval`` seconds), and
while they are open measures ``GET /health`` (every half second) and a chat request (after the ramp
and at the end), counts the descriptors the server holds, and at the end the size of its log.

    python bench/slow_connections.py                          # 20,000 connections, a tiny model made here
    python bench/slow_connections.py --connections 2000 --hold 10 --reconnect
    python bench/slow_connections.py --rate 1000                # open them over 20 s, not at once
    python bench/slow_connections.py --server-nofile 4096     # the server under a lower open-file limit

This process needs a descriptor per connection: its soft limit is raised to the hard one, and with
too low a hard limit it says so and opens as many as that allows. ``--reconnect`` reopens the
connections the server closes at every tick (a harsher attacker: a connection flood on top).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from llmstack.interop.bundle import llmstack_bundle, save_run
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT
from llmstack.tokenizer import Tokenizer

HEADER = b"GET /health HTTP/1.1\r\nHost: bench\r\nUser-Agent: slow\r\n"
TRICKLE = b"X-Slow: 1\r\n"  # repeated for ever: the headers never end
SPARE_FDS = 100  # this process's own files, the probes' sockets


def make_model(folder: Path) -> Path:
    """A tiny random model with a tokenizer trained here: what is measured is the server, not the model."""
    words = ["the", "model", "reads", "tokens", "and", "predicts", "the", "next", "one", "a", "list", "holds"]
    texts = [" ".join(words[(i * j) % len(words)] + str(i % 97) for j in range(40)) for i in range(300)]
    tok = Tokenizer.train(texts, 288)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, max_seq_len=256
    )
    return save_run(llmstack_bundle(GPT(cfg).eval(), tok), folder / "tiny", "bench: tiny random model")


def start_server(model: str, port: int, log: Path, extra: list[str], nofile: int | None) -> subprocess.Popen:
    def limit() -> None:  # in the child, before exec
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    cmd = [sys.executable, "-m", "llmstack", "serve", "--model", f"bench={model}", "--no-assistants"]
    cmd += ["--port", str(port), "--max-tokens-cap", "64", *extra]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=limit)
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return proc
        time.sleep(0.1)
    raise RuntimeError(f"the server did not start:\n{log.read_text()}")


@dataclass
class Probes:
    """/health every half second, from a thread, with the server's descriptor count."""

    url: str
    pid: int
    health: list[tuple[float, float | None]] = field(default_factory=list)  # (when, seconds or None: failed)
    fds: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            self.health.append((time.monotonic() - t0, timed(lambda: get(self.url + "/health"))))
            with contextlib.suppress(OSError):
                self.fds.append(len(os.listdir(f"/proc/{self.pid}/fd")))
            self.stop.wait(0.5)


def get(url: str, body: dict | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


ERRORS: list[str] = []  # why each failed probe failed


def timed(fn) -> float | None:
    t = time.monotonic()
    try:
        fn()
    except OSError as e:
        ERRORS.append(f"{type(e).__name__} after {time.monotonic() - t:.1f} s: {e}"[:120])
        return None
    return time.monotonic() - t


def chat(url: str) -> float | None:
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    return timed(lambda: get(url + "/v1/chat/completions", body))


class Attack:
    """N non-blocking sockets, each sending ``HEADER`` then ``TRICKLE`` for ever, a byte per tick."""

    def __init__(self, port: int) -> None:
        self.addr = ("127.0.0.1", port)
        self.socks: list[socket.socket | None] = []
        self.sent: list[int] = []
        self.opened = self.reopened = self.failed = 0

    def open_one(self, i: int | None = None) -> None:
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.failed += 1
            return
        if i is None:
            self.opened += 1
            self.socks.append(s)
            self.sent.append(0)
        else:
            self.reopened += 1
            self.socks[i], self.sent[i] = s, 0

    def tick(self, reconnect: bool, start: int = 0) -> int:
        """A byte on every open socket from ``start`` (the first bytes whole, once connected); returns how
        many are open."""
        alive = 0
        for i in range(start, len(self.socks)):
            s = self.socks[i]
            if s is None:
                if reconnect:
                    self.open_one(i)
                continue
            if self._closed(s):
                s.close()
                self.socks[i] = None
                continue
            n = self.sent[i]
            chunk = HEADER if n == 0 else TRICKLE[(n - len(HEADER)) % len(TRICKLE) :][:1]
            try:
                self.sent[i] += s.send(chunk)
            except (BlockingIOError, OSError) as e:
                if getattr(e, "errno", None) not in (errno.EAGAIN, errno.ENOTCONN):
                    s.close()
                    self.socks[i] = None
                    continue
            alive += 1
        return alive

    @staticmethod
    def _closed(s: socket.socket) -> bool:
        try:
            return s.recv(1) == b""
        except BlockingIOError:
            return False
        except OSError as e:
            return e.errno != errno.ENOTCONN

    def close(self) -> None:
        for s in self.socks:
            if s is not None:
                s.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def fd_budget(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if want + SPARE_FDS > soft:
        print(f"this process may open {soft} files: {soft - SPARE_FDS} connections, not {want} (raise ulimit -Hn)")
        return soft - SPARE_FDS
    return want


def ms(x: float | None) -> str:
    return "failed" if x is None else f"{x * 1000:.0f} ms"


def summary(xs: list[float | None]) -> str:
    ok = [x for x in xs if x is not None]
    if not ok:
        return f"{len(xs)} probes, all failed"
    return (
        f"p50 {statistics.median(ok) * 1000:.0f} ms, max {max(ok) * 1000:.0f} ms, "
        f"{len(xs) - len(ok)} of {len(xs)} failed"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=0, help="connections opened per second (default: all at once)")
    ap.add_argument("--interval", type=float, default=3.0, help="seconds between two bytes on a connection")
    ap.add_argument("--hold", type=float, default=30.0, help="seconds to keep trickling after the ramp")
    ap.add_argument("--reconnect", action="store_true", help="reopen the connections the server closes")
    ap.add_argument("--model", help="a model for the server (default: a tiny random one made here)")
    ap.add_argument("--server-nofile", type=int, help="the server's open-file limit (soft = hard)")
    ap.add_argument("--server-args", default="", help="more `llmstack serve` flags, e.g. '--max-connections 256'")
    args = ap.parse_args()
    n = fd_budget(args.connections)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(make_model(Path(tmp)))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = Path(tmp) / "server.log"
        proc = start_server(model, port, log, args.server_args.split(), args.server_nofile)
        url = f"http://127.0.0.1:{port}"
        attack, probes = Attack(port), Probes(url, proc.pid)
        prober = threading.Thread(target=probes.run, daemon=True)
        try:
            idle_health, idle_chat = timed(lambda: get(url + "/health")), chat(url)
            start_cpu = cpu_seconds(proc.pid)
            prober.start()
            t0 = time.monotonic()
            for i in range(n):
                attack.open_one()
                if i % 500 == 499:  # the first bytes on these 500, and a breath for the probes
                    attack.tick(False, start=i - 499)
                    time.sleep(max(0.01, t0 + (i + 1) / args.rate - time.monotonic()) if args.rate else 0.01)
            ramp = time.monotonic() - t0
            ramp_cpu = cpu_seconds(proc.pid)
            alive = attack.tick(False)
            peak_chat = chat(url)
            end, held = time.monotonic() + args.hold, [alive]
            while time.monotonic() < end:
                time.sleep(args.interval)
                held.append(attack.tick(args.reconnect))
            end_chat = chat(url)
        finally:
            probes.stop.set()
            attack.close()
            proc.terminate()
            proc.wait(timeout=30)
        log_bytes = log.stat().st_size
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    ramping = [x for t, x in probes.health if t <= ramp]
    holding = [x for t, x in probes.health if t > ramp]
    print(f"connections: {n} asked, {attack.opened} opened in {ramp:.1f} s, {attack.reopened} reopened later, ", end="")
    print(f"{attack.failed} failed to open")
    print(f"open from this side after the ramp {held[0]}, then per {args.interval:g} s tick: {held[1:]}")
    print(f"server CPU during the ramp: {ramp_cpu - start_cpu:.1f} s in {ramp:.1f} s")
    print(f"server descriptors: max {max(probes.fds, default=0)}, last {probes.fds[-1] if probes.fds else '-'}")
    print(f"/health idle: {ms(idle_health)}; during the ramp: {summary(ramping)}; while holding: {summary(holding)}")
    slow = [f"{t:.1f}s:{ms(x)}" for t, x in probes.health if x is None or x >= 0.5]
    print(f"/health probes over 0.5 s or failed (at seconds into the attack): {' '.join(slow) or 'none'}")
    for e in ERRORS:
        print(f"  failed: {e}")
    print(f"chat (16 tokens): idle {ms(idle_chat)}, after the ramp {ms(peak_chat)}, at the end {ms(end_chat)}")
    print(f"server log: {log_bytes} bytes; last lines:")
    for line in tail:
        print(f"  {line[:160]}")
    answered = [*ramping, *holding, peak_chat, end_chat]
    return 0 if all(x is not None and x < 2 for x in answered) else 1  # the goal: everything within 2 s


if __name__ == "__main__":
    sys.exit(main())
