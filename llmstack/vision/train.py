"""Training a VLM in two stages, both through the shared loop (``training/loop.py``) with ``VisionTask``:

1. align: the LM frozen, the encoder and projector learn to caption (LLaVA's feature alignment);
2. instruct: everything trains on the questions (and the captions, so the first skill is kept).

    llmstack vlm train --model runs/tiny/sft --out runs/tiny/vlm      # ~6 min on 2 CPU cores
    llmstack vlm train --model runs/tiny/sft --out /tmp/vlm --align-steps 20 --instruct-steps 20  # smoke run

Then the held-out measurement (``measure.py``) is written to ``<out>/eval.json``. A rerun resumes: a stage
whose run holds its last checkpoint is skipped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmstack.chat.finetune import sft_mixtures
from llmstack.interop.load import load_ours
from llmstack.io import write_json
from llmstack.model.llama import IGNORE_INDEX
from llmstack.training.checkpoint import latest_checkpoint, load_model_weights
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo, init_distributed, shutdown
from llmstack.training.loop import train
from llmstack.training.sft import IGNORE, collate
from llmstack.vision.data import Example, Split, make_examples
from llmstack.vision.encoder import VisionConfig
from llmstack.vision.measure import as_json, image_is_used, measure, sample_figure, table
from llmstack.vision.vlm import FINAL_STAGE, IMAGE_TOKEN, LoadedVLM, VisionChat, from_lm

ALIGN = "align"


Row = tuple[tuple[list[int], list[int]], torch.Tensor]
"""A rendered example: (ids, loss mask) and its image (3, S, S); a text-only row has placeholders nowhere and
a blank image nobody looks at."""


def image_rows(chat: VisionChat, examples: Sequence[Example]) -> list[Row]:
    return [(chat.example(e.question, e.answer), e.image) for e in examples]


def text_rows(
    chat: VisionChat, conversations: Sequence[Any], size: int, n: int, max_tokens: int, seed: int
) -> list[Row]:
    """``n`` of the chat mixture's conversations (text only) that fit ``max_tokens``: mixed into stage 2 (LLaVA
    mixes text-only chats in too) so that the LM keeps the skills it had; a random sample, seeded."""
    rendered = [chat.fmt.render(c) for c in conversations]
    short = [(r.ids, r.mask) for r in rendered if len(r.ids) <= max_tokens and any(r.mask)]
    blank = torch.zeros(3, size, size)
    return [(row, blank) for row in random.Random(seed).sample(short, min(n, len(short)))]


class VisionTask:
    """Batches of (ids, targets, images): the loss covers the assistant's answers only. ``val`` names the held-out
    sets the evaluation reports a loss for (e.g. ``val_loss`` on image questions, ``text_val_loss`` on chats)."""

    def __init__(
        self,
        name: str,
        train: Sequence[Row],
        val: Mapping[str, Sequence[Row]],
        pad_id: int,
        cfg: TrainConfig,
        dist: DistInfo,
    ) -> None:
        if len(train) < cfg.batch_size:
            raise ValueError(f"{len(train)} training examples are fewer than one batch of {cfg.batch_size}")
        self.name, self.device, self.pad_id = name, dist.device, pad_id
        self.train, self.val = list(train), {k: list(v) for k, v in val.items()}
        self.batch_size, self.seed, self.eval_batches = cfg.batch_size, cfg.seed, cfg.eval_batches
        self.rank, self.world = dist.rank, dist.world_size
        self.cursor = 0  # examples consumed by all ranks together
        self._epoch: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._epoch[0] != epoch:
            self._epoch = (epoch, random.Random(f"{self.seed}:{epoch}").sample(range(len(self.train)), len(self.train)))
        return self._epoch[1]

    def _collate(self, rows: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = collate([r for r, _ in rows], self.pad_id, bucket=8)
        y[y == IGNORE] = IGNORE_INDEX  # the model's own loss skips IGNORE_INDEX
        images = torch.stack([img for _, img in rows])
        return x.to(self.device), y.to(self.device), images.to(self.device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first = self.cursor + self.rank * self.batch_size
        rows = []
        for g in range(first, first + self.batch_size):
            epoch, i = divmod(g, len(self.train))
            rows.append(self.train[self._order(epoch)[i]])
        self.cursor += self.world * self.batch_size
        return self._collate(rows)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, int]:
        x, y, images = batch
        return model(x, targets_BT=y, images_BCHW=images), int((y != IGNORE_INDEX).sum())

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        metrics = {}
        for name, val in self.val.items():
            total, count = 0.0, 0
            rows = val[: self.eval_batches * self.batch_size]
            for start in range(0, len(rows), self.batch_size):
                x, y, images = self._collate(rows[start : start + self.batch_size])
                n = int((y != IGNORE_INDEX).sum())
                total += float(model(x, targets_BT=y, images_BCHW=images)) * n
                count += n
            metrics[name] = total / max(1, count)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "n_train": len(self.train)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_train") != len(self.train):
            raise ValueError(f"{self.name}: the data changed since the checkpoint ({state.get('n_train')} examples)")
        self.cursor = int(state["cursor"])


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    align_steps: int = 200
    instruct_steps: int = 650
    batch_size: int = 32
    align_lr: float = 2e-3  # encoder + projector, from scratch
    instruct_lr: float = 1e-3  # everything (the SFT preset's rate for the tiny LM)
    train_per_kind: int = 1500  # training examples per kind (``data.KINDS``); align uses the captions of 4x as many
    test_per_kind: int = 80  # held-out examples per kind
    text_rows: int = 3000  # text-only chats of the SFT mixture mixed into stage 2 (the LM keeps its skills)
    text_max_tokens: int = 64  # only chats this short: a batch costs what its longest row does
    seed: int = 0


def stage_config(steps: int, lr: float, batch_size: int, seed: int) -> TrainConfig:
    return TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        seq_len=64,
        lr=lr,
        warmup_steps=min(20, steps // 10),
        weight_decay=0.0,
        eval_every=0,
        eval_batches=2,
        ckpt_every=0,
        keep_checkpoints=1,
        log_every=10,
        seed=seed,
    )


def held_out(cfg: VLMConfig, size: int, split: Split = "test") -> list[Example]:
    """The held-out examples; ``split="train"``: new drawings of the training distribution instead (other seeds;
    colour/shape pairs and digit scans seen in training), to tell seeing from generalising."""
    return make_examples(split, cfg.test_per_kind, cfg.seed + (1000 if split == "train" else 0), size)


def train_vlm(
    source: str | Path,
    out: str | Path,
    cfg: VLMConfig = VLMConfig(),
    device: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """LM at ``source`` (our chat model) -> a VLM in ``out`` (both stages), measured on held-out images."""
    out = Path(out)
    lm, tok, bundle = load_ours(source)
    out.mkdir(parents=True, exist_ok=True)
    bundle.copy_tokenizer(out)
    torch.manual_seed(cfg.seed)  # the encoder's and projector's initial weights: a rerun trains the same model
    model = from_lm(lm, cfg.vision, tok.special_id(IMAGE_TOKEN))
    chat = VisionChat(tok, cfg.vision.n_tokens)
    size = cfg.vision.image_size
    t0 = time.perf_counter()
    examples = make_examples("train", cfg.train_per_kind, cfg.seed, size)
    captions = [e for e in make_examples("train", 4 * cfg.train_per_kind, cfg.seed + 1, size) if e.kind == "caption"]
    val = make_examples("train", 8, cfg.seed + 2, size)
    chats, val_chats = sft_mixtures(seed=cfg.seed + 1)
    texts = text_rows(chat, chats, size, cfg.text_rows, cfg.text_max_tokens, cfg.seed)
    val_texts = text_rows(chat, val_chats, size, 64, cfg.text_max_tokens, cfg.seed)
    log(
        f"vlm data: {len(captions)} captions (align); {len(examples)} questions and captions + {len(texts)} text "
        f"chats (instruct); {time.perf_counter() - t0:.1f}s"
    )
    where = bundle.checkpoint.path if bundle.checkpoint else source
    meta = {
        "tokenizer_fingerprint": tok.fingerprint,
        "vision_config": cfg.vision.to_dict(),
        "image_token": IMAGE_TOKEN,
        "base_checkpoint": str(where),
    }
    seconds: dict[str, float] = {}
    stage_losses: dict[str, dict[str, list[float]]] = {}  # stage -> val set -> [first, last]
    dist = init_distributed(device)
    try:
        val_sets = {"val_loss": image_rows(chat, val), "text_val_loss": val_texts}
        stages = [
            (ALIGN, image_rows(chat, captions), val_sets, cfg.align_steps, cfg.align_lr, True),
            (FINAL_STAGE, image_rows(chat, examples) + texts, val_sets, cfg.instruct_steps, cfg.instruct_lr, False),
        ]
        previous: Path | None = None
        for name, train_rows, val_rows, steps, lr, frozen in stages:
            run = out / name
            if previous is not None and latest_checkpoint(run) is None:  # start from the stage before
                ckpt = latest_checkpoint(previous)
                assert ckpt is not None
                load_model_weights(model, ckpt)
            model.freeze_lm(frozen)
            scfg = stage_config(steps, lr, cfg.batch_size, cfg.seed)
            task = VisionTask(name, train_rows, val_rows, chat.fmt.pad_id, scfg, dist)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log(f"vlm {name}: {len(train_rows)} examples, {steps} steps, {trainable:,} trainable parameters -> {run}")
            t0 = time.perf_counter()
            result = train(model, task, scfg, run, dist, meta={**meta, "stage": f"vlm-{name}"}, progress=progress)
            seconds[name] = time.perf_counter() - t0
            if result.evals:
                first, last = result.evals[0], result.evals[-1]
                losses = ", ".join(f"{k.replace('_', ' ')} {first[k]:.3f} -> {last[k]:.3f}" for k in val_sets)
                log(f"vlm {name}: {losses}; {seconds[name]:.0f}s")
                stage_losses[name] = {k: [first[k], last[k]] for k in val_sets}
            previous = run
    finally:
        shutdown(dist)
    model.freeze_lm(False)
    report = evaluate_vlm(LoadedVLM(model.eval(), tok, meta, str(out)), cfg, out, seconds, log)
    report["val_losses"] = stage_losses
    write_json(out / "eval.json", report)
    return report


def evaluate_vlm(
    vlm: LoadedVLM,
    cfg: VLMConfig,
    out: Path | None = None,
    seconds: dict[str, float] | None = None,
    log: Callable[[str], None] = print,
    split: Split = "test",
) -> dict[str, Any]:
    """The held-out measurement (``measure.py``), printed, and written to ``out/eval.json`` when given."""
    t0 = time.perf_counter()
    examples = held_out(cfg, vlm.image_size, split)
    results = measure(vlm, examples)
    used = image_is_used(results)
    log(table(results))
    log(f"image used (image interval above both baselines): {'yes' if used else 'no'}; {time.perf_counter() - t0:.0f}s")
    report = {
        "results": as_json(results),
        "image_used": used,
        "train_seconds": seconds or {},
        "test_per_kind": cfg.test_per_kind,
    }
    if out is not None:
        write_json(out / "eval.json", report)
        sample_figure(vlm, examples, out / "samples.png")
    return report
