"""Load on a chat server: N concurrent streaming chat clients for a bounded time, ours or llama.cpp's.

Starts a real server process on localhost (``llmstack serve``, or llama-cpp-python's
``llama_cpp.server`` from a separate venv), runs each ``--clients`` count in turn (every client sends a
streaming chat request, reads it to the end, and sends the next) for ``--seconds``, and prints a
markdown table: requests/s, generated tokens/s, p50/p99 time to first token and errors per client
count. Each request draws its max_tokens from ``--max-tokens LO:HI`` with a per-client seeded RNG, so
every server sees the same sequence of lengths; EOS is not suppressed, so generated tokens are counted
from the stream (the usage block when the server sends one for ``stream_options.include_usage``,
else one per content chunk; the ``count`` column says which). The ``vs 1`` column is tokens/s over
the one-client row of the same server: what batching concurrent requests buys.

    python bench/serve_load.py --model smollm2 --clients 1,8,32 --seconds 20
    python bench/serve_load.py --model smollm2 --server llamacpp --clients 1,8,32
    python bench/serve_load.py --model smollm2 --compare llamacpp,llmstack --clients 1,8,32
    python bench/serve_load.py --model smollm2 --compare llmstack:static,llmstack:continuous

llama.cpp's server (llama-cpp-python 0.3.x) holds one ``Llama`` object behind a global lock: it serves
one request at a time and does not batch concurrent ones; by default (``interrupt_requests``) a newly
queued request even cuts the streaming one short, so it is started with ``--interrupt_requests False``.
Its threads spin at a barrier after every op: on a 2-core machine with other work running, 2 threads
decoded SmolLM2 at 3-10 tok/s and 1 thread at 44-50 tok/s, so ``--threads`` defaults to half the
cores (as llama-cpp's own ``n_threads`` does) for prompt and decode alike; ``llmstack serve`` gets the
same count as ``OMP_NUM_THREADS``, torch's threads spinning the same way. Build it once, outside this
repo:

    python3 -m venv /work/llamacpp-venv
    /work/llamacpp-venv/bin/pip install "llama-cpp-python[server]==0.3.36"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai

from llmstack.interop.load import resolve_model

QUESTIONS = [
    "What is 123 * 456?",
    "Who are you?",
    "How many r are in strawberry?",
    "Tell me something about Python lists.",
    "Hi! How are you today?",
]
SERVERS = ("llmstack", "llamacpp")


@dataclass
class Stats:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    counted: set[str] = field(default_factory=set)  # "usage" and/or "chunks"
    usage_tokens: int = 0  # tokens of the requests that reported usage ...
    usage_chunks: int = 0  # ... and their content chunks, as a cross-check


@dataclass
class Row:
    server: str
    clients: int
    load: float
    st: Stats
    wall: float

    @property
    def tps(self) -> float:
        return self.st.tokens / self.wall


@dataclass
class Spec:
    """One server configuration: ``llamacpp``, ``llmstack`` or ``llmstack:SCHEDULER``."""

    kind: str
    scheduler: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.scheduler}" if self.scheduler else self.kind


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"{text}: want N or LO:HI with 1 <= LO <= HI")
    return a, b


def parse_clients(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: want a comma-separated list of client counts") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text}: want client counts >= 1")
    return out


def parse_spec(text: str) -> Spec:
    kind, _, sched = text.strip().partition(":")
    if kind not in SERVERS:
        raise argparse.ArgumentTypeError(f"{text}: server must be one of {', '.join(SERVERS)}")
    return Spec(kind, sched or None)


async def client(
    api: openai.AsyncOpenAI, model: str, deadline: float, lengths: tuple[int, int], seed: int, i: int, st: Stats
) -> None:
    rng = random.Random(f"{seed}:{i}")  # the same lengths per client, whichever server
    k = i
    while time.perf_counter() < deadline:
        messages = [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}]
        k += 1
        t0 = time.perf_counter()
        first = None
        chunks = 0
        usage = None
        try:
            stream = await api.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=rng.randint(*lengths),
                temperature=0.8,
                seed=k,  # type: ignore[arg-type]
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                for c in chunk.choices:
                    extra = c.delta.model_extra or {}
                    if c.delta.content or extra.get("llmstack_tool"):
                        first = first or time.perf_counter()
                        chunks += 1
                    if extra.get("error"):
                        st.errors.append(str(extra["error"]))
            st.requests += 1
            st.tokens += chunks if usage is None else usage
            st.counted.add("chunks" if usage is None else "usage")
            if usage is not None:
                st.usage_tokens += usage
                st.usage_chunks += chunks
            if first is not None:
                st.ttft.append(first - t0)
        except openai.OpenAIError as e:
            st.errors.append(f"{type(e).__name__}: {e}")


async def load(
    url: str, model: str, n: int, seconds: float, lengths: tuple[int, int], seed: int
) -> tuple[Stats, float]:
    st = Stats()
    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(*(client(api, model, deadline, lengths, seed, i, st) for i in range(n)))
    await api.close()
    return st, time.perf_counter() - t0


async def warmup(url: str, model: str) -> None:
    """One short request, so that lazy set-up is not charged to the first row."""
    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    try:
        await api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    finally:
        await api.close()


def server_command(spec: Spec, model: Path, port: int, args: argparse.Namespace) -> list[str]:
    if spec.kind == "llmstack":
        cmd = [sys.executable, "-m", "llmstack", "serve", "--model", f"bench={model}", "--port", str(port)]
        cmd += ["--no-assistants", "--host", "127.0.0.1"]
        if spec.scheduler:
            cmd += ["--scheduler", spec.scheduler]
        return cmd + args.llmstack_arg
    threads = str(args.threads or max(1, (os.cpu_count() or 1) // 2))
    return [
        args.llamacpp_python, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "bench",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.n_ctx),
        "--n_threads", threads, "--n_threads_batch", threads, "--n_batch", "512",
        "--logits_all", "False",  # logits of the last position only: no logprobs needed
        "--interrupt_requests", "False",  # else each queued request cuts the streaming one short
        *args.llamacpp_arg,
    ]  # fmt: skip


def tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join("    " + x for x in text[-lines:])


def start(spec: Spec, model: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str] | None:
    """Start a server and wait until it answers; None (with its output printed) if it exits or never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(spec, model, port, args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    shown = ""
    if spec.kind == "llmstack" and args.threads:
        env["OMP_NUM_THREADS"] = shown = str(args.threads)
    print(f"# {spec.label}: {'OMP_NUM_THREADS=' + shown + ' ' if shown else ''}{' '.join(cmd)}", flush=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    probe = url + ("/health" if spec.kind == "llmstack" else "/v1/models")
    t_end = time.monotonic() + args.startup_timeout
    while time.monotonic() < t_end:
        try:
            with urllib.request.urlopen(probe, timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                print(f"ERROR: {spec.label} server exited with code {proc.returncode} before it was ready:")
                print(tail(log), flush=True)
                return None
            time.sleep(0.2)
    print(f"ERROR: {spec.label} server did not answer {probe} within {args.startup_timeout:.0f} s; its output:")
    print(tail(log), flush=True)
    stop(proc)
    return None


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_server(spec: Spec, model: Path, args: argparse.Namespace) -> list[Row] | None:
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        log = Path(tmp) / "server.log"
        started = start(spec, model, args, log)
        if started is None:
            return None
        proc, url = started
        rows = []
        try:
            asyncio.run(warmup(url, "bench"))
            for n in args.clients:
                load1 = os.getloadavg()[0]
                st, wall = asyncio.run(load(url, "bench", n, args.seconds, args.max_tokens, args.seed))
                row = Row(spec.label, n, load1, st, wall)
                print(
                    f"# {spec.label} {n} client{'s' * (n > 1)}: {st.requests} requests, {st.tokens} tokens "
                    f"in {wall:.1f} s, "
                    f"{row.tps:.1f} tok/s, errors {len(st.errors)} (load before {load1:.2f})",
                    flush=True,
                )
                rows.append(row)
                if proc.poll() is not None:
                    print(f"ERROR: {spec.label} server died (code {proc.returncode}):")
                    print(tail(log), flush=True)
                    break
        except openai.OpenAIError as e:
            print(f"ERROR: {spec.label} warm-up request failed: {type(e).__name__}: {e}")
            print(tail(log), flush=True)
            return None
        finally:
            stop(proc)
        return rows


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x == x else "-"


def counted(st: Stats) -> str:
    """How tokens were counted; where usage came, how far content chunks were from it."""
    how = "+".join(sorted(st.counted)) or "-"
    if st.usage_tokens and abs(st.usage_chunks - st.usage_tokens) > 0.01 * st.usage_tokens:
        how += f" (chunks {st.usage_chunks / st.usage_tokens:.0%} of it)"
    return how


def table(rows: list[Row]) -> None:
    print(
        "| server | clients | load 1m | requests | requests/s | tokens/s | vs 1 | tok/req | TTFT p50 | TTFT p99 "
        "| errors | count |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    base = {r.server: r.tps for r in rows if r.clients == 1}
    for r in rows:
        q = sorted(r.st.ttft)
        p50 = statistics.median(q) if q else float("nan")
        p99 = q[min(len(q) - 1, int(0.99 * len(q)))] if q else float("nan")
        vs1 = f"{r.tps / base[r.server]:.2f}x" if base.get(r.server) else "-"
        per = r.st.tokens / r.st.requests if r.st.requests else 0.0
        print(
            f"| {r.server} | {r.clients} | {r.load:.2f} | {r.st.requests} | {r.st.requests / r.wall:.2f} "
            f"| {r.tps:.1f} | {vs1} | {per:.1f} | {ms(p50)} | {ms(p99)} | {len(r.st.errors)} "
            f"| {counted(r.st)} |"
        )
    for r in rows:
        for e in r.st.errors[:3]:
            print(f"error ({r.server}, {r.clients} clients): {e}")


def ratios(results: dict[str, list[Row]]) -> None:
    """tokens/s of every later configuration over the first one, per client count."""
    labels = list(results)
    ref = {r.clients: r.tps for r in results[labels[0]]}
    for other in labels[1:]:
        parts = [
            f"{r.clients} client{'s' * (r.clients > 1)} {r.tps / ref[r.clients]:.2f}x"
            for r in results[other]
            if ref.get(r.clients)
        ]
        print(f"tokens/s ratio {other} / {labels[0]}: " + (", ".join(parts) or "no common rows"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/tiny/sft", help="run dir, HF dir, .gguf or smollm2 (llamacpp: .gguf)")
    ap.add_argument("--server", type=parse_spec, default=Spec("llmstack"), help="llmstack (default) or llamacpp")
    ap.add_argument("--scheduler", help="passed to `llmstack serve --scheduler` (static or continuous)")
    ap.add_argument(
        "--compare",
        help="comma-separated servers run back to back on the same load, e.g. llamacpp,llmstack or "
        "llmstack:static,llmstack:continuous; prints tokens/s of each over the first",
    )
    ap.add_argument("--clients", type=parse_clients, default=[1, 8, 32], help="client counts, e.g. 1,8,32,64")
    ap.add_argument("--seconds", type=float, default=20, help="time each client count sends new requests")
    ap.add_argument("--max-tokens", type=parse_range, default=(16, 128), help="N or LO:HI, drawn per request")
    ap.add_argument("--seed", type=int, default=0, help="seeds the per-client max_tokens draws")
    ap.add_argument("--startup-timeout", type=float, default=300, help="seconds for a server to come up")
    ap.add_argument("--llmstack-arg", action="append", default=[], help="extra `llmstack serve` argument; repeat")
    ap.add_argument("--llamacpp-python", default="/work/llamacpp-venv/bin/python", help="python with llama_cpp")
    ap.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 2),
        help="CPU threads of either server: llama.cpp's --n_threads(_batch), llmstack's OMP_NUM_THREADS "
        "(default: half the cores); 0: llama.cpp half the cores, llmstack torch's default",
    )
    ap.add_argument("--llamacpp-arg", action="append", default=[], help="extra llama_cpp.server argument; repeat")
    ap.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context size")
    args = ap.parse_args()

    if args.compare:
        try:
            specs = [parse_spec(x) for x in args.compare.split(",") if x.strip()]
        except argparse.ArgumentTypeError as e:
            ap.error(str(e))
    else:
        specs = [args.server]
    for s in specs:
        if s.kind == "llmstack" and s.scheduler is None:
            s.scheduler = args.scheduler
    try:
        model = resolve_model(args.model)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    if not model.exists():
        print(f"{args.model}: no such model; run `make run` first or pass --model", file=sys.stderr)
        return 2
    if any(s.kind == "llamacpp" for s in specs):
        if model.suffix != ".gguf":
            print(f"{model}: llama.cpp's server needs a .gguf file (try --model smollm2)", file=sys.stderr)
            return 2
        if not Path(args.llamacpp_python).exists():
            print(
                f"{args.llamacpp_python}: no such python; build llama-cpp-python[server] (see --help)", file=sys.stderr
            )
            return 2

    lo, hi = args.max_tokens
    print(
        f"# model {model}, {args.seconds:.0f} s per row, max_tokens {lo}..{hi} (seed {args.seed}), "
        f"clients {','.join(map(str, args.clients))}, cores {os.cpu_count()}, --threads {args.threads}, "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: dict[str, list[Row]] = {}
    failed = False
    for spec in specs:
        rows = run_server(spec, model, args)
        if rows is None:
            failed = True
            continue
        results[spec.label] = rows
    print()
    table([r for rows in results.values() for r in rows])
    if len(results) > 1:
        ratios(results)
    errors = any(r.st.errors for rows in results.values() for r in rows)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
