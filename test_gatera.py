"""
The GateRA paper's theory and the adapters' claims, each test name a claim: run `python -m pytest test_gatera.py`.

The theory tests run in float64 and compare the closed-form gradients of the GateRA paper's soft
gradient-masking theorem (Ou et al., AAAI 2026, arXiv:2511.17582) with autograd; then what g = 0, g = 1,
init, merge, alpha and saving mean, and the fast paths against the plain formula. Everything else
(the model against transformers, tokenizers, data, training, bf16, the gate page, export) is in tests/.
"""

import itertools
import math

import pytest
import torch
import torch.nn as nn

import gatera
from gatera import (AdaptedLinear, GateRAConfig, adapted_layers, apply_gatera, binary_entropy, gate_entropy,
                    merge_gatera)
from checkpoints import load_pretrained
from tests.conftest import adapted_tiny, FIXTURES, GATES, IN, make_layer, METHODS, OUT, plain_formula, RANK, T


def loss_and_delta(layer, x):
    """A non-linear loss L = sum(c * tanh(y)) so that delta = dL/dy differs per token and feature."""
    y = layer(x)                                                     # (T, OUT)
    y.retain_grad()
    c = torch.linspace(-1, 2, y.shape[-1], dtype=y.dtype)           # the same weights for every token
    loss = (c * torch.tanh(y)).sum()
    loss.backward()
    return y.grad                                                    # (T, OUT) delta per token


def gates_of(layer, x):
    """g per token (T,), from the gate's parameters, never from gatera.py's gate_value:
    sigmoid(w_g . x + b_g) for a token gate, sigmoid(z) for a static one, 1 without a gate."""
    with torch.no_grad():
        if layer.config.gate == "token":
            return torch.sigmoid(x @ layer.gate_logit.weight[0] + layer.gate_logit.bias)  # (T,)
        if layer.config.gate == "static":
            return torch.sigmoid(layer.gate_logit).expand(x.shape[0])                     # (T,) one value
        return torch.ones(x.shape[0], dtype=x.dtype)


def update_of(layer, x):
    """Delta(x) (T, OUT), the papers' formulas on the layer's parameters (these layers have no dropout):
    LoRA s B A x; DoRA (m/n - 1) W0 x + (m/n) s B A x with n = ||W0 + s B A||_row; HiRA (W0 * B A) x."""
    cfg, W0 = layer.config, layer.base.weight.detach()
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), cfg.scale
    if cfg.method == "lora":
        return s * x @ (B @ A).T
    if cfg.method == "dora":
        m_over_n = layer.magnitude.detach() / (W0 + s * B @ A).norm(dim=1)  # (OUT,)
        return (m_over_n - 1) * (x @ W0.T) + m_over_n * (s * x @ (B @ A).T)
    return x @ (W0 * (B @ A)).T


# -----------------------------------------------------------------------------
# The soft gradient-masking theorem (GateRA paper): every adapter gradient of a token is scaled by its gate

def closed_form_grads(layer, x, delta):
    """dL/dA and dL/dB from the paper's formulas, summed over tokens, each token weighted by g(x_t)."""
    cfg, A, B = layer.config, layer.lora_A.detach(), layer.lora_B.detach()
    W0 = layer.base.weight.detach()
    g = gates_of(layer, x)
    gA, gB = torch.zeros_like(A), torch.zeros_like(B)
    for t in range(x.shape[0]):
        xt, dy_t = x[t], delta[t]                                      # (IN,), (OUT,)
        if cfg.method == "lora":            # dL/dB = g s delta (A x)^T,  dL/dA = g s B^T delta x^T
            gB += g[t] * cfg.scale * torch.outer(dy_t, A @ xt)
            gA += g[t] * cfg.scale * torch.outer(B.T @ dy_t, xt)
        elif cfg.method == "dora":          # the same with delta scaled per row by u = m / n
            u = layer.magnitude.detach() / (W0 + cfg.scale * B @ A).norm(dim=1)
            gB += g[t] * cfg.scale * torch.outer(u * dy_t, A @ xt)
            gA += g[t] * cfg.scale * torch.outer(B.T @ (u * dy_t), xt)
        else:                               # dL/dM = g (W0 * delta x^T); dL/dB = dL/dM A^T, dL/dA = B^T dL/dM
            dM = g[t] * W0 * torch.outer(dy_t, xt)
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
    """dL/dM = g W0 * (delta x^T) for M = B A, so ||dL/dM||_F <= g max|W0| ||delta|| ||x|| (the paper's
    bound; max|W0| <= ||W0||_2 of any matrix gives its weaker spectral form). What reaches B is
    dL/dB = dL/dM A^T, so ||dL/dB||_F <= g max|W0| ||delta|| ||x|| ||A||_2: checked first on autograd's
    gradient for a rank-3 A, with gates near 1/2 and near 0 (a gradient not scaled by g breaks it)."""
    layer = make_layer("hira", "token")
    for bias in (0.0, -6.0):  # g = 1/2, then g = sigmoid(-6) = 0.0025 for every token
        with torch.no_grad():
            layer.gate_logit.weight.zero_()
            layer.gate_logit.bias.fill_(bias)
        layer.zero_grad()
        x = torch.randn(1, IN, dtype=torch.float64)
        delta = loss_and_delta(layer, x)[0]
        g, W0, A = gates_of(layer, x)[0], layer.base.weight, layer.lora_A.detach()
        bound = g * W0.abs().max() * delta.norm() * x.norm() * torch.linalg.matrix_norm(A, ord=2)
        assert layer.lora_B.grad.norm() <= bound * (1 + 1e-12), (bias, layer.lora_B.grad.norm(), bound)
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
        torch.testing.assert_close(layer.lora_B.grad, g * W0 * torch.outer(delta, x[0]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_a_token_whose_gate_goes_to_zero_contributes_nothing_to_the_adapter_gradients(method):
    layer = make_layer(method, "token")
    x = torch.randn(2, IN, dtype=torch.float64)
    grads = {}
    for z0 in (0.0, -40.0):  # token 1 keeps z = 0 (g = 0.5); token 0 gets z0 (g = 4e-18 at -40)
        with torch.no_grad():
            d = x[1] - x[0]
            layer.gate_logit.weight.copy_((-z0) * d / d.dot(d))           # w.x1 - w.x0 = -z0
            layer.gate_logit.bias.fill_(-(layer.gate_logit.weight[0] @ x[1]))    # z1 = 0
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


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, ("static", "token")))
def test_gate_logit_gradient_is_g_one_minus_g_times_delta_dot_update(method, gate):
    # dL/dz_t = g_t (1 - g_t) delta_t . Delta(x_t). Token gate: z = w_g . x + b_g, so dL/db_g = sum_t dL/dz_t
    # and dL/dw_g = sum_t dL/dz_t x_t. Static gate: one z for all tokens, dL/dz = sum_t dL/dz_t.
    layer = make_layer(method, gate)
    x = torch.randn(T, IN, dtype=torch.float64)
    delta = loss_and_delta(layer, x)
    g = gates_of(layer, x)
    dz = g * (1 - g) * (delta * update_of(layer, x)).sum(-1)        # (T,)
    if gate == "static":
        torch.testing.assert_close(layer.gate_logit.grad, dz.sum(), rtol=1e-10, atol=1e-12)
        return
    torch.testing.assert_close(layer.gate_logit.bias.grad, dz.sum().view(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.gate_logit.weight.grad, (dz[:, None] * x).sum(0, keepdim=True),
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
    assert layer.gate_logit.weight.grad.abs().max() == 0 and layer.gate_logit.bias.grad.abs().max() == 0
    assert layer.lora_B.grad.abs().max() > 0
    _, gB = closed_form_grads(layer, x, delta)
    torch.testing.assert_close(layer.lora_B.grad, gB, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, ("static", "token")))
def test_entropy_gradient_is_minus_g_one_minus_g_times_z(method, gate):
    """dH/dz_t = -g (1 - g) z_t / T for each token's logit z_t, seen through the gate's parameters:
    token gate z_t = w_g . x_t + b_g, so dH/db_g = sum_t dH/dz_t and dH/dw_g = sum_t dH/dz_t x_t;
    static gate, one z for all tokens: dH/dz = sum_t dH/dz_t. The adapter itself gets no gradient from H."""
    layer = make_layer(method, gate)
    x = torch.randn(T, IN, dtype=torch.float64)
    gates = {}
    layer(x, gates)                                                 # the forward puts g (T,) into gates
    gate_entropy(gates).backward()                                  # H = mean over the T gate values
    with torch.no_grad():
        z = x @ layer.gate_logit.weight[0] + layer.gate_logit.bias if gate == "token" else layer.gate_logit.expand(T)
        g = torch.sigmoid(z)                                        # (T,)
        dz = -g * (1 - g) * z / T
    # H(g) = H(1 - g): the gradients below cannot tell sigmoid(z) from sigmoid(-z), the gate value can
    torch.testing.assert_close(gates[layer.name], g, rtol=1e-12, atol=0)
    if gate == "token":
        torch.testing.assert_close(layer.gate_logit.bias.grad, dz.sum(0, keepdim=True), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(layer.gate_logit.weight.grad, (dz @ x)[None], rtol=1e-10, atol=1e-14)
    else:
        torch.testing.assert_close(layer.gate_logit.grad, dz.sum(), rtol=1e-10, atol=1e-14)
    for name, p in layer.named_parameters():
        if p.requires_grad and not name.startswith("gate_logit"):
            assert p.grad is None or not p.grad.any(), name         # A, B, m: H reaches only the gate


def test_entropy_is_log2_at_one_half_zero_at_the_ends_and_excludes_padding():
    g = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(binary_entropy(g), torch.tensor([math.log(2), 0, 0], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    layer = make_layer("lora", "token")
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    gates = {}
    layer(x, gates)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with torch.no_grad():
        g = torch.sigmoid(x @ layer.gate_logit.weight[0] + layer.gate_logit.bias)  # (2, 3) from the parameters
    h = -(g * g.log() + (1 - g) * (1 - g).log())                    # (2, 3) binary entropy, in closed form
    expected = (h[0, 0] + h[0, 1] + h[1, 0]) / 3
    torch.testing.assert_close(gate_entropy(gates, mask), expected)


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
def test_gradcheck_passes_on_every_layer(method, gate, monkeypatch):
    """Finite differences agree with autograd in x and every trainable tensor. DoRA's norm
    n = ||W0 + s B A||_row is detached by design (a constant for autograd, as the DoRA paper has it), so
    for DoRA the finite differences run with n held at its value: gatera.row_norm returns that n."""
    layer = make_layer(method, gate, rank=2)
    if method == "dora":
        with torch.no_grad():
            n = gatera.row_norm(layer.base.weight + layer.config.scale * layer.lora_B @ layer.lora_A)  # (OUT,)
        monkeypatch.setattr(gatera, "row_norm", lambda w: n)
    params = dict(layer.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    assert {"lora_A", "lora_B"} <= set(names)
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
            layer.gate_logit.fill_(logit)
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
                              GateRAConfig(method="lora", rank=4, alpha=16, rslora=rslora, dropout=0.0, gate="none"))
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
    apply_gatera(model, GateRAConfig(method=method, gate=gate, rank=RANK, dropout=0.0, target_modules=("q_proj",)))
    with torch.no_grad():
        model.q_proj.lora_B.normal_()
        if method == "dora":  # a magnitude that training moved away from ||W0||
            model.q_proj.magnitude.mul_(1 + 0.3 * torch.randn(OUT, dtype=dtype))
        if gate == "static":
            model.q_proj.gate_logit.fill_(-0.4)
    x = torch.randn(T, IN, dtype=dtype)
    before = model.q_proj(x)
    assert (before - model.q_proj.base(x)).abs().max() > 0.1  # the update is there to merge
    merge_gatera(model)
    assert type(model.q_proj) is nn.Linear and model.q_proj.weight.dtype == dtype
    torch.testing.assert_close(model.q_proj(x), before, rtol=tol, atol=tol)


def test_a_token_gate_cannot_be_merged_and_says_why():
    model = nn.Sequential()
    model.q_proj = nn.Linear(IN, OUT)
    apply_gatera(model, GateRAConfig(gate="token", target_modules=("q_proj",)))
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
        apply_gatera(model, GateRAConfig(target_modules=("q_proj", "k_proj")))


def test_config_rejects_unknown_method_gate_and_hira_dropout():
    for kw, error in ((dict(method="ia3"), r"method must be one of \('lora', 'dora', 'hira'\), got 'ia3'"),
                      (dict(gate="soft"), r"gate must be one of \('none', 'static', 'token'\), got 'soft'"),
                      (dict(method="hira", dropout=0.1), "HiRA uses no dropout"), (dict(rank=0), "rank must be >= 1")):
        with pytest.raises(ValueError, match=error):
            GateRAConfig(**kw)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_gate_on_dropout_sees_the_adapters_own_dropout_mask(method):
    """With gate_on_dropout the gate reads dropout(x): the same mask as the adapter's A dropout(x),
    which a spy on nn.Dropout shows (one call per forward, its output used by both)."""
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(IN, OUT, dtype=torch.float64), GateRAConfig(
        method=method, rank=RANK, gate="token", dropout=0.5, gate_on_dropout=True, target_modules=("x",)))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate_logit.weight.normal_()
    calls = []
    layer.dropout.register_forward_hook(lambda m, i, o: calls.append(o))
    x = torch.randn(T, IN, dtype=torch.float64)
    gates = {}
    y = layer(x, gates)
    assert len(calls) == 1  # one mask per forward
    xd = calls[0]
    g = torch.sigmoid(xd @ layer.gate_logit.weight.T + layer.gate_logit.bias)          # (T, 1) the gate on that dropout(x)
    torch.testing.assert_close(gates[layer.name], g[:, 0])
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


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
def test_at_init_the_adapted_model_equals_the_base_model_exactly(name, method, gate):
    base = load_pretrained(FIXTURES / name)
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
        gates = {}
        logits = model(idx, gates=gates)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        (loss + 0.1 * gate_entropy(gates)).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_gate_entropy_of_a_model_averages_every_gated_layer_over_real_tokens():
    model = adapted_tiny(gate="token", gate_init_std=0.5)
    idx = torch.randint(0, 96, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    expected = {}  # each layer's gate, recomputed from its input and its parameters by a hook
    for name, layer in adapted_layers(model):
        layer.register_forward_hook(lambda m, inputs, out, name=name: expected.__setitem__(
            name, torch.sigmoid(inputs[0] @ m.gate_logit.weight[0] + m.gate_logit.bias).detach()))
    gates = {}
    model(idx, gates=gates)
    assert sorted(gates) == sorted(expected) == sorted(n for n, _ in adapted_layers(model))
    h = binary_entropy(torch.stack(list(expected.values())))        # (L, B, T)
    torch.testing.assert_close(gate_entropy(gates, mask), h[:, mask.bool()].mean())


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
    assert layer.kept_delta_w[1] is kept                             # kept, not rebuilt
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    for p in params:  # gradients set by hand: no forward with autograd in between, only the step itself
        p.grad = torch.randn_like(p)
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain_formula(layer, x), rtol=1e-12, atol=1e-12)
        layer.lora_A.copy_(torch.randn_like(layer.lora_A))            # in place, as load_adapter copies
        torch.testing.assert_close(layer(x), plain_formula(layer, x), rtol=1e-12, atol=1e-12)
    layer(x).sum().backward()
    assert layer.kept_delta_w is None                                # training keeps nothing
