"""LoRA: low-rank adapters on the model's linear projections, saved and loaded in PEFT's layout.

A ``LoRALinear`` keeps its ``nn.Linear`` frozen and learns a low-rank change of it:
y = W x + scale * B A dropout(x), with A (r, in) kaiming-uniform as PEFT initialises it, B (out, r) zeros
(so training starts from the base model exactly) and scale = alpha / r (alpha / sqrt(r) with rsLoRA).
Only A and B train: no gradients and no AdamW state for the base weights.

``apply_lora`` wraps the target projections in place and freezes everything else; ``merge_lora`` adds
scale * B A into the base weights (no extra matmuls at inference) and ``unmerge_lora`` takes it out
again; ``remove_lora`` gives back plain ``nn.Linear`` modules, merged or not, so the model saves as an
ordinary checkpoint. The adapter directory is PEFT's: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight``. Our module names are
those of HF's ``LlamaForCausalLM``, so ``peft.PeftModel.from_pretrained`` reads our adapter on the HF
export of the base model, and ``load_adapter`` reads one PEFT wrote.

``.weight`` and decoding: code outside reads a projection's ``.weight`` directly, notably
``GPT.fuse_for_decode``, whose fused q/k/v and gate/up matrices the engine multiplies by in the prefill
and in every decode step. So ``LoRALinear.weight`` is the weight the layer applies: the base weight
when merged, base + scale * B A otherwise (then a fresh tensor: write into ``.base_layer.weight``). The
engine therefore generates the adapted model's tokens, merged or not (tests/test_lora.py checks the
dynamic and the static decode step); ``merge_lora`` before serving saves the adapter's extra matmuls.

What is not covered: ``lm_head`` and the embeddings as targets (the chunked loss reads
``lm_head.weight`` itself, and a merge into a tied head would change the embedding too), GPT-2 models
(HF stores their projections as Conv1D: PEFT adapters with fan_in_fan_out), DoRA, LoRA biases, ranks
per module, adapters on some layers only, several adapters at once, ``modules_to_save``. An adapter
file that asks for one of them is refused by name.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from llmstack.io import write_json
from llmstack.model.llama import GPT
from llmstack.training.checkpoint import ModelFileError, read_json_object, read_safetensors

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers LoRA may target (all of them by default): attention and MLP projections."""

ADAPTER_DIR = "adapter"  # a LoRA run's adapter, inside each of its checkpoints
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the HF model, whose names are ours

UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "fan_in_fan_out": "transposed (Conv1D) base weights",
    "lora_bias": "LoRA biases",
    "modules_to_save": "fully trained extra modules",
    "layers_to_transform": "adapters on some layers only",
    "layers_pattern": "adapters on some layers only",
    "exclude_modules": "excluded modules",
    "rank_pattern": "ranks per module",
    "alpha_pattern": "alphas per module",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on parameters",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
}
"""PEFT options that change what an adapter computes, refused when set (anything but null/false/empty)."""

BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")
"""``init_lora_weights`` values whose adapters go with a modified base model, not the original one."""


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8  # rank of the update B A
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # on the adapter's input only, in training mode
    target_modules: tuple[str, ...] = LLAMA_PROJECTIONS
    use_rslora: bool = False  # rank-stabilised scale (Kalajdzievski 2023), as PEFT's use_rslora

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, tuple | list):
            raise ValueError(f"LoRA target_modules must be a list of names, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")
        unknown = [t for t in self.target_modules if t not in LLAMA_PROJECTIONS]
        if unknown:
            raise ValueError(
                f"unknown LoRA target modules {unknown}; choose among {', '.join(LLAMA_PROJECTIONS)} "
                "(lm_head and the embeddings are not supported)"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"LoRA target modules are repeated: {list(self.target_modules)}")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus a trainable low-rank update ``lora_B @ lora_A``."""

    def __init__(self, base_layer: nn.Linear, r: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.scale = r, scale
        like: dict[str, Any] = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **like)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **like)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        base_layer.requires_grad_(False)
        self.train(base_layer.training)  # a model in eval mode stays so (no dropout)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight this layer applies (module docstring: why not the base weight alone)."""
        if self.merged:
            return self.base_layer.weight
        return self.base_layer.weight + self.delta_weight().to(self.base_layer.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, (out, in), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:  # the update is inside the base weight already
            if self.training and torch.is_grad_enabled() and self.lora_A.weight.requires_grad:
                raise RuntimeError("a merged LoRA layer gets no gradient: unmerge_lora(model) before training")
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W += scale * B A (in W's dtype: exact to rounding in fp32, not in bf16). A no-op when merged."""
        if not self.merged:
            w = self.base_layer.weight
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scale * B A: the base weight back (to rounding). A no-op when not merged."""
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, merged={self.merged}"


# ----------------------------------------------------------------------------- model surgery
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _layers_or_raise(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (apply_lora or load_adapter first)")
    return layers


def _targets(model: nn.Module, cfg: LoRAConfig) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules ``cfg`` targets, by name; a target name that matches none raises."""
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers (remove_lora first)")
    found = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in cfg.target_modules
    }
    missing = sorted(set(cfg.target_modules) - {name.rpartition(".")[2] for name in found})
    if missing:
        raise ValueError(f"LoRA target modules {missing} match no nn.Linear of {type(model).__name__}")
    return found


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every target projection in a ``LoRALinear`` in place and freeze all other parameters.

    Returns the wrapped module names. The base model's outputs are unchanged until B leaves zero."""
    targets = _targets(model, cfg)
    model.requires_grad_(False)
    for name, linear in targets.items():
        _replace(model, name, LoRALinear(linear, cfg.r, cfg.scale, cfg.dropout))
    return list(targets)


def lora_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The trainable A and B matrices of every LoRA layer (what the optimizer gets)."""
    return [p for layer in _layers_or_raise(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def merge_lora(model: nn.Module) -> list[str]:
    """Add every adapter into its base weight (inference without the extra matmuls); the merged names."""
    layers = _layers_or_raise(model)
    for layer in layers.values():
        layer.merge()
    return list(layers)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Take every adapter back out of its base weight (to train it again); the unmerged names."""
    layers = _layers_or_raise(model)
    for layer in layers.values():
        layer.unmerge()
    return list(layers)


def remove_lora(model: nn.Module, merge: bool) -> list[str]:
    """Put plain ``nn.Linear`` modules back: with the adapters merged in (``merge``) or the original
    weights. The state dict then has the base model's names again, and every parameter requires
    grad, as in a freshly built model. Returns the names of the restored modules."""
    layers = _layers_or_raise(model)
    for name, layer in layers.items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _replace(model, name, layer.base_layer)
    model.requires_grad_(True)
    return list(layers)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged in, on the CPU, leaving ``model`` as it is: a
    LoRA run's checkpoint weights, which every stage opens as an ordinary model. A tied ``lm_head.weight``
    is left out, as in every checkpoint."""
    layers = lora_layers(model)
    state = {}
    for key, tensor in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        owner = module.rpartition(".")[0]  # "...q_proj" for "...q_proj.base_layer.weight" and "...q_proj.lora_A.weight"
        if owner in layers:
            if not module.endswith(".base_layer"):
                continue  # lora_A / lora_B: inside the merged weight
            key, tensor = f"{owner}.{leaf}", layers[owner].weight if leaf == "weight" else tensor
        state[key] = tensor.detach().contiguous().cpu()
    if isinstance(model, GPT) and model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


# ----------------------------------------------------------------------------- PEFT adapter directories
def peft_config(cfg: LoRAConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it for a plain LoRA adapter of a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    model: nn.Module, cfg: LoRAConfig, out_dir: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write the model's adapters as a PEFT adapter directory at ``out_dir`` (a new path).

    The directory is assembled under a temporary name and renamed at the end: a failure never leaves
    half of one. ``cfg`` must be the configuration the adapters were made with."""
    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new directory (saving never overwrites)")
    layers = _layers_or_raise(model)
    if mismatch := _mismatch(layers, cfg):
        raise ValueError(mismatch)
    state = {
        f"{PEFT_PREFIX}{name}.{part}.weight": getattr(layer, part).weight.detach().contiguous().cpu()
        for name, layer in layers.items()
        for part in ("lora_A", "lora_B")
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, peft_config(cfg, base_model_name_or_path))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _mismatch(layers: dict[str, LoRALinear], cfg: LoRAConfig) -> str | None:
    """Why the model's LoRA layers were not made with ``cfg``, or None."""
    for name, layer in layers.items():
        if layer.r != cfg.r or not math.isclose(layer.scale, cfg.scale):
            return f"{name}: LoRA r={layer.r}, scale={layer.scale:g}; cfg says r={cfg.r}, scale={cfg.scale:g}"
    wrapped = {name.rpartition(".")[2] for name in layers}
    if wrapped != set(cfg.target_modules):
        return f"the model has LoRA on {sorted(wrapped)}; cfg targets {sorted(cfg.target_modules)}"
    return None


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Read a PEFT LoRA adapter (ours or one PEFT wrote) into ``model``: LoRA is applied, then A and B are
    set from the file. Everything is checked before the model changes; a damaged or unsupported adapter
    raises ``ModelFileError`` naming the file and what is wrong, a missing file ``FileNotFoundError``."""
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers (remove_lora first)")
    cfg, state, where = _read_adapter(Path(adapter_dir))
    try:
        targets = _targets(model, cfg)
    except ValueError as e:
        raise ModelFileError(where.parent / ADAPTER_CONFIG, f"does not fit this model ({e})") from None
    pairs = _adapter_pairs(state, targets, cfg.r, where)
    apply_lora(model, cfg)
    _set_pairs(lora_layers(model), pairs)
    return cfg


def set_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Set A and B of a model that has its LoRA layers already (a resumed run) from an adapter directory
    made with the same configuration; checked as ``load_adapter`` checks."""
    layers = _layers_or_raise(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's LoRA layers are merged (unmerge_lora first)")
    cfg, state, where = _read_adapter(Path(adapter_dir))
    if mismatch := _mismatch(layers, cfg):
        raise ModelFileError(where.parent / ADAPTER_CONFIG, f"does not fit this model ({mismatch})")
    _set_pairs(layers, _adapter_pairs(state, {n: layer.base_layer for n, layer in layers.items()}, cfg.r, where))
    return cfg


def _read_adapter(adapter_dir: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], Path]:
    """An adapter directory's configuration, tensors and weights file."""
    cfg = config_from_peft(read_json_object(adapter_dir / ADAPTER_CONFIG), adapter_dir / ADAPTER_CONFIG)
    weights = adapter_dir / ADAPTER_WEIGHTS
    return cfg, read_safetensors(weights, "adapter weights"), weights


@torch.no_grad()
def _set_pairs(layers: dict[str, LoRALinear], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for name, (a, b) in pairs.items():
        layers[name].lora_A.weight.copy_(a)
        layers[name].lora_B.weight.copy_(b)


def config_from_peft(raw: dict[str, Any], where: Path) -> LoRAConfig:
    """Our ``LoRAConfig`` from the fields of a PEFT ``adapter_config.json`` (PEFT's defaults where absent)."""
    if raw.get("peft_type") != "LORA":
        raise ModelFileError(where, f"peft_type {raw.get('peft_type')!r}: only LORA adapters are supported")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise ModelFileError(where, f"task_type {raw['task_type']!r}: only CAUSAL_LM adapters fit this model")
    for key, what in UNSUPPORTED_PEFT_OPTIONS.items():
        if raw.get(key):
            raise ModelFileError(where, f"{key}={raw[key]!r}: {what} is not supported")
    if raw.get("bias", "none") != "none":
        raise ModelFileError(where, f"bias={raw['bias']!r}: trained biases are not supported")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ModelFileError(where, f"init_lora_weights={init!r}: this adapter goes with a modified base model")
    targets = raw.get("target_modules")
    if targets == "all-linear":  # PEFT: every linear layer but the output head
        targets = list(LLAMA_PROJECTIONS)
    elif isinstance(targets, str):
        raise ModelFileError(where, f"target_modules {targets!r}: a regular expression is not supported")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ModelFileError(where, f"target_modules must be a list of module names, found {targets!r}")
    # PEFT matches a target as a suffix of module names, and writes "all-linear" out as full names
    targets = sorted({t.rpartition(".")[2] for t in targets})
    try:
        cfg = LoRAConfig(
            r=raw.get("r", 8),
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0),
            target_modules=tuple(targets),
            use_rslora=bool(raw.get("use_rslora", False)),
        )
    except ValueError as e:
        raise ModelFileError(where, str(e)) from None
    # PEFT keeps target_modules as a set: list them in the model's order
    return replace(cfg, target_modules=tuple(t for t in LLAMA_PROJECTIONS if t in cfg.target_modules))


def _adapter_pairs(
    state: dict[str, torch.Tensor], targets: dict[str, nn.Linear], r: int, where: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) for every target module from PEFT's keys, each checked against the module it names."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ModelFileError(where, f"{key}: not a LoRA weight (expected {PEFT_PREFIX}<module>.lora_A/B.weight)")
        name, part, _ = key[len(PEFT_PREFIX) :].rsplit(".", 2)
        linear = targets.get(name)
        if linear is None:
            raise ModelFileError(where, f"{key}: names no target module of the model ({name})")
        want = (r, linear.in_features) if part == "lora_A" else (linear.out_features, r)
        if tuple(tensor.shape) != want:
            raise ModelFileError(where, f"{key}: shape {tuple(tensor.shape)}, the model needs {want} (r={r})")
        found.setdefault(name, {})[part] = tensor
    missing = [
        f"{PEFT_PREFIX}{n}.{p}.weight" for n in targets for p in ("lora_A", "lora_B") if p not in found.get(n, {})
    ]
    if missing:
        raise ModelFileError(
            where,
            f"{len(missing)} LoRA weights are missing, e.g. {missing[0]} (adapters on some layers only "
            "are not supported)",
        )
    return {name: (parts["lora_A"], parts["lora_B"]) for name, parts in found.items()}


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter directory (``adapter_config.json`` inside)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter names (``base_model_name_or_path``): what it is loaded onto."""
    where = Path(adapter_dir) / ADAPTER_CONFIG
    base = read_json_object(where).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ModelFileError(where, "names no base_model_name_or_path: give the base model explicitly")
    return base


def adapted_copy(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """``model`` with the adapter in ``adapter_dir``, sharing every base weight with ``model`` (no copy of
    them: several adapters are served over one base). The adapter stays unmerged, so ``model`` itself is
    never changed; only the LoRA matrices are new memory."""
    shared: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copy_ = copy.deepcopy(model, memo=shared)
    load_adapter(copy_, adapter_dir)
    return copy_.eval()
