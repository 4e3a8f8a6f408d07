"""
GateRA: token-aware gating of parameter-efficient updates (Ou, Jiang, Du, Snoek, AAAI 2026).

A frozen linear layer y = W0 x + b gets a trainable update Delta(x), and a learned sigmoid gate,
one scalar per token, decides how much of it each token receives:

    y = W0 x + b + g(x) * Delta(x),        g(x) = sigmoid(w_g . x + b_g)

The update Delta(x) is one of three adapters (W0 is (out, in), B is (out, r), A is (r, in)):

    LoRA   Delta(x) = s B A x                                 s = alpha / r  (alpha / sqrt(r): rsLoRA)
    DoRA   Delta(x) = (m/n - 1) * W0 x + (m/n) * s B A x      n = ||W0 + s B A||_row, detached
    HiRA   Delta(x) = (W0 * (B A)) x                          Hadamard product: a high-rank update

g = 0 gives exactly the frozen model and g = 1 the ungated adapter. Training adds lambda * H, the
mean binary entropy of the gates, which pushes every gate towards 0 or 1 (see gate_entropy).
The gate also masks gradients: every adapter gradient of a token is multiplied by its g(x),
e.g. for gated LoRA dL/dB = g s delta (A x)^T. test_gatera.py checks these formulas against autograd.

Start reading at AdaptedLinear.forward_plain (the equations as written); the fast paths that
forward_fused uses follow the class; then the whole-model helpers (apply_gatera, gate_entropy,
merge_gatera) and saving / loading adapters.
"""

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

METHODS = ("lora", "dora", "hira")
GATES = ("none", "static", "token")


@dataclass
class GateRAConfig:
    method: str = "hira"            # lora | dora | hira
    rank: int = 32                  # r
    alpha: float = 64.0             # LoRA/DoRA scale s = alpha / r; HiRA has no scale
    dropout: float = 0.0            # on the adapter's input, LoRA/DoRA only (HiRA uses none)
    rslora: bool = False            # s = alpha / sqrt(r) instead of alpha / r
    gate: str = "token"             # none | static (one learnable scalar per layer) | token
    gate_init_std: float = 0.0      # token gate: w_g ~ N(0, std^2) at init
    gate_init_bias: float = 0.0     # gate logit at init: g = sigmoid(bias), 0 -> g = 0.5
    gate_on_dropout: bool = False   # the gate reads dropout(x) instead of x
    gate_detach_input: bool = False  # no gradient flows from the gate back into x
    targets: tuple = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    fused: bool = True              # False: AdaptedLinear.forward_plain, the equations with plain autograd

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = self.targets.split(",")
        self.targets = tuple(t.strip() for t in self.targets if t.strip())
        if self.method not in METHODS:
            raise ValueError(f"GateRAConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.gate not in GATES:
            raise ValueError(f"GateRAConfig.gate must be one of {GATES}, got {self.gate!r}")
        if self.rank < 1:
            raise ValueError(f"GateRAConfig.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GateRAConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.method == "hira" and self.dropout > 0:
            raise ValueError("HiRA uses no dropout (its update is W0 * (BA)); set dropout=0")
        if not self.targets:
            raise ValueError("GateRAConfig.targets is empty: name the linear layers to adapt")

    @property
    def scale(self):
        """s = alpha / r (rsLoRA: alpha / sqrt(r)); HiRA's update carries no scale."""
        if self.method == "hira":
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def row_norm(w):
    """L2 norm of each output row of an (out, in) weight -> (out,), in fp32 (or fp64), floored so
    that a zero row cannot divide by zero (flooring changes no other row, unlike adding an eps)."""
    return w.to(torch.promote_types(w.dtype, torch.float32)).norm(dim=1).clamp_min(1e-6)


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus a gated LoRA / DoRA / HiRA update: y = W0 x + b + g(x) Delta(x).

    Mixed precision, as autocast would do it, but without recasting the frozen weights: the
    adapter and gate parameters (and so their gradients and the optimizer state) are kept in fp32
    (fp64 for an fp64 base, as the tests use), while every matmul runs in the base's dtype. On a
    bf16 base the small (r, in) and (out, r) matrices are cast to bf16 in each forward, the (N, in)
    activations never to fp32, so the update uses the CPU's or GPU's bf16 matrix units. What needs
    fp32 stays fp32: the gate value g = sigmoid(z), the row norms of DoRA and the merged weights.
    """

    def __init__(self, base: nn.Linear, config: GateRAConfig):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.config = config
        out_features, in_features = base.weight.shape
        kw = dict(device=base.weight.device, dtype=torch.promote_types(base.weight.dtype, torch.float32))
        self.lora_A = nn.Parameter(torch.empty(config.rank, in_features, **kw))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank, **kw))  # (out, r): Delta = 0 at init
        if config.method == "dora":
            self.magnitude = nn.Parameter(row_norm(base.weight).to(kw["dtype"]))  # (out,) m = ||W0||_row
        self.dropout = nn.Dropout(config.dropout)
        if config.gate == "token":
            self.gate = nn.Linear(in_features, 1, **kw)  # z = w_g . x + b_g
            nn.init.normal_(self.gate.weight, std=config.gate_init_std)
            nn.init.constant_(self.gate.bias, config.gate_init_bias)
        elif config.gate == "static":
            self.gate = nn.Parameter(torch.tensor(config.gate_init_bias, **kw))  # one logit z
        else:
            self.gate = None
        self.last_gate = None  # g of the last forward, (...) one value per token, for the entropy term
        self.kept_delta_w = None  # HiRA: (key, W0 * BA) kept between forwards without autograd

    def gate_value(self, x, wx=None, x_dropped=None):
        """g(x) = sigmoid(z) -> (..., 1), in the adapter's dtype; records it (shape (...)) in
        self.last_gate. None: no gate. wx (..., 1): w_g . x, when the caller has it already (forward
        gets it from A's matmul); else it is computed here, in x's dtype like every matmul.
        x_dropped: dropout(x) as the adapter sees it, so that with gate_on_dropout the gate reads the
        same dropout mask as the adapter (a fresh one when not given)."""
        cfg = self.config
        if cfg.gate == "none":
            return None
        if cfg.gate == "static":
            g = torch.sigmoid(self.gate).expand(x.shape[:-1]).unsqueeze(-1)  # (..., 1), one value shared
        else:
            if wx is None:
                xg = (self.dropout(x) if x_dropped is None else x_dropped) if cfg.gate_on_dropout else x
                xg = xg.detach() if cfg.gate_detach_input else xg
                wx = F.linear(xg, self.gate.weight.to(x.dtype))          # (..., 1) w_g . x
            g = torch.sigmoid(wx.to(self.lora_A.dtype) + self.gate.bias)  # (..., 1)
        self.last_gate = g.squeeze(-1)
        return g

    def merged_weight(self):
        """W = W0 + g Delta_W for gate none (g = 1) or static; a token gate depends on x and cannot merge.
        LoRA: W0 + g s BA.   DoRA: W0 + g ((m/n - 1) W0 + (m/n) s BA).   HiRA: W0 * (1 + g BA).
        Computed in the adapter's dtype (fp32, or fp64 for an fp64 base) whatever the base's."""
        cfg = self.config
        W0 = self.base.weight.to(self.lora_A.dtype)                      # (out, in)
        BA = self.lora_B @ self.lora_A                                   # (out, in)
        g = torch.sigmoid(self.gate) if cfg.gate == "static" else 1.0
        if cfg.method == "lora":
            return W0 + g * cfg.scale * BA
        if cfg.method == "dora":
            m_over_n = (self.magnitude / row_norm(W0 + cfg.scale * BA).detach())[:, None]  # (out, 1)
            return W0 + g * ((m_over_n - 1) * W0 + m_over_n * cfg.scale * BA)
        return W0 * (1 + g * BA)

    def inference_delta_w(self):
        """HiRA's Delta_W = W0 * BA (out, in) while autograd is off (evaluation, generation), kept
        between forwards so that decoding one token at a time does not rebuild it for every token;
        rebuilt when W0, A or B is replaced or changed in place (an optimizer step, load_adapter),
        which their storage and version counter tell. None (and nothing kept) while training."""
        if torch.is_grad_enabled():
            self.kept_delta_w = None
            return None
        W0, A, B = self.base.weight, self.lora_A, self.lora_B
        key = [(t.data_ptr(), t._version) for t in (W0, A, B)]
        if self.kept_delta_w is None or self.kept_delta_w[0] != key:  # in the base's dtype, as the forward uses it
            self.kept_delta_w = (key, W0 * (B.to(W0.dtype) @ A.to(W0.dtype)))
        return self.kept_delta_w[1]

    def forward(self, x):  # x: (..., in), in the base's dtype
        return self.forward_fused(x) if self.config.fused else self.forward_plain(x)

    def forward_plain(self, x):  # x: (..., in)
        """The papers' equations as written, autograd doing the backward (GateRAConfig(fused=False)):
        y = W0 x + b + g(x) Delta(x). The reference that forward_fused computes faster."""
        cfg, W0, dt = self.config, self.base.weight, self.base.weight.dtype
        A, B = self.lora_A.to(dt), self.lora_B.to(dt)                   # (r, in), (out, r)
        xd = self.dropout(x) if cfg.dropout > 0 else x                  # (..., in) drop(x)
        gate = self.gate_value(x, x_dropped=xd)                          # (..., 1), or None: no gate
        if cfg.method == "lora":
            delta = cfg.scale * F.linear(F.linear(xd, A), B)             # s B A drop(x)
        elif cfg.method == "dora":
            with torch.no_grad():  # n = ||W0 + s B A||_row, a constant for autograd, as DoRA has it
                n = row_norm(W0.to(self.lora_A.dtype) + cfg.scale * self.lora_B @ self.lora_A)  # (out,)
            m_over_n = (self.magnitude / n).to(dt)                       # (out,)
            delta = (m_over_n - 1) * F.linear(x, W0) + m_over_n * cfg.scale * F.linear(F.linear(xd, A), B)
        else:
            delta = F.linear(x, W0 * (B @ A))                            # (W0 * B A) x, high rank
        return self.base(x) + (delta if gate is None else gate.to(dt) * delta)  # (..., out)

    def forward_fused(self, x):  # x: (..., in), in the base's dtype
        """forward_plain's result, with the fast paths below (each saves memory or a pass over the
        data; bench.py's plain-* rows measure them against forward_plain)."""
        cfg, W0, bias = self.config, self.base.weight, self.base.bias
        dt = W0.dtype  # every matmul runs in the base's dtype; the parameters stay in their own (see the class)
        A, B = self.lora_A.to(dt), self.lora_B.to(dt)                   # (r, in), (out, r); no copy when dtypes agree
        if cfg.method != "lora" and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (W0, bias)):
            raise RuntimeError(f"{cfg.method}: the frozen base weight or bias requires grad, but the fused autograd "
                               "Functions of DoRA and HiRA compute no gradient for it (it would stay None); keep "
                               "the base frozen (apply_gatera does), or use GateRAConfig(fused=False)")
        # The fast paths below are derived in the docstrings of add_linear, LowRankTokenGated,
        # HiRAMerged, HiRAGated and DoRAScaledBase; test_gatera.py checks them against the plain
        # formulas and autograd. The tokens are the rows of one (N, in) matrix: each output is then a
        # fresh matrix that a matmul can add into in place (add_linear); in-place ops on views are costly.
        # When a LoRA/DoRA token gate reads the adapter's own input (no dropout, no detach), w_g is one
        # more row of A: one matmul gives A x and the gate's w_g . x, one matmul their input gradient.
        fold = cfg.method != "hira" and cfg.gate == "token" and cfg.dropout == 0 and not cfg.gate_detach_input
        hz = F.linear(x, torch.cat([self.lora_A, self.gate.weight]).to(dt)) if fold else None  # (..., r + 1)
        xd = self.dropout(x) if cfg.dropout > 0 else x                  # (..., in) one mask for adapter and gate
        gate = self.gate_value(x, wx=hz[..., -1:] if fold else None, x_dropped=xd)  # (..., 1) or None
        lead, x, xd = x.shape[:-1], x.reshape(-1, x.shape[-1]), xd.reshape(-1, x.shape[-1])  # (N, in)
        if cfg.gate == "token":  # gate: the g(x) the update is scaled by, (N, 1) or () one for all tokens
            gate = gate.reshape(-1, 1)                                   # (N, 1) one value per token
        else:  # one value for all tokens, so that products with it stay (out,)- or (out, r)-sized
            gate = torch.sigmoid(self.gate) if cfg.gate == "static" else torch.ones((), dtype=self.lora_A.dtype, device=W0.device)
        if cfg.method == "hira":
            if cfg.gate != "token" and dt == self.lora_A.dtype:
                # One matmul with the merged weight W0 * (1 + g BA) instead of two (W0 x and Delta_W x).
                # Only when the base is as precise as the adapter: in bf16, W0 (1 + BA) would round away
                # a small BA, so the update is then added as a separate term.
                out = HiRAMerged.apply(x, W0, bias, gate * B, A)
            else:
                out = HiRAGated.apply(x, gate.to(dt), W0, bias, B, A, self.inference_delta_w())
            return out.view(*lead, -1)
        # g and s are numbers per token, so g s B A x = B (g s A x): they scale the r numbers of A x
        # instead of the `out` numbers of B A x; one value for all tokens scales A (r, in) instead.
        if cfg.gate == "token":
            h = hz[..., :-1].reshape(-1, cfg.rank) if fold else F.linear(xd, A)  # (N, r) A drop(x)
        else:
            h = F.linear(xd, (gate * cfg.scale * self.lora_A).to(dt))      # (N, r) g s A drop(x)
        if cfg.method == "lora":
            out, B_out = self.base(x), B                                 # W0 x + b,  + g s B A drop(x)
        else:
            # DoRA: (1 + g (m/n - 1)) W0 x + b + (m/n) B (g s A x): m/n scales the rows of B (out, r),
            # not the output. n is a constant for autograd, computed in fp32 (a bf16 W0 + sBA would
            # round a small sBA away).
            with torch.no_grad():
                n = row_norm(torch.addmm(W0.to(self.lora_A.dtype), self.lora_B, self.lora_A, alpha=cfg.scale))  # (out,)
            m_over_n = self.magnitude / n                                # (out,)
            out = DoRAScaledBase.apply(x, W0, bias, gate.to(dt), (m_over_n - 1).to(dt))  # (N, out)
            B_out = (m_over_n[:, None] * self.lora_B).to(dt)             # (out, r)
        if cfg.gate == "token":
            out = LowRankTokenGated.apply(out, h, gate.to(dt), B_out, cfg.scale)
        else:
            out = add_linear(out, h, B_out)
        return out.view(*lead, -1)

    def extra_repr(self):
        c = self.config
        return f"method={c.method}, rank={c.rank}, scale={c.scale:g}, gate={c.gate}"


# -----------------------------------------------------------------------------
# the fast paths: each computes one part of AdaptedLinear.forward_plain with less memory or fewer passes

def add_linear(y, h, W):
    """y + h W^T, added into y in place: y must be a fresh (N, out) matrix that nothing else uses.
    The matmul itself adds into y (a GEMM with beta = 1), saving a pass."""
    return y.addmm_(h, W.T)


class LowRankTokenGated(torch.autograd.Function):
    """y + (g s h) B^T: a low-rank update with a token gate g (N, 1) on h = A x (N, r), added into
    the fresh output y (N, out) in place. LoRA's update, and DoRA's with B scaled by m/n.

    Plain autograd would keep both h and g s h for the backward; this keeps h and g.
    With the loss gradient dz (N, out) and e = dz B (N, r):
        dy = dz,   dh = g s e,   dg = s (e . h) per token,   dB = dz^T (g s h).
    Every tensor is in one dtype, the base's."""

    @staticmethod
    def forward(ctx, y, h, g, B, s):
        ctx.save_for_backward(h, g, B)
        ctx.s = s
        ctx.mark_dirty(y)
        return add_linear(y, h * (g * s), B)

    @staticmethod
    def backward(ctx, dz):
        h, g, B = ctx.saved_tensors
        gs = g * ctx.s
        e = dz @ B                                                       # (N, r)
        return dz, e * gs, ctx.s * (e * h).sum(-1, keepdim=True), dz.T @ (h * gs), None


class HiRAMerged(torch.autograd.Function):
    """x (W0 * (1 + B A))^T + b as one matmul: HiRA with one gate value for all tokens, folded into B.

    Plain autograd would keep the merged (out, in) weight of every adapted layer for the backward,
    as much memory as the frozen layer itself; this keeps x, B and A and rebuilds the weight there
    (one rank-r product). With W = W0 + W0 * M, M = B A and the loss gradient dy (N, out):
        dx = dy W,   dW = dy^T x,   dM = W0 * dW,   dB = dM A^T,   dA = B^T dM.
    W0 and the bias are frozen: they get no gradient."""

    @staticmethod
    def forward(ctx, x, W0, bias, B, A):  # x: (N, in)
        ctx.save_for_backward(x, W0, B, A)
        return F.linear(x, torch.addcmul(W0, W0, B @ A), bias)          # (N, out)

    @staticmethod
    def backward(ctx, dy):
        x, W0, B, A = ctx.saved_tensors
        dx = dy @ torch.addcmul(W0, W0, B @ A) if ctx.needs_input_grad[0] else None  # (N, in)
        dM = W0 * (dy.T @ x)                                             # (out, in)
        return dx, None, None, dM @ A.T, B.T @ dM


class HiRAGated(torch.autograd.Function):
    """W0 x + b + g * (Delta_W x), Delta_W = W0 * B A: the frozen layer of x (N, in) and the HiRA update,
    scaled by g: (N, 1), one value per token (a token gate), or one value for all.

    Two matmuls, W0 x and Delta_W x: a token gate cannot be folded into one weight, and in bf16 the
    merged W0 * (1 + g BA) would round a small BA away. Plain autograd would keep Delta_W (out, in)
    and the update Delta_W x (N, out) of every layer for the backward; this keeps x and g and rebuilds
    Delta_W there (one rank-r product). With the loss gradient dz (N, out) and u = dz Delta_W (N, in):
        dx = dz W0 + g u,   dg = u . x (per token; = dz . Delta_W x),
        dDelta_W = dz^T (g x),   dM = W0 * dDelta_W,   dB = dM A^T,   dA = B^T dM.
    W0 and the bias are frozen: they get no gradient. Every tensor is in one dtype, the base's
    (AdaptedLinear casts the adapter to it)."""

    @staticmethod
    def forward(ctx, x, g, W0, bias, B, A, delta_w=None):  # delta_w: W0 * B A, if the caller keeps it
        ctx.save_for_backward(x, g, W0, B, A)
        delta_w = W0 * (B @ A) if delta_w is None else delta_w          # (out, in)
        return torch.addcmul(F.linear(x, W0, bias), g, F.linear(x, delta_w))  # (N, out) W0 x + b + g Delta_W x

    @staticmethod
    def backward(ctx, dz):
        x, g, W0, B, A = ctx.saved_tensors
        dx = dg = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            u = dz @ (W0 * (B @ A))                                      # (N, in)
            dx = (dz @ W0).addcmul_(g, u) if ctx.needs_input_grad[0] else None  # (N, in) dz W0 + g u
            dg = (u * x).sum(-1, keepdim=True).sum_to_size(g.shape) if ctx.needs_input_grad[1] else None
        # dz^T (g x) = (g dz)^T x: the gate scales whichever of x (N, in) and dz (N, out) is smaller
        dM = W0 * (dz.T @ (g * x) if x.shape[1] <= dz.shape[1] else (g * dz).T @ x)  # (out, in)
        return dx, dg, None, None, dM @ A.T, B.T @ dM, None


class DoRAScaledBase(torch.autograd.Function):
    """(1 + g c) * (W0 x) + b: DoRA's frozen term, the base output of x (N, in) rescaled per output
    row by c = m/n - 1 (out,) and by the gate g: (N, 1), one value per token, or one value for all.

    It keeps w = W0 x (N, out), which the gradient of c needs, and never forms W0 x + b as a
    matrix of its own. With the loss gradient dz (N, out) and P = dz * w:
        z = w + (g c) * w + b,   dx = (dz + (g c) * dz) W0,   dc = sum_t g_t P_t,   dg_t = P_t . c.
    (g c) * w is added to w, not w multiplied by 1 + g c: c is small (m/n stays near 1), and in
    bf16 1 + g c would round to 1. With one gate value g c is (out,): z is one pass over (N, out)
    (plus one for the bias), dx = dz (W0 + (g c) * W0) scales the (out, in) weight instead of dz,
    and dc = g sum_t P_t, dg = (sum_t P_t) . c. Every tensor is in the base's dtype."""

    @staticmethod
    def forward(ctx, x, W0, bias, g, c):
        w = F.linear(x, W0)                                              # (N, out) W0 x
        ctx.save_for_backward(w, W0, g, c)
        z = torch.addcmul(w, w, g * c) if g.dim() == 0 else torch.addcmul(w, g, w * c)  # (N, out) w + g c w
        return z if bias is None else z.add_(bias)

    @staticmethod
    def backward(ctx, dz):
        w, W0, g, c = ctx.saved_tensors
        dx = None
        if g.dim() == 0:
            if ctx.needs_input_grad[0]:
                dx = dz @ torch.addcmul(W0, W0, (g * c)[:, None])        # (N, in)
            P = torch.linalg.vecdot(dz, w, dim=0)                        # (out,) sum over tokens of dz * w
            return dx, None, None, P @ c, g * P
        if ctx.needs_input_grad[0]:
            dx = torch.addcmul(dz, g, dz * c) @ W0                       # (N, in) (dz + g c dz) W0
        P = dz * w                                                       # (N, out)
        return dx, None, None, P @ c[:, None], (g.T @ P)[0]


# -----------------------------------------------------------------------------
# whole-model helpers

def adapted_layers(model):
    """(name, AdaptedLinear) for every adapted layer of the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def apply_gatera(model, cfg: GateRAConfig):
    """Freeze every parameter of `model` and wrap each nn.Linear whose attribute name is in
    cfg.targets in an AdaptedLinear. Returns the names of the adapted modules."""
    if adapted_layers(model):
        raise ValueError("apply_gatera: the model already has adapters; build a fresh model to adapt it again")
    model.requires_grad_(False)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n, _ in linears if n.rsplit(".", 1)[-1] in cfg.targets]
    found = {n.rsplit(".", 1)[-1] for n in chosen}
    missing = [t for t in cfg.targets if t not in found]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"apply_gatera: target(s) {missing} match no nn.Linear in the model; "
                         f"linear layers are named {available}")
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, AdaptedLinear(getattr(parent, attr), cfg))
    return chosen


def binary_entropy(g, eps=1e-6):
    """H(g) = -[g log g + (1 - g) log(1 - g)], elementwise, logs clamped away from 0 and 1.
    With g = sigmoid(z): dH/dz = -g (1 - g) z, so H pushes z away from 0 (g towards 0 or 1)."""
    return -(g * torch.log(g.clamp_min(eps)) + (1 - g) * torch.log((1 - g).clamp_min(eps)))


def gate_entropy(model, mask=None):
    """Mean binary entropy of the gates of the last forward, over every gated layer and every real
    token: mask (B, T) is 1 for real tokens, 0 for padding (None: all tokens). 0 without gates."""
    gates = [m.last_gate for _, m in adapted_layers(model) if m.last_gate is not None]
    if not gates:
        return torch.zeros(())
    h = binary_entropy(torch.stack(gates))                               # (L, B, T)
    if mask is None:
        return h.mean()
    mask = mask.to(h.dtype)                                              # (B, T)
    return (h * mask).sum() / (mask.sum().clamp_min(1) * len(gates))


@torch.no_grad()
def merge_gatera(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back, for gate none or
    static. A token gate g(x) differs per token, so no single weight can represent it.

    What "exact" means depends on the base's dtype. The merged weight is computed in fp32 (fp64 for
    an fp64 base) and rounded once to the base's dtype. For an fp32 or fp64 base the merged layer
    equals the adapted one up to that dtype's rounding (1e-12 in fp64 in the tests). A bf16 base
    cannot hold a small update exactly: each merged weight is the nearest bf16 number to the fp32
    one, within 2^-8 of its value, the same rounding that storing any weight in bf16 costs (a small
    update of a weight can round away entirely, where the unmerged layer adds it in its own matmul)."""
    layers = adapted_layers(model)
    for name, layer in layers:
        if layer.config.gate == "token":
            raise ValueError(f"merge_gatera: {name} has a token gate g(x), which scales the update "
                             "differently for every token, so it cannot be folded into one weight matrix; "
                             "keep the adapter (only gate none or static can be merged)")
    for name, layer in layers:
        layer.base.weight.copy_(layer.merged_weight().to(layer.base.weight.dtype))
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer.base)
    return model


# -----------------------------------------------------------------------------
# saving and loading adapters (safetensors + JSON; the base model is never saved)

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


def adapter_state_dict(model):
    """Only the trainable adapter tensors: lora_A, lora_B, magnitude, gate, keyed by module path."""
    return {f"{name}.{k}": v for name, layer in adapted_layers(model)
            for k, v in layer.state_dict().items() if not k.startswith("base.")}


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path: readers never see a half-written file."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """obj as indented JSON at path, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def save_adapter(model, out_dir):
    """Write adapter.safetensors (adapter tensors only) and adapter_config.json to out_dir."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no adapters (call apply_gatera first)")
    os.makedirs(out_dir, exist_ok=True)
    cfg = asdict(layers[0][1].config)
    cfg["targets"] = list(cfg["targets"])
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    atomic_write(os.path.join(out_dir, ADAPTER_WEIGHTS), lambda p: save_file(tensors, p))

    write_json(os.path.join(out_dir, ADAPTER_CONFIG), cfg)


def load_adapter(model, adapter_dir):
    """Load an adapter saved by save_adapter into `model`: adapts a plain model first, checks an
    already adapted one has the same config, and refuses any missing, extra or misshapen tensor
    before copying anything (never a silent partial load). Returns the GateRAConfig."""
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_adapter: {p} not found (an adapter folder holds "
                                    f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, as written by save_adapter)")
    with open(config_path) as f:
        saved = json.load(f)
    known = {f.name for f in fields(GateRAConfig)}
    if set(saved) - known:
        raise ValueError(f"load_adapter: {config_path} has unknown fields {sorted(set(saved) - known)}")
    cfg = GateRAConfig(**saved)
    layers = adapted_layers(model)
    if not layers:
        apply_gatera(model, cfg)
    else:
        have = asdict(layers[0][1].config)
        for k, v in asdict(cfg).items():
            if have[k] != v:
                raise ValueError(f"load_adapter: {config_path} has {k}={v!r} but the model's adapters "
                                 f"have {k}={have[k]!r}; load into a plain (unadapted) model instead")
    tensors = load_file(weights_path)
    expected = adapter_state_dict(model)
    for k, v in expected.items():
        if k not in tensors:
            raise ValueError(f"load_adapter: tensor {k} is missing from {weights_path}: "
                             "the adapter was trained on a different base model")
        if tensors[k].shape != v.shape:
            raise ValueError(f"load_adapter: tensor {k} in {weights_path} has shape {tuple(tensors[k].shape)}, "
                             f"the model expects {tuple(v.shape)}: the adapter was trained on a different base model")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"load_adapter: {weights_path} has tensor {extra[0]} (and {len(extra) - 1} more) "
                         "that the model has no place for: the adapter was trained on a different base model")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    return cfg
