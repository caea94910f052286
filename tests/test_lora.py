"""LoRA adapters: exactness of the zero start, merge/unmerge, frozen training, decoding through the engine,
and PEFT parity both ways on the HF export of a tiny random model (references: ``transformers`` + ``peft``)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_interop import _ids, _our_greedy, _tiny_model
from torch import nn

from llmstack.interop.bundle import llmstack_bundle
from llmstack.interop.hf import export_hf
from llmstack.model.llama import GPT, KVCache
from llmstack.training import lora as lora_module
from llmstack.training.checkpoint import ModelFileError, load_state
from llmstack.training.lora import (
    LLAMA_PROJECTIONS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    merged_state_dict,
    remove_lora,
    save_adapter,
    set_adapter_weights,
    unmerge_lora,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@torch.no_grad()
def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    """B leaves zero, so the adapters change the outputs (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def _adapted(tok, cfg: LoRAConfig) -> GPT:
    model = _tiny_model(tok)
    apply_lora(model, cfg)
    _randomize_b(model)
    return model.eval()


@pytest.fixture(scope="module")
def base_export(tmp_path_factory, tok):
    """The base model (before any adapter) as an HF folder, as PEFT users start from it."""
    return export_hf(llmstack_bundle(_tiny_model(tok), tok), tmp_path_factory.mktemp("lora") / "base")


@torch.no_grad()
def test_zero_b_is_the_base_model_and_merge_unmerge_are_exact(tok):
    model = _tiny_model(tok)
    ids = _ids(tok)
    before = model(ids)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1))
    assert len(names) == model.config.n_layer * len(LLAMA_PROJECTIONS)
    assert torch.equal(model(ids), before)  # B = 0: bitwise the base model (eval: no dropout)

    _randomize_b(model)
    adapted = model(ids)
    assert (adapted - before).abs().max() > 1e-2
    merge_lora(model)
    assert (model(ids) - adapted).abs().max() < 1e-5
    merge_lora(model)  # idempotent: the merged flag keeps it from counting twice
    assert (model(ids) - adapted).abs().max() < 1e-5
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        assert (layer.base_layer.weight - weights[f"{name}.weight"]).abs().max() < 1e-6
    assert (model(ids) - adapted).abs().max() < 1e-5


def test_only_the_adapters_train(tok):
    model = _tiny_model(tok)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1))
    adapters = {id(p) for p in lora_parameters(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapters
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    start = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    # AdamW over every parameter, weight decay on: the frozen ones get no gradient, so no update at all
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, tok.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(3):
        loss = model(ids[:, :-1], targets_BT=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(after[k], v) for k, v in start.items())  # every A and B moved

    merge_lora(model)  # a merged layer would get no gradient: refused rather than silently so
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        model(ids[:, :-1], targets_BT=ids[:, 1:])


@torch.no_grad()
def test_decoding_through_the_engine_uses_the_adapter_merged_or_not(tok):
    """The engine multiplies by fused q/k/v and gate/up matrices built from ``.weight``: LoRALinear.weight
    is the applied weight, so the unmerged model decodes what its forward computes."""
    model = _adapted(tok, LoRAConfig(r=4, alpha=8))
    ids = _ids(tok, 12)
    expected = ids
    for _ in range(10):  # greedy on full forwards, no cache and no fused weights
        expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected_new = expected[0, ids.shape[1] :].tolist()
    base_new = _our_greedy(_tiny_model(tok), ids, 10)
    assert base_new != expected_new  # the adapters change the continuation
    assert _our_greedy(model, ids, 10) == expected_new

    # the static (CUDA-graph) step, by hand on CPU: prefill with the fused weights, then one fixed-shape step
    full = model(expected[:, :13])
    cache = KVCache(model.config, 1, 16, "cpu", torch.float32)
    model.fuse_for_decode()
    cache.fused = True
    model(expected[:, :12], cache)
    cache.make_static()
    assert cache.pos_t is not None
    cache.pos_t.fill_(cache.pos)
    step = model(expected[:, 12:13], cache)
    assert (step[:, -1] - full[:, -1]).abs().max() < 1e-4

    merge_lora(model)
    assert _our_greedy(model, ids, 10) == expected_new


@torch.no_grad()
def test_remove_lora_gives_a_plain_model_merged_or_original(tok):
    ids = _ids(tok)
    original = _tiny_model(tok)
    model = _adapted(tok, LoRAConfig(r=4, alpha=8))
    adapted = model(ids)
    remove_lora(model, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    plain = GPT(model.config)
    plain.load_state_dict(model.state_dict(), strict=True)  # our names again: an ordinary checkpoint
    assert (plain.eval()(ids) - adapted).abs().max() < 1e-5

    model = _adapted(tok, LoRAConfig(r=4, alpha=8))
    remove_lora(model, merge=False)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_a_lora_run_checkpoints_merged_weights_and_resumes_its_adapter(tok, tmp_path):
    """What the training loop saves (merged weights for every stage, the adapter) and resumes from."""
    cfg = LoRAConfig(r=4, alpha=8)
    model = _adapted(tok, cfg)
    ids = _ids(tok)
    adapted = model(ids)
    plain = GPT(model.config)
    load_state(plain, merged_state_dict(model), "merged", tied=model.config.tie_embeddings)
    assert (plain.eval()(ids) - adapted).abs().max() < 1e-5
    assert not any(layer.merged for layer in lora_layers(model).values())  # the model itself is untouched

    save_adapter(model, cfg, tmp_path / "adapter")
    resumed = _tiny_model(tok)
    apply_lora(resumed, cfg)
    assert set_adapter_weights(resumed, tmp_path / "adapter") == cfg
    assert torch.equal(resumed(ids), adapted)
    other = _tiny_model(tok)
    apply_lora(other, LoRAConfig(r=2, alpha=8))
    with pytest.raises(ModelFileError, match="does not fit this model .*r=2, scale=4; cfg says r=4, scale=2"):
        set_adapter_weights(other, tmp_path / "adapter")


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(r=4, alpha=8),
        LoRAConfig(r=2, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"), use_rslora=True),
    ],
    ids=["all-projections", "some-rslora"],
)
def test_peft_reads_our_adapter_with_equal_logits(cfg, base_export, tok, tmp_path):
    model = _adapted(tok, cfg)
    out = save_adapter(model, cfg, tmp_path / "adapter", base_model_name_or_path=str(base_export))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_export)
    reference = peft.PeftModel.from_pretrained(hf, out).eval()
    loaded = peft.get_peft_model_state_dict(reference)
    assert loaded.keys() == keys.keys() and all(torch.equal(loaded[k], v) for k, v in keys.items())
    ids = _ids(tok)
    with torch.no_grad():
        diff = (reference(ids).logits - model(ids)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize(
    "targets, rslora", [(["q_proj", "v_proj"], False), ("all-linear", True)], ids=["qv", "all-linear-rslora"]
)
def test_our_model_reads_a_peft_adapter_with_equal_logits(targets, rslora, base_export, tok, tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_export)
    peft_cfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets, use_rslora=rslora, task_type="CAUSAL_LM"
    )
    reference = peft.get_peft_model(hf, peft_cfg)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    reference.save_pretrained(tmp_path / "adapter")
    model = _tiny_model(tok)
    cfg = load_adapter(model, tmp_path / "adapter")
    expected = LLAMA_PROJECTIONS if targets == "all-linear" else tuple(targets)
    assert cfg == LoRAConfig(r=4, alpha=8, dropout=0.05, target_modules=expected, use_rslora=rslora)
    ids = _ids(tok)
    with torch.no_grad():
        diff = (reference.eval()(ids).logits - model.eval()(ids)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"r": 0}, "rank r must be a positive integer"),
        ({"r": 2.5}, "rank r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"target_modules": ()}, "at least one target module"),
        ({"target_modules": ("q_proj", "qproj")}, r"unknown LoRA target modules \['qproj'\]"),
        ({"target_modules": ("lm_head",)}, "lm_head and the embeddings are not supported"),
        ({"target_modules": "q_proj"}, "must be a list of names"),
        ({"target_modules": ("q_proj", "q_proj")}, "repeated"),
    ],
)
def test_bad_configs_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LoRAConfig(**kw)


def test_apply_refuses_a_target_the_model_lacks_and_a_second_application(tok):
    model = _tiny_model(tok)
    mlp_less = nn.Sequential(nn.Linear(4, 4))
    mlp_less.q_proj = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"\['down_proj', 'gate_proj'.*match no nn.Linear of Sequential"):
        apply_lora(mlp_less, LoRAConfig())
    apply_lora(model, LoRAConfig(target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(_tiny_model(tok))


def _write_adapter(tmp_path, tok, name: str = "adapter"):
    cfg = LoRAConfig(r=4, alpha=8)
    return save_adapter(_adapted(tok, cfg), cfg, tmp_path / name)


def _edit_config(path, **fields) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **fields}))


def _edit_weights(path, edit) -> None:
    state = load_file(str(path / "adapter_model.safetensors"))
    edit(state)
    save_file(state, str(path / "adapter_model.safetensors"))


def test_bad_adapters_are_refused_by_name_and_leave_the_model_alone(tok, tmp_path):
    good = _write_adapter(tmp_path, tok)
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = []

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    cases.append((missing, FileNotFoundError, "adapter_model.safetensors: adapter weights are missing"))
    cases.append((tmp_path / "nowhere", FileNotFoundError, "adapter_config.json: file not found"))

    stray = _write_adapter(tmp_path, tok, "stray")
    _edit_weights(stray, lambda s: s.update({a_key.replace("layers.0", "layers.9"): s[a_key].clone()}))
    cases.append((stray, ModelFileError, r"layers\.9\.self_attn\.q_proj\.lora_A\.weight: names no target module"))

    rank = _write_adapter(tmp_path, tok, "rank")
    _edit_config(rank, r=8)
    cases.append((rank, ModelFileError, r"lora_A\.weight: shape \(4, \d+\), the model needs \(8, \d+\) \(r=8\)"))

    dropped = _write_adapter(tmp_path, tok, "dropped")
    _edit_weights(dropped, lambda s: s.pop(a_key))
    cases.append((dropped, ModelFileError, f"1 LoRA weights are missing, e.g. {a_key}"))

    for name, fields, msg in [
        ("dora", {"use_dora": True}, "use_dora=True: DoRA"),
        ("bias", {"bias": "all"}, "bias='all'"),
        ("regex", {"target_modules": ".*q_proj"}, "regular expression"),
        ("pissa", {"init_lora_weights": "pissa"}, "modified base model"),
        ("ia3", {"peft_type": "IA3"}, "only LORA adapters"),
        ("other", {"target_modules": ["c_attn"]}, r"unknown LoRA target modules \['c_attn'\]"),
    ]:
        bad = _write_adapter(tmp_path, tok, name)
        _edit_config(bad, **fields)
        cases.append((bad, ModelFileError, msg))

    model = _tiny_model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for path, error, msg in cases:
        with pytest.raises(error, match=msg):
            load_adapter(model, path)
        assert model.state_dict().keys() == before.keys()  # still the plain model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    load_adapter(model, good)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        load_adapter(model, good)


def test_saving_never_leaves_a_half_written_adapter(tok, tmp_path, monkeypatch):
    cfg = LoRAConfig(r=4, alpha=8)
    model = _adapted(tok, cfg)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora_module, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, cfg, tmp_path / "adapter")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"cfg targets \['q_proj'\]"):
        save_adapter(model, LoRAConfig(r=4, alpha=8, target_modules=("q_proj",)), tmp_path / "adapter")
    with pytest.raises(ValueError, match="r=4, scale=2; cfg says r=8"):
        save_adapter(model, LoRAConfig(r=8, alpha=16), tmp_path / "adapter")
    save_adapter(model, cfg, tmp_path / "adapter")
    with pytest.raises(ValueError, match="already exists"):
        save_adapter(model, cfg, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
