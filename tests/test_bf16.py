"""bf16: a frozen bf16 base with fp32 adapters, every matmul in bf16."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
from checkpoints import load_pretrained, pick_dtype
from gatera import GateRAConfig, adapted_layers, apply_gatera, merge_gatera
from tokenizer import load_tokenizer
from tests.conftest import FIXTURES, GATES, IN, make_layer, METHODS, plain_formula


def test_the_fast_paths_keep_a_bf16_base_in_bf16_and_the_adapter_in_fp32():
    for method, gate in itertools.product(METHODS, GATES):
        layer = make_layer(method, gate, dtype=torch.bfloat16)
        x = torch.randn(2, 3, IN, dtype=torch.bfloat16, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        assert y.dtype == x.grad.dtype == torch.bfloat16
        assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
        torch.testing.assert_close(y.double(), plain_formula(layer.double(), x.double()), rtol=0.05, atol=0.05)


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
    model = load_pretrained(FIXTURES / "tiny_llama", dtype=dtype)
    apply_gatera(model, GateRAConfig(method=method, gate=gate, rank=4, dropout=0.0))
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_B.normal_(std=0.05 if method != "hira" else 0.3)
            if method == "dora":
                layer.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.magnitude))
            if gate == "token":
                layer.gate_logit.weight.normal_(std=0.3)
            elif gate == "static":
                layer.gate_logit.fill_(0.4)
    return model


@pytest.mark.parametrize("method,gate", itertools.product(METHODS, GATES))
def test_every_method_and_gate_trains_on_a_bf16_base_within_bf16_precision_of_fp32(method, gate):
    """Forward and backward of a whole (tiny) model with a bf16 base, against the same model in fp32.
    bf16 keeps 8 significant bits (rounding error up to 2^-8 = 0.4 % of a value) in every weight and
    activation, and two layers compound it. Stated tolerance, as a share of each tensor's norm: 3 % on
    the logits, 15 % on the gradient of every adapter matrix (measured on this model: at most 2.1 %,
    and 8.4 % but for DoRA's token gate, 10.2 %, whose gradient is a dot product with the small
    m/n - 1; rounding only the base weights to bf16 and computing in fp32 already gives 1.4 % and
    4.4 %). A single scalar's gradient (a static gate, a gate bias) is a sum that cancels and can move
    more (up to 36 % measured), so the scalars are compared together, as one vector: 15 % (measured
    at most 7.8 %). Then one AdamW step: parameters and gradients stay fp32, the frozen bf16 base does
    not move, every adapter tensor does, and the loss falls, within 1 % of the fp32 model's (measured
    0.2 %)."""
    fp32, bf16 = trained_tiny(method, gate, torch.float32), trained_tiny(method, gate, torch.bfloat16)
    copy_adapters(fp32, bf16)
    idx = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    out, losses = {}, {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        def loss():
            logits = model(idx)                                          # (2, 12, vocab)
            return logits.float(), F.cross_entropy(logits.float().flatten(0, 1)[:-1], idx.flatten()[1:])
        logits, before = loss()
        before.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        out[name] = logits, grads
        base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
        with torch.no_grad():
            losses[name] = before.item(), loss()[1].item()
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)
        assert all(p.dtype == torch.float32 and not torch.equal(p, adapter[n])
                   for n, p in model.named_parameters() if p.requires_grad)
    assert all(g.dtype == torch.float32 for g in out["bf16"][1].values())
    assert bf16.lm_head.weight.dtype == torch.bfloat16

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    assert rel(out["bf16"][0], out["fp32"][0]) < 0.03
    for n, g in out["fp32"][1].items():
        assert g.numel() == 1 or rel(out["bf16"][1][n], g) < 0.15, n
    scalars = [n for n, g in out["fp32"][1].items() if g.numel() == 1]
    if scalars:
        assert rel(*(torch.cat([out[k][1][n].flatten() for n in scalars]) for k in ("bf16", "fp32"))) < 0.15
    assert losses["bf16"][1] < losses["bf16"][0] and abs(losses["bf16"][1] - losses["fp32"][1]) < 0.01 * losses["fp32"][1]


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
        g = torch.sigmoid(layer.gate_logit.detach().double()) if gate == "static" else 1.0
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
    assert pick_dtype("float32", torch.device("cpu")) == (torch.float32, "--dtype float32")
    assert pick_dtype("bfloat16", torch.device("cpu")) == (torch.bfloat16, "--dtype bfloat16")
    has = "amx_bf16" in open("/proc/cpuinfo").read().split() or "avx512_bf16" in open("/proc/cpuinfo").read().split()
    dtype, why = pick_dtype("auto", torch.device("cpu"))
    assert (dtype == torch.bfloat16) == has and ("bf16 matrix units" in why)


@pytest.mark.slow
def test_bf16_cloze_loglikelihoods_are_within_a_stated_tolerance_of_fp32(smollm2):
    """SmolLM2 scored in bf16 against fp32 on 20 PIQA test questions (40 choices, sums of 10-60
    token log-probabilities). Stated tolerance: 3 % of each log-likelihood and 0.5 nat on average
    (measured on 100 questions: 0.3 % and 0.20 nat on average, 1.0 nat at most); the answers may
    differ only where the two choices are within that of each other."""
    fp32, _ = smollm2
    bf16 = load_pretrained("smollm2", dtype=torch.bfloat16).eval()
    tok, items = load_tokenizer("smollm2"), list(enumerate(data.load_task("piqa", "test")))[:20]
    scored = [evaluate.evaluate(m, tok, "piqa", items)[1] for m in (fp32, bf16)]
    a, b = (torch.tensor([p["loglikelihoods"] for p in preds]) for preds in scored)  # (20, 2)
    assert ((a - b).abs() <= 0.03 * a.abs()).all() and (a - b).abs().mean() <= 0.5
    for p, q, ll in zip(*scored, a):
        assert p["pred"] == q["pred"] or (ll[0] - ll[1]).abs() <= 0.03 * ll.abs().max()
