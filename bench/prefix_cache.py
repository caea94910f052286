"""What the prefix cache saves: 32 chats that share a long system prompt (an assistant's instructions)
and differ in their question, through the continuous batcher with and without the cache, in process.

    python bench/prefix_cache.py                      # runs/tiny/sft
    python bench/prefix_cache.py --model smollm2 --repeat 3
"""

from __future__ import annotations

import argparse
import time

import torch

from llmstack.chat.answer import ChatModel
from llmstack.chat.conversation import Conversation
from llmstack.inference.batcher import Batcher, PrefixCache
from llmstack.inference.engine import Engine, Event, Request
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.load import load_model


class Sink:
    def event(self, ev: Event) -> None:
        pass

    def end(self, error: BaseException | None) -> None:
        if error is not None:
            raise error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/tiny/sft")
    ap.add_argument("--repeat", type=int, default=6, help="sentences of system prompt")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    chat = ChatModel(bundle)
    system = "You are Zephyr, the help desk of the Zephyr Lab. " * args.repeat
    prompts = []
    for i in range(32):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"What is {i}*7?"}]
        prompts.append(chat.prompt(Conversation.from_openai(msgs) if chat.ours else msgs))
    print(f"{args.model}: 32 prompts of {len(prompts[0])} tokens, 8 new tokens each, 8 rows at a time")
    for cache in (None, PrefixCache()):
        batcher = Batcher(Engine(bundle.model), max_rows=8, prefix_cache=cache)
        cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
        t0 = time.perf_counter()
        for p in prompts:
            batcher.add(Request(p, cfg), Sink())
        while batcher.busy:
            batcher.step()
        took = time.perf_counter() - t0
        name = "with the prefix cache" if cache else "without"
        hits = f", {cache.hits} prompt tokens from the cache" if cache else ""
        print(f"{name:>22}: {took:.2f} s, {batcher.prefilled} prompt tokens computed{hits}")


if __name__ == "__main__":
    main()
