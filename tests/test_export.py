"""export.py: PEFT-format adapters and merged checkpoints."""

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gatera import GateRAConfig, adapted_layers, apply_gatera
from checkpoints import config_from_hf, load_pretrained
from export import export_peft, import_peft, merge_to_hf
from tests.conftest import FIXTURES, logits, max_diff, METHODS, write_model_gguf


PEFT = FIXTURES / "peft"  # made by fixtures/make_peft_fixtures.py with Hugging Face peft
# the reference interpreter: a Python with the pinned transformers and peft (not dependencies of the project)
REFERENCE_PYTHON = os.environ.get("GATERA_REFERENCE_PYTHON")
SET_UP = ("python -m venv --system-site-packages ~/.venvs/gatera-reference && ~/.venvs/gatera-reference/bin/pip "
          "install transformers==5.24.0 peft==0.21.2, then export GATERA_REFERENCE_PYTHON="
          "~/.venvs/gatera-reference/bin/python (as .ci/run does)")
# max-abs difference of fp32 logits (|logit| <= 7 here) between two computations of the same function
# in another order of operations (PEFT, transformers, a merged weight): measured at most 1.2e-5
EXPORT_TOL = 3e-5


def exportable(name, method, gate, seed=0):
    """A tiny model with random adapters, as after training: every projection of Llama (rank 3); q, v, o,
    up and down of GPT-2, so that its c_attn adapter is fused from two parts (rank 6, a zero block for k)."""
    torch.manual_seed(seed)
    model = load_pretrained(FIXTURES / name)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    targets += ["k_proj", "gate_proj"] if name == "tiny_llama" else []
    apply_gatera(model, GateRAConfig(method=method, gate=gate, rank=3, alpha=5.0, rslora=method == "dora",
                                     target_modules=targets))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def peft_tokens():
    return load_file(PEFT / "logits.safetensors")["tokens"]


def reference_logits(mode, dirs, out):
    """fixtures/make_peft_fixtures.py --check (PeftModel.from_pretrained) or --check-merged
    (AutoModelForCausalLM.from_pretrained) on dirs, run by REFERENCE_PYTHON: the fp32 logits, by folder."""
    proc = subprocess.run([REFERENCE_PYTHON, str(FIXTURES / "make_peft_fixtures.py"), mode, *map(str, dirs),
                           "--logits-out", str(out)], capture_output=True, text=True, timeout=600)
    assert "ModuleNotFoundError" not in proc.stderr, \
        f"GATERA_REFERENCE_PYTHON={REFERENCE_PYTHON} lacks a module ({proc.stderr.strip().splitlines()[-1]}): {SET_UP}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


@pytest.mark.parametrize("adapter", ["llama_lora", "llama_dora", "llama_hira", "gpt2_lora", "gpt2_dora", "gpt2_hira"])
def test_a_peft_adapter_imports_with_peft_logits(adapter):
    # llama_dora is rsLoRA, gpt2_lora has a rank_pattern and alpha_pattern, gpt2_* adapt the fused c_attn
    reference = load_file(PEFT / "logits.safetensors")
    model = load_pretrained(FIXTURES / f"tiny_{adapter.split('_')[0]}")
    cfg = import_peft(model, PEFT / adapter)
    assert (cfg.method, cfg.gate) == (adapter.split("_")[1], "none")
    assert max_diff(logits(model, reference["tokens"]), reference[f"{adapter}.logits"]) <= 1e-5  # measured 4.2e-6


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("method,gate", itertools.product(METHODS, ("none", "static")))
def test_an_exported_adapter_imports_back_with_the_same_logits(tmp_path, name, method, gate):
    model = exportable(name, method, gate)
    export_peft(model, tmp_path, FIXTURES / name)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj" if name == "tiny_llama" else \
        "base_model.model.transformer.h.0.attn.c_attn"
    A, B = (f"hira_{x}" if method == "hira" else f"lora_{x}.weight" for x in "AB")
    rank = 3 if name == "tiny_llama" else 6  # c_attn: q's and v's adapters side by side
    assert keys[f"{prefix}.{A}"].shape == (rank, 32) and keys[f"{prefix}.{B}"].shape[1] == rank
    assert (f"{prefix}.lora_magnitude_vector" in keys) == (method == "dora")
    fresh = load_pretrained(FIXTURES / name)
    cfg = import_peft(fresh, tmp_path)
    assert (cfg.method, cfg.gate) == (method, "none")
    ids = peft_tokens()
    assert max_diff(logits(fresh.eval(), ids), logits(model, ids)) <= EXPORT_TOL  # measured 0 for gate none, 5.0e-6 static


@pytest.mark.slow
def test_peft_and_transformers_load_our_exports_with_our_logits(tmp_path):
    """The reference script's code path: PeftModel.from_pretrained on our exported adapters, and
    AutoModelForCausalLM.from_pretrained on our merged folders (one from a .gguf source), give our logits."""
    if not REFERENCE_PYTHON:
        pytest.skip(f"needs the reference interpreter, named by GATERA_REFERENCE_PYTHON: {SET_UP}")
    assert Path(REFERENCE_PYTHON).is_file(), f"GATERA_REFERENCE_PYTHON={REFERENCE_PYTHON} is not a file: {SET_UP}"
    ids, ours, adapters, merged = peft_tokens(), {}, [], []
    for name, method, gate in itertools.product(["tiny_llama", "tiny_gpt2"], METHODS, ("none", "static")):
        model = exportable(name, method, gate)
        ours[f"{name}_{method}_{gate}"] = logits(model, ids)
        adapters.append(tmp_path / "peft" / f"{name}_{method}_{gate}")
        export_peft(model, adapters[-1], FIXTURES / name)
        merged.append(tmp_path / "merged" / f"{name}_{method}_{gate}")
        merge_to_hf(model, merged[-1], FIXTURES / name)
    if importlib.util.find_spec("gguf") is not None:
        write_model_gguf("tiny_llama", tmp_path / "tiny.gguf")
        model = load_pretrained(tmp_path / "tiny.gguf")
        apply_gatera(model, GateRAConfig(method="dora", gate="static", rank=2, target_modules=["q_proj", "down_proj"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
        ours["gguf_dora_static"] = logits(model.eval(), ids)  # eval: no adapter dropout
        merged.append(tmp_path / "merged" / "gguf_dora_static")
        merge_to_hf(model, merged[-1], tmp_path / "tiny.gguf")
    theirs = reference_logits("--check", adapters, tmp_path / "peft.safetensors")
    for d in adapters:
        assert max_diff(theirs[str(d)], ours[d.name]) <= EXPORT_TOL, d.name  # measured at most 1.2e-5
    theirs = reference_logits("--check-merged", merged, tmp_path / "merged.safetensors")
    for d in merged:
        assert max_diff(theirs[str(d)], ours[d.name]) <= EXPORT_TOL, d.name  # measured at most 8.4e-6


def test_a_token_gated_adapter_is_refused_because_peft_cannot_express_it(tmp_path):
    model = exportable("tiny_llama", "lora", "token")
    with pytest.raises(ValueError, match="token gate .*PEFT cannot express it"):
        export_peft(model, tmp_path / "peft", FIXTURES / "tiny_llama")
    with pytest.raises(ValueError, match="token gate .*no single weight matrix"):
        merge_to_hf(model, tmp_path / "merged", FIXTURES / "tiny_llama")
    assert not (tmp_path / "peft").exists() and not (tmp_path / "merged").exists()
    # a static-gated DoRA is again a DoRA unless the gate turns a row of W0 around: m/n << 0
    dora = exportable("tiny_llama", "dora", "static")
    with torch.no_grad():
        dora.transformer.h[1].attn.k_proj.magnitude[3] = -100.0
    with pytest.raises(ValueError, match=r"transformer.h.1.attn.k_proj row 3: .* 1 \+ g \(m/n - 1\) = .* <= 0"):
        export_peft(dora, tmp_path / "peft", FIXTURES / "tiny_llama")


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_a_merged_folder_has_the_checkpoints_names_and_reloads_in_our_model_with_its_logits(tmp_path, name, method):
    source = shutil.copytree(FIXTURES / name, tmp_path / "source")
    (source / "tokenizer.json").write_text('{"model": "a stand-in"}')
    model = exportable(name, method, "static")
    merge_to_hf(model, tmp_path / "merged", source)
    assert sorted(os.listdir(tmp_path / "merged")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "merged" / "tokenizer.json").read_text() == '{"model": "a stand-in"}'
    written, original = load_file(tmp_path / "merged" / "model.safetensors"), load_file(source / "model.safetensors")
    # transformers' names and layouts (GPT-2: the fused c_attn, Conv1D's (in, out)), and the source's config
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in original.items()}
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config == json.loads((source / "config.json").read_text())
    merged, ids = load_pretrained(tmp_path / "merged"), peft_tokens()
    assert max_diff(logits(merged, ids), logits(model, ids)) <= EXPORT_TOL  # measured 8.3e-6


def test_a_merge_from_a_gguf_writes_a_hugging_face_folder_whose_config_is_ours(tmp_path):
    write_model_gguf("tiny_llama", tmp_path / "tiny.gguf")
    model = load_pretrained(tmp_path / "tiny.gguf")
    apply_gatera(model, GateRAConfig(method="hira", gate="none", rank=2, target_modules=["v_proj", "up_proj"]))
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_B.normal_()
    merge_to_hf(model, tmp_path / "merged", tmp_path / "tiny.gguf")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "llama" and config_from_hf(config, "config.json") == model.config
    merged = load_pretrained(tmp_path / "merged")
    ids = peft_tokens()
    assert max_diff(logits(merged, ids), logits(model, ids)) <= EXPORT_TOL


def test_import_peft_names_the_file_and_the_tensor_it_cannot_use(tmp_path):
    q1 = "base_model.model.model.layers.1.self_attn.q_proj"

    def variant(name, config=None, tensors=None):
        """fixtures/peft/llama_dora with config fields replaced and tensors replaced (None: deleted)."""
        d = shutil.copytree(PEFT / "llama_dora", tmp_path / name)
        cfg = {**json.loads((d / "adapter_config.json").read_text()), **(config or {})}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        state = load_file(d / "adapter_model.safetensors")
        for k, v in (tensors or {}).items():
            state.pop(k) if v is None else state.__setitem__(k, v)
        save_file(state, d / "adapter_model.safetensors")
        return d

    cases = [
        (variant("no_magnitude", tensors={f"{q1}.lora_magnitude_vector": None}),
         f"tensor {q1}.lora_magnitude_vector is missing from .*no_magnitude/adapter_model.safetensors"),
        (variant("no_layer", tensors=dict.fromkeys(f"{q1}.{k}" for k in ("lora_A.weight", "lora_B.weight",
                                                                          "lora_magnitude_vector"))),
         f"tensor {q1}.lora_A.weight is missing .* ours go on every layer of a name"),
        (variant("shape", tensors={f"{q1}.lora_A.weight": torch.zeros(4, 31)}),
         rf"tensor {q1}.lora_A.weight in .*shape/adapter_model.safetensors has shape \(4, 31\), "
         r"the model expects \(4, 32\)"),
        (variant("extra", tensors={"base_model.model.lm_head.weight": torch.zeros(96, 32)}),
         "extra/adapter_model.safetensors has tensor base_model.model.lm_head.weight"),
        (variant("rank", config={"r": 8}), r"lora_A.weight in .*rank/adapter_model.safetensors has rank 4, but .*r=8"),
        (variant("saved", config={"modules_to_save": ["lm_head"]}), "saved/adapter_config.json sets modules_to_save"),
        (variant("ia3", config={"peft_type": "IA3"}), "ia3/adapter_config.json has peft_type 'IA3'"),
    ]
    for folder, message in cases:
        model = load_pretrained(FIXTURES / "tiny_llama")
        with pytest.raises(ValueError, match=message):
            import_peft(model, folder)
        assert not adapted_layers(model), folder.name  # checked before the model is touched
    with pytest.raises(ValueError, match=r"llama_dora/adapter_model.safetensors adapts model\.layers\.0\..*, "
                                         "which this gpt2 model does not have"):
        import_peft(load_pretrained(FIXTURES / "tiny_gpt2"), PEFT / "llama_dora")
