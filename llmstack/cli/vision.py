"""Vision-language model commands: vlm train | ask | eval (``llmstack.vision``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmstack.cli.common import FMT
from llmstack.paths import runs_dir
from llmstack.vision.images import read_image_file
from llmstack.vision.train import VLMConfig, evaluate_vlm, train_vlm
from llmstack.vision.vlm import load_vlm


def _config(args: argparse.Namespace) -> VLMConfig:
    keys = ("align_steps", "instruct_steps", "batch_size", "train_per_kind", "test_per_kind", "seed")
    return VLMConfig(**{k: getattr(args, k) for k in keys if getattr(args, k, None) is not None})


def cmd_train(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else runs_dir() / "tiny" / "sft"
    out = Path(args.out) if args.out else runs_dir() / "tiny" / "vlm"
    report = train_vlm(model, out, _config(args), device=args.device)
    print(
        f"vlm: {out} (eval.json); train seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["train_seconds"].items())
    )
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    vlm = load_vlm(args.vlm, args.device or "cpu")
    image = read_image_file(args.image) if args.image else None
    print(vlm.ask(args.question, image))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    vlm = load_vlm(args.vlm, args.device or "cpu")
    evaluate_vlm(vlm, _config(args), Path(args.vlm) if args.write else None, split=args.split)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "vlm",
        help="vision-language model: train (two stages) | ask about an image | eval (held-out, no-image baselines)",
        formatter_class=FMT,
        description="""A vision-language model over our chat model: a small ViT + projector whose image tokens
replace placeholders in the user turn (docs/vision.md).

Examples:
  llmstack vlm train --model runs/tiny/sft --out runs/tiny/vlm        # both stages + eval, ~6 min on 2 CPU cores
  llmstack vlm train --out /tmp/vlm --align-steps 20 --instruct-steps 20 --train-per-kind 200   # smoke run
  llmstack vlm ask --vlm runs/tiny/vlm --image shape.png "what colour is the shape?"
  llmstack vlm eval --vlm runs/tiny/vlm                               # held-out accuracy, image vs no image
  llmstack serve --vlm tiny-vlm=runs/tiny/vlm                         # image_url parts, web UI attachments
""",
    )
    vs = p.add_subparsers(dest="vlm_command", required=True, metavar="ACTION")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", help="cpu or cuda (default: cuda if available for training, else cpu)")
        sp.add_argument("--test-per-kind", type=int, help="held-out questions per kind (default 80)")
        sp.add_argument("--seed", type=int, help="data seed (default 0)")

    t = vs.add_parser(
        "train", help="align (LM frozen) then instruct (all), then the held-out eval", formatter_class=FMT
    )
    t.add_argument("--model", help="our chat model: a run or checkpoint directory (default: runs/tiny/sft)")
    t.add_argument("--out", help="the VLM directory (default: runs/tiny/vlm); a rerun resumes")
    t.add_argument("--align-steps", type=int, help="stage 1 steps (default 200)")
    t.add_argument("--instruct-steps", type=int, help="stage 2 steps (default 650)")
    t.add_argument("--batch-size", type=int, help="examples per step (default 32)")
    t.add_argument("--train-per-kind", type=int, help="training examples per kind (default 1500)")
    common(t)
    t.set_defaults(func=cmd_train)

    a = vs.add_parser("ask", help="answer one question about one image (PNG or JPEG)", formatter_class=FMT)
    a.add_argument("question")
    a.add_argument("--vlm", required=True, help="a VLM directory (llmstack vlm train --out)")
    a.add_argument("--image", help="a PNG or JPEG file (without it: the question alone)")
    a.add_argument("--device", help="cpu or cuda")
    a.set_defaults(func=cmd_ask)

    e = vs.add_parser("eval", help="held-out accuracy with the image, a blank image and none", formatter_class=FMT)
    e.add_argument("--vlm", required=True, help="a VLM directory")
    e.add_argument("--write", action="store_true", help="also write <vlm>/eval.json and samples.png")
    e.add_argument(
        "--split",
        choices=("test", "train"),
        default="test",
        help="test: held-out images and pairs (default); train: new drawings of seen pairs and digit scans",
    )
    common(e)
    e.set_defaults(func=cmd_eval)
