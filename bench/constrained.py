"""Constrained decoding measured: the share of replies that parse and validate, with and without the
grammar, on our assistant and on SmolLM2, and what the mask costs per token.

Starts ``llmstack serve`` twice on the same models (as is, and with ``--no-constrain``) and sends each
the same requests through the official ``openai`` client:

* ``response_format: json_schema`` (a person: name, age, mood), 200 replies per model;
* ``tools=[get_weather]`` with ``tool_choice: required``, 200 calls (ours with its tool tokens, SmolLM2
  with Hermes ``<tool_call>`` text): does the call name a declared tool with schema-valid arguments?
* the cost: what the grammar adds to a decode step, in process (batch 1, greedy, same steps with and without).

    python bench/constrained.py                       # runs/tiny/sft and smollm2, 200 each
    python bench/constrained.py --n 50 --models ours=runs/tiny/sft
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import openai

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "neutral"]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
NAMES = ["Ada", "Bo", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Seoul", "Accra", "Kyiv", "Dakar"]


def valid_person(v: object) -> bool:
    return (
        isinstance(v, dict)
        and set(v) == {"name", "age", "mood"}
        and isinstance(v["name"], str)
        and len(v["name"]) <= 24
        and isinstance(v["age"], int)
        and not isinstance(v["age"], bool)
        and 0 <= v["age"] <= 120
        and v["mood"] in ("happy", "sad", "neutral")
    )


def valid_weather(v: object) -> bool:
    return (
        isinstance(v, dict)
        and set(v) == {"city", "unit"}
        and isinstance(v["city"], str)
        and v["unit"] in ("celsius", "fahrenheit")
    )


def start(models: list[str], port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "llmstack", "serve", "--port", str(port), "--no-assistants"]
    for m in models:
        args += ["--model", m]
    proc = subprocess.Popen([*args, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read().decode() if proc.stderr else ''}") from None
            time.sleep(0.2)
    raise SystemExit("the server did not start in 120 s")


async def json_replies(api: openai.AsyncOpenAI, model: str, n: int, schema: bool, conc: int) -> tuple[int, int, int]:
    """(parsed, valid, tokens) of n replies asking for a person as JSON."""
    sem = asyncio.Semaphore(conc)

    async def one(i: int) -> tuple[bool, bool, int]:
        ask = f"Describe a person called {NAMES[i % 10]} as JSON with keys name, age and mood (happy, sad or neutral)."
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}} if schema else None
        async with sem:
            r = await api.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": ask}],
                temperature=0.8,
                seed=i,
                max_tokens=96,
                **({"response_format": fmt} if fmt else {}),  # type: ignore[arg-type]
            )
        text = r.choices[0].message.content or ""
        try:
            value = json.loads(text)
        except ValueError:
            return False, False, r.usage.completion_tokens if r.usage else 0
        return True, valid_person(value), r.usage.completion_tokens if r.usage else 0

    out = await asyncio.gather(*(one(i) for i in range(n)))
    return sum(p for p, _, _ in out), sum(v for _, v, _ in out), sum(t for _, _, t in out)


async def tool_calls(api: openai.AsyncOpenAI, model: str, n: int, conc: int) -> tuple[int, int]:
    """(declared-name calls, schema-valid calls) of n required calls."""
    sem = asyncio.Semaphore(conc)

    async def one(i: int) -> tuple[bool, bool]:
        async with sem:
            r = await api.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"What is the weather in {CITIES[i % 10]}?"}],
                tools=[WEATHER],  # type: ignore[list-item]
                tool_choice="required",
                temperature=0.8,
                seed=i,
                max_tokens=64,
            )
        calls = r.choices[0].message.tool_calls or []
        if not calls:
            return False, False
        fn = calls[0].function  # type: ignore[union-attr]
        try:
            args = json.loads(fn.arguments)
        except ValueError:
            return fn.name == "get_weather", False
        return fn.name == "get_weather", fn.name == "get_weather" and valid_weather(args)

    out = await asyncio.gather(*(one(i) for i in range(n)))
    return sum(a for a, _ in out), sum(b for _, b in out)


async def measure(url: str, names: list[str], n: int, conc: int) -> dict[str, dict[str, float]]:
    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        row: dict[str, float] = {}
        row["json_parsed"], row["json_valid"], _ = await json_replies(api, name, n, True, conc)
        row["call_named"], row["call_valid"] = await tool_calls(api, name, n, conc)
        out[name] = row
    return out


def mask_cost(spec: str, reps: int = 5) -> dict[str, float]:
    """In process, greedy, batch 1, over a json_schema reply (the same number of steps decoded with and
    without the grammar): ms per decode step without it, µs it adds per token, the reply's tokens, and the
    one-off costs: llguidance's view of the tokenizer (s, once per model) and a request's grammar (ms)."""
    from llmstack.chat.answer import ChatModel
    from llmstack.chat.conversation import Conversation
    from llmstack.inference.constrain import Constraint, grammar_tokenizer, json_grammar
    from llmstack.inference.engine import Engine, Request
    from llmstack.inference.sample import SamplingConfig
    from llmstack.interop.load import load_model

    bundle = load_model(spec)
    chat = ChatModel(bundle)
    msgs = [{"role": "user", "content": "Describe a person called Ada as JSON."}]
    prompt = chat.prompt(Conversation.from_openai(msgs) if chat.ours else msgs)
    t0 = time.perf_counter()
    lltok = grammar_tokenizer(bundle.tokenizer, bundle.model.config.vocab_size)
    tokenizer_s = time.perf_counter() - t0
    grammar = json_grammar(PERSON)
    stops = frozenset(chat.stop_ids)
    engine = Engine(bundle.model)

    def run(constrained: bool, n: int) -> tuple[float, int]:
        make = (lambda: Constraint(grammar, lltok, stops)) if constrained else None
        req = Request(
            prompt, SamplingConfig(max_new_tokens=n, temperature=0.0), stops if constrained else (), grammar=make
        )
        t0 = time.perf_counter()
        k = sum(1 for _ in engine.run([req]))
        return time.perf_counter() - t0, k

    _, n = run(True, 200)  # the reply's length under the grammar; warm-up too
    with_g = min(run(True, n)[0] for _ in range(reps))
    without = min(run(False, n)[0] for _ in range(reps))
    compiles = []
    for _ in range(20):
        t0 = time.perf_counter()
        Constraint(json_grammar(PERSON), lltok, stops)
        compiles.append(time.perf_counter() - t0)
    return {
        "step_ms": 1000 * without / n,
        "mask_us": 1e6 * (with_g - without) / n,
        "tokens": n,
        "tokenizer_s": tokenizer_s,
        "grammar_ms": 1000 * sorted(compiles)[len(compiles) // 2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ours=runs/tiny/sft", "smollm2"], help="NAME=PATH as serve takes")
    ap.add_argument("--n", type=int, default=200, help="replies per model and kind")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--mask-only", action="store_true", help="only what the grammar costs, in process (no servers)")
    args = ap.parse_args()
    names = [m.split("=", 1)[0] for m in args.models]
    for spec in args.models:
        name, _, path = spec.rpartition("=")
        c = mask_cost(path or name)
        print(
            f"{name or path}: the grammar adds {c['mask_us']:.0f} µs per token to a {c['step_ms']:.2f} ms decode step "
            f"({c['mask_us'] / 10 / c['step_ms']:.1f}%; batch 1, greedy, {c['tokens']:.0f}-token json_schema reply, "
            f"best of 5); once per model {c['tokenizer_s']:.2f} s for llguidance's view of the tokenizer, "
            f"{c['grammar_ms']:.2f} ms per request for its grammar (median of 20)"
        )
    if args.mask_only:
        return
    results = {}
    for label, extra in (("constrained", []), ("unconstrained", ["--no-constrain"])):
        proc = start(args.models, args.port, extra)
        try:
            results[label] = asyncio.run(measure(f"http://127.0.0.1:{args.port}", names, args.n, args.concurrency))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{os.cpu_count()} CPUs; {args.n} replies per model and kind, temperature 0.8, max_tokens 96 (calls 64)\n")
    print("| model | decoding | JSON parses | schema-valid | call names a declared tool | schema-valid call |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for label in ("unconstrained", "constrained"):
            r = results[label][name]
            call = (
                (f"{r['call_named'] / args.n:.1%}", f"{r['call_valid'] / args.n:.1%}")
                if "call_named" in r
                else ("-", "-")
            )
            print(
                f"| {name} | {label} | {r['json_parsed'] / args.n:.1%} | {r['json_valid'] / args.n:.1%} | "
                f"{call[0]} | {call[1]} |"
            )


if __name__ == "__main__":
    main()
