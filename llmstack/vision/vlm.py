"""The vision-language model: our GPT whose input embeddings take an image's soft tokens at placeholders.

A user turn with an image renders as ``<|user_start|>`` + ``n_tokens`` x ``IMAGE_TOKEN`` + the text +
``<|user_end|>`` (the chat format of ``llmstack.chat.conversation`` otherwise). ``embed`` puts the
projected patch features where the placeholders are and the token embeddings elsewhere; the LM then runs
on those embeddings (``GPT.forward(..., embeds_BTC=...)``). ``VisionLanguageModel`` is a ``GPT`` with
two more modules (``encoder``, ``projector``): the shared training loop, its checkpoints and LoRA treat it
as any GPT, and its weight names are the LM's plus ``encoder.*`` and ``projector.*``.

A VLM directory (what ``llmstack vlm train`` writes): ``tokenizer/``, ``align/`` (stage 1's run),
``instruct/`` (stage 2's run: the model served and evaluated), ``eval.json``. Checkpoints are the
loop's (temp directory + rename, LATEST pointer), so a killed write never leaves a half model.

Generation is the one engine's (``Engine.run`` with the prompt given as embeddings: ``Request.embeds``).
What is not covered: several images in one turn, images in assistant turns.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.inference.engine import Engine, Request
from llmstack.inference.sample import SamplingConfig
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT, KVCache
from llmstack.tokenizer import special as S
from llmstack.tokenizer.bpe import Tokenizer
from llmstack.training.checkpoint import ModelFileError, load_meta, load_state, read_weights
from llmstack.vision.encoder import ImageEncoder, Projector, VisionConfig
from llmstack.vision.images import to_tensor

IMAGE_TOKEN = S.RESERVED[3]
"""The image placeholder: a reserved special (its embedding is never read, the image's soft tokens replace
it). A new tokenizer version should rename the slot ``<|image|>``."""
FINAL_STAGE = "instruct"


class VisionLanguageModel(GPT):
    def __init__(self, cfg: ModelConfig, vision: VisionConfig, image_token_id: int) -> None:
        super().__init__(cfg)
        self.vision_config, self.image_token_id = vision, image_token_id
        self.encoder = ImageEncoder(vision)
        self.projector = Projector(vision.dim, cfg.n_embd)

    @property
    def n_image_tokens(self) -> int:
        return self.vision_config.n_tokens

    def image_tokens(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, C) soft tokens."""
        return self.projector(self.encoder(images_BCHW))

    def embed(self, idx_BT: torch.Tensor, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each row's placeholders replaced by its image's soft tokens (B, T, C). Row b
        holds ``n_image_tokens`` placeholders or none (then ``images_BCHW[b]`` is not looked at)."""
        x_BTC = self.model.embed_tokens(idx_BT)
        at_BT = idx_BT == self.image_token_id
        per_row = at_BT.sum(1)
        if bool(((per_row != 0) & (per_row != self.n_image_tokens)).any()):
            raise ValueError(f"a row holds {per_row.tolist()} image placeholders; expected 0 or {self.n_image_tokens}")
        rows = per_row > 0
        if not bool(rows.any()):  # text-only rows (a chat mixed into training, or no image sent)
            return x_BTC
        feats_BNC = self.image_tokens(images_BCHW[rows]).to(x_BTC.dtype)
        return x_BTC.masked_scatter(at_BT[..., None], feats_BNC)

    def forward(  # type: ignore[override]
        self,
        idx_BT: torch.Tensor,
        cache: KVCache | None = None,
        targets_BT: torch.Tensor | None = None,
        last_only: bool = False,
        embeds_BTC: torch.Tensor | None = None,
        images_BCHW: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``GPT.forward``, and with ``images_BCHW`` (one image per row) the placeholders see the images."""
        if images_BCHW is not None and embeds_BTC is None:
            embeds_BTC = self.embed(idx_BT, images_BCHW)
        return super().forward(idx_BT, cache, targets_BT, last_only, embeds_BTC)

    def freeze_lm(self, frozen: bool = True) -> None:
        """Stage 1 trains the encoder and projector only."""
        for name, p in self.named_parameters():
            if not name.startswith(("encoder.", "projector.")):
                p.requires_grad_(not frozen)


def from_lm(lm: GPT, vision: VisionConfig, image_token_id: int) -> VisionLanguageModel:
    """A VLM over a trained LM's weights (copied), with a fresh encoder and projector."""
    vlm = VisionLanguageModel(lm.config, vision, image_token_id)
    missing, unexpected = vlm.load_state_dict(lm.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("encoder.", "projector.")) for k in missing), (missing, unexpected)
    return vlm


# ----------------------------------------------------------------------------- chat rendering
class VisionChat:
    """Our chat format with an image in a user turn: ``(ids, mask)`` to train on, prompts to answer."""

    def __init__(self, tok: Tokenizer, n_image_tokens: int) -> None:
        self.fmt = ChatFormat(tok)
        self.image_id = tok.special_id(IMAGE_TOKEN)
        self.n = n_image_tokens
        self.user_start = self.fmt.start["user"]

    def _insert(self, ids: list[int], user_turn: int) -> int:
        """Where the image goes: right after the ``user_turn``-th ``<|user_start|>`` (message text is encoded
        as ordinary text, so a user cannot forge one)."""
        starts = [i for i, t in enumerate(ids) if t == self.user_start]
        if user_turn >= len(starts):
            raise ValueError(f"no user turn {user_turn} to put the image in")
        return starts[user_turn] + 1

    def example(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        r = self.fmt.render(Conversation.of(("user", question), ("assistant", answer)))
        at = self._insert(r.ids, 0)
        return r.ids[:at] + [self.image_id] * self.n + r.ids[at:], r.mask[:at] + [0] * self.n + r.mask[at:]

    def prompt(self, conv: Conversation, image_turn: int | None, max_tokens: int | None = None) -> list[int]:
        """The prompt asking for the next assistant turn; the image in user turn ``image_turn`` (0-based count
        of user messages), or no image."""
        ids = self.fmt.prompt(conv)
        if image_turn is not None:
            at = self._insert(ids, image_turn)
            ids = ids[:at] + [self.image_id] * self.n + ids[at:]
        if max_tokens is not None and len(ids) > max_tokens:
            raise ValueError(
                f"the conversation has {len(ids)} tokens with its image; the model's context is {max_tokens}"
            )
        return ids

    def question(self, text: str, with_image: bool = True) -> list[int]:
        return self.prompt(Conversation.of(("user", text)), 0 if with_image else None)


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    prompts: Sequence[list[int]],
    images_BCHW: torch.Tensor | None,
    max_new_tokens: int,
    stop_ids: Collection[int],
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[list[int]]:
    """Continuations of ``prompts`` (row b sees ``images_BCHW[b]`` at its placeholders) through the one
    engine, the prompts given as embeddings; greedy at temperature 0; each ends before its first stop id."""
    device = model.lm_head.weight.device
    reqs = []
    for b, prompt in enumerate(prompts):
        idx_1T = torch.tensor([prompt], device=device)
        image = images_BCHW[b : b + 1].to(device) if images_BCHW is not None else None
        embeds = model.embed(idx_1T, image)[0] if image is not None else None
        cfg = SamplingConfig(max_new_tokens, temperature, seed=seed + b if seed is not None else None)
        reqs.append(Request(list(prompt), cfg, frozenset(stop_ids), tool_mode="off", embeds=embeds))
    out: list[list[int]] = [[] for _ in prompts]
    for ev in Engine(model).run(reqs):
        if ev.token not in stop_ids:
            out[ev.row].append(ev.token)
    return out


@dataclass
class LoadedVLM:
    """A VLM with its tokenizer and chat rendering: what the CLI, the evaluation and the server use."""

    model: VisionLanguageModel
    tok: Tokenizer
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        self.chat = VisionChat(self.tok, self.model.n_image_tokens)
        self.stop_ids = self.chat.fmt.stop_ids
        self.pad_id = self.chat.fmt.pad_id

    @property
    def image_size(self) -> int:
        return self.model.vision_config.image_size

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([to_tensor(img, self.image_size) for img in images])

    @torch.no_grad()
    def prompt(self, conv: Conversation, image: Image.Image, image_turn: int) -> tuple[list[int], torch.Tensor]:
        """Prompt ids asking for the next assistant turn, with the image in user turn ``image_turn``, and their
        input embeddings (T, C): what the engine is given (``Request.embeds``)."""
        ids = self.chat.prompt(conv, image_turn, self.model.config.max_seq_len - 1)
        device = self.model.lm_head.weight.device
        pixels = self.pixels([image]).to(device)
        return ids, self.model.embed(torch.tensor([ids], device=device), pixels)[0]

    def answer(
        self,
        conv: Conversation,
        image: Image.Image | None,
        image_turn: int | None,
        max_tokens: int = 32,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> tuple[str, int, int, str]:
        """The next assistant turn: (text, prompt tokens, completion tokens, finish reason)."""
        ids = self.chat.prompt(conv, image_turn if image is not None else None, self.model.config.max_seq_len - 1)
        pixels = self.pixels([image]) if image is not None else None
        was_training = self.model.training
        self.model.eval()
        try:
            out = generate(self.model, [ids], pixels, max_tokens, self.stop_ids, temperature, seed)[0]
        finally:
            self.model.train(was_training)
        finish = "length" if len(out) >= max_tokens or len(ids) + len(out) >= self.model.config.max_seq_len else "stop"
        return self.tok.decode(out), len(ids), len(out), finish

    def ask(self, question: str, image: Image.Image | None) -> str:
        return self.answer(Conversation.of(("user", question)), image, 0)[0]


def load_vlm(path: str | Path, device: str | torch.device = "cpu") -> LoadedVLM:
    """A VLM directory (its ``instruct`` run), a stage's run directory or one checkpoint -> the model and tokenizer;
    a damaged or foreign file raises ModelFileError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such VLM directory")
    run = path / FINAL_STAGE if (path / FINAL_STAGE).is_dir() else path
    ckpt = load_meta(run)
    meta = ckpt.meta
    if not isinstance(meta.get("vision_config"), dict):
        raise ModelFileError(ckpt.path / "meta.json", "not a vision-language model (no 'vision_config')")
    tok_dir = next((d / "tokenizer" for d in ckpt.path.parents[:3] if (d / "tokenizer").is_dir()), None)
    if tok_dir is None:
        raise FileNotFoundError(f"{ckpt.path}: no tokenizer/ beside the VLM's checkpoints")
    tok = Tokenizer.load(tok_dir)
    if meta.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        raise ValueError(f"{ckpt.path} was trained with another tokenizer than {tok_dir}")
    try:
        vision = VisionConfig.from_dict(meta["vision_config"])
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError) as e:
        raise ModelFileError(ckpt.path / "meta.json", f"bad model or vision configuration ({e})") from None
    model = VisionLanguageModel(cfg, vision, tok.special_id(IMAGE_TOKEN))
    load_state(model, read_weights(ckpt), str(ckpt.path / "model.safetensors"), cfg.tie_embeddings)
    model.to(device).eval()
    return LoadedVLM(model, tok, meta, str(path))
