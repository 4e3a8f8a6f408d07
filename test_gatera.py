"""
pytest proves the GateRA theory and checks the implementation against reference implementations.

Read the test names top to bottom: each one is a claim. The theory tests run in float64 and
compare the closed-form gradients of the paper (REFERENCE.md section 4) with autograd.
"""

import itertools
import math

import pytest
import torch
import torch.nn as nn

from gatera import (AdaptedLinear, GateRAConfig, apply_gatera, binary_entropy, gate_entropy,
                    load_adapter, merge_gatera, save_adapter)

METHODS, GATES = ("lora", "dora", "hira"), ("none", "static", "token")
IN, OUT, RANK, T = 6, 5, 3, 4


def make_layer(method, gate, rank=RANK, seed=0, bias=True):
    """A float64 adapted layer with random (non-zero) A, B, magnitude and gate, as after training."""
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=bias, dtype=torch.float64)
    cfg = GateRAConfig(method=method, rank=rank, alpha=2.0 * rank, gate=gate, targets=("x",))
    layer = AdaptedLinear(base, cfg)
    with torch.no_grad():
        layer.lora_B.normal_()
        if method == "dora":
            layer.magnitude.mul_(1 + 0.3 * torch.randn(OUT, dtype=torch.float64))
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
# The soft gradient-masking theorem (REFERENCE section 4)

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
        bound_elementwise = g * W0.abs().max() * delta.norm() * x.norm()
        bound_spectral = g * torch.linalg.matrix_norm(W0, ord=2) * delta.norm() * x.norm()
        assert dM.norm() <= bound_elementwise * (1 + 1e-12)
        assert dM.norm() <= bound_spectral * (1 + 1e-12)


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
    layer = make_layer("lora", "token")
    x = torch.randn(T, IN, dtype=torch.float64)
    z = {}
    layer.gate.register_forward_hook(lambda mod, inp, out: z.update(z=out))
    layer(x)
    z["z"].retain_grad()
    gate_entropy(layer).backward()                                  # H = mean over the T gate values
    g = torch.sigmoid(z["z"]).detach()
    torch.testing.assert_close(z["z"].grad, -g * (1 - g) * z["z"].detach() / T, rtol=1e-10, atol=1e-14)


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
    """The plain formulas of REFERENCE sections 1-2, written out independently of gatera.py; this also
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


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, ("none", "static")))
def test_merge_is_exact_for_gate_none_and_static(method, gate):
    model = nn.Sequential()
    model.q_proj = make_layer(method, gate).base
    apply_gatera(model, GateRAConfig(method=method, gate=gate, rank=RANK, targets=("q_proj",)))
    with torch.no_grad():
        model.q_proj.lora_B.normal_()
        if gate == "static":
            model.q_proj.gate.fill_(-0.4)
    x = torch.randn(T, IN, dtype=torch.float64)
    before = model.q_proj(x)
    merge_gatera(model)
    assert type(model.q_proj) is nn.Linear
    torch.testing.assert_close(model.q_proj(x), before, rtol=1e-12, atol=1e-12)


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
