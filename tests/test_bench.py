"""bench.py: the FLOP count of a training step."""

import pytest
import torch
import torch.nn.functional as F

from bench import step_flops
from budget import matmul_flops
from gatera import GateRAConfig, apply_gatera
from model import GPT, GPTConfig
from tests.conftest import GATES, METHODS


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
    counted = matmul_flops(lambda: F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward())
    expected = step_flops(row, config, B, T, r) - config.n_layer * 6 * B * T * T * config.n_embd // 2
    C, H = config.n_embd, config.mlp_hidden
    if row.startswith("hira"):
        expected += config.n_layer * 2 * r * (3 * C * C + 2 * C * H)    # q, k, v: (C, C); up, down: (C, H)
    if row == "dora/token":
        expected += config.n_layer * 4 * B * T * (3 * C + H + C)         # outputs of q, k, v, up, down
    assert counted == expected
