"""Load on ``llmstack serve``: N concurrent streaming chat clients for a bounded time.

Starts a real server process on localhost, runs ``--clients`` clients (each sends a streaming chat
request, reads it to the end, and sends the next) for ``--seconds``, and prints requests/s, tokens/s,
p50/p99 time to first token and the error count. The same load with one client is the baseline:
the ratio of the two throughputs is what batching concurrent requests buys.

    python bench/serve_load.py                          # runs/tiny/sft, 32 clients, 30 s
    python bench/serve_load.py --model smollm2 --clients 8 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai

QUESTIONS = [
    "What is 123 * 456?",
    "Who are you?",
    "How many r are in strawberry?",
    "Tell me something about Python lists.",
    "Hi! How are you today?",
]


@dataclass
class Stats:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)


async def client(api: openai.AsyncOpenAI, model: str, deadline: float, max_tokens: int, i: int, st: Stats) -> None:
    k = i
    while time.perf_counter() < deadline:
        messages = [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}]
        k += 1
        t0 = time.perf_counter()
        first = None
        try:
            stream = await api.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                max_tokens=max_tokens,
                temperature=0.8,
                seed=k,  # type: ignore[arg-type]
            )
            async for chunk in stream:
                for c in chunk.choices:
                    extra = c.delta.model_extra or {}
                    if c.delta.content or extra.get("llmstack_tool"):
                        first = first or time.perf_counter()
                        st.tokens += 1
                    if extra.get("error"):
                        st.errors.append(str(extra["error"]))
            st.requests += 1
            if first is not None:
                st.ttft.append(first - t0)
        except openai.OpenAIError as e:
            st.errors.append(f"{type(e).__name__}: {e}")


async def load(url: str, model: str, n: int, seconds: float, max_tokens: int) -> tuple[Stats, float]:
    st = Stats()
    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(*(client(api, model, deadline, max_tokens, i, st) for i in range(n)))
    await api.close()
    return st, time.perf_counter() - t0


def report(name: str, st: Stats, wall: float) -> float:
    q = sorted(st.ttft)
    p50 = statistics.median(q) if q else float("nan")
    p99 = q[min(len(q) - 1, int(0.99 * len(q)))] if q else float("nan")
    tps = st.tokens / wall
    print(
        f"{name:>12}: {st.requests / wall:6.2f} req/s  {tps:7.1f} tok/s  TTFT p50 {p50 * 1000:6.0f} ms  "
        f"p99 {p99 * 1000:6.0f} ms  requests {st.requests}  errors {len(st.errors)}"
    )
    for e in st.errors[:5]:
        print(f"{'':>14}error: {e}")
    return tps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/tiny/sft", help="run dir, HF dir, .gguf or smollm2")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-client run")
    args = ap.parse_args()
    if args.model != "smollm2" and not Path(args.model).exists():
        print(f"{args.model}: no such model; run `make run` first or pass --model", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llmstack", "serve", "--model", f"bench={args.model}", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--no-assistants"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    print("the server exited", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        print(
            f"model {args.model}, {args.seconds:.0f} s per run, max_tokens {args.max_tokens}, CPU threads "
            f"{os.cpu_count()}"
        )
        base = None
        if not args.no_baseline:
            st1, wall1 = asyncio.run(load(url, "bench", 1, args.seconds, args.max_tokens))
            base = report("1 client", st1, wall1)
        st, wall = asyncio.run(load(url, "bench", args.clients, args.seconds, args.max_tokens))
        tps = report(f"{args.clients} clients", st, wall)
        if base:
            print(f"throughput with {args.clients} clients / 1 client: {tps / base:.2f}x (batching)")
        return 1 if st.errors else 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
