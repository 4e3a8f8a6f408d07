"""
GateRA: token-aware modulation for parameter-efficient fine-tuning.
Ou, Jiang, Du, Snoek, AAAI 2026, https://arxiv.org/abs/2511.17582

A frozen linear layer y = W0 x + b gets a trainable update Delta(x), and a learned sigmoid gate,
one scalar per token, decides how much of it each token receives:

    y = W0 x + b + g(x) * Delta(x),        g(x) = sigmoid(w_g . x + b_g)

The update Delta(x) is one of three adapters (W0 is (out, in), B is (out, r), A is (r, in)):

    LoRA   Delta(x) = s B A x                                 s = alpha / r  (alpha / sqrt(r): rsLoRA)
    DoRA   Delta(x) = (m/n - 1) * W0 x + (m/n) * s B A x      n = ||W0 + s B A||_row, detached
    HiRA   Delta(x) = (W0 * (B A)) x                          Hadamard product: a high-rank update

g = 0 gives exactly the frozen model and g = 1 the ungated adapter. Training adds lambda * H, the
mean binary entropy of the gates, which pushes every gate towards 0 or 1 (gate_entropy).
The gate also masks gradients (the paper's theorem): every adapter gradient of a token is multiplied by
its g(x), e.g. for gated LoRA dL/dB = g s delta (A x)^T. test_gatera.py checks this against autograd.

Read GateRAConfig, AdaptedLinear.forward_plain (the equations), forward_fused (the same numbers via
fused.py), then apply_gatera, gate_entropy, merge_gatera. checkpoints.py saves and loads adapters.
"""

import argparse
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import FINITE, NONNEGATIVE, POSITIVE_INT, UserError, number, text
from fused import DoRAScaledBase, HiRAGated, HiRAMerged, LowRankTokenGated, add_linear

METHODS = ("lora", "dora", "hira")
GATES = ("none", "static", "token")


def option(default, help):
    """A config field with the help text of its command-line flag (config_flags)."""
    return field(default=default, metadata={"help": help})


@dataclass
class GateRAConfig:
    method: str = option("hira", "the adapter: lora | dora | hira")
    rank: int = option(32, "r, the rank of B A")
    alpha: float = option(64.0, "LoRA/DoRA scale s = alpha / r (HiRA has no scale)")
    dropout: float = option(None, "dropout on the adapter's input (default 0.05 LoRA/DoRA, 0 HiRA)")
    rslora: bool = option(False, "scale s = alpha / sqrt(r) instead of alpha / r")
    gate: str = option("token", "none | static (one learned scalar per layer) | token (g(x) per token)")
    gate_init_std: float = option(0.0, "token gate: w_g ~ N(0, std^2) at init")
    gate_init_bias: float = option(0.0, "the gate's logit at init: g = sigmoid(bias); 0 gives g = 0.5")
    gate_on_dropout: bool = option(False, "the gate reads dropout(x), the adapter's input, instead of x")
    gate_detach_input: bool = option(False, "no gradient flows from the gate back into x")
    target_modules: tuple = option(("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
                                   "names of the linear layers to adapt (comma-separated)")
    fused: bool = option(True, "fused.py's fast paths; --no-fused: forward_plain with plain autograd")

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = self.target_modules.split(",")
        self.target_modules = tuple(t.strip() for t in self.target_modules if t.strip())
        if self.dropout is None:  # the papers' settings: 0.05 for LoRA and DoRA, none for HiRA
            self.dropout = 0.0 if self.method == "hira" else 0.05
        for ok, message in [
                (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
                (self.gate in GATES, f"gate must be one of {GATES}, got {self.gate!r}"),
                (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
                (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
                (self.method != "hira" or self.dropout == 0, "HiRA uses no dropout (its update is W0 * (BA)); "
                 "set dropout=0 (--dropout 0)"),
                (math.isfinite(self.gate_init_std) and self.gate_init_std >= 0,
                 f"gate_init_std must be a finite number >= 0, got {self.gate_init_std}"),
                (math.isfinite(self.gate_init_bias), f"gate_init_bias must be finite, got {self.gate_init_bias}"),
                (bool(self.target_modules), "target_modules is empty: name the linear layers to adapt")]:
            if not ok:
                raise UserError(f"GateRAConfig: {message}")

    @property
    def scale(self):
        """s = alpha / r (rsLoRA: alpha / sqrt(r)); HiRA's update carries no scale."""
        if self.method == "hira":
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def config_flags(parser):
    """Add one command-line flag per GateRAConfig field (--method, --rank, ..., --fused/--no-fused),
    with the field's default and help: the adapter's settings are written down once, in the config.
    A number is checked as argparse parses it (cli's types), so a bad one fails at once, naming the flag."""
    checked = {"rank": POSITIVE_INT, "alpha": FINITE, "dropout": number(float, 0, 1, high_open=True),
               "gate_init_std": NONNEGATIVE, "gate_init_bias": FINITE}
    for f in fields(GateRAConfig):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        elif f.type is tuple:
            parser.add_argument(flag, type=text, default=",".join(f.default), help=help)
        else:
            choices = {"method": METHODS, "gate": GATES}.get(f.name)
            parser.add_argument(flag, type=checked.get(f.name, f.type), default=f.default, choices=choices, help=help)


def config_from_args(args):
    """The GateRAConfig that config_flags' flags describe (it refuses a combination such as HiRA with dropout)."""
    return GateRAConfig(**{f.name: getattr(args, f.name) for f in fields(GateRAConfig)})


def row_norm(w):
    """L2 norm of each output row of an (out, in) weight -> (out,), in fp32 (or fp64), floored so
    that a zero row cannot divide by zero (flooring changes no other row, unlike adding an eps)."""
    return w.to(torch.promote_types(w.dtype, torch.float32)).norm(dim=1).clamp_min(1e-6)


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus a gated LoRA / DoRA / HiRA update: y = W0 x + b + g(x) Delta(x).
    Mixed precision as autocast, without recasting the frozen weights: the adapter, its gradients and
    the optimizer state are fp32 (fp64 on an fp64 base), every matmul runs in the base's dtype (bf16
    matrix units on a bf16 base); g = sigmoid(z), DoRA's row norms and merged weights stay fp32."""

    def __init__(self, base: nn.Linear, config: GateRAConfig, name: str = ""):
        super().__init__()
        self.base, self.config, self.name = base.requires_grad_(False), config, name  # name: key in `gates`
        out_features, in_features = base.weight.shape
        kw = dict(device=base.weight.device, dtype=torch.promote_types(base.weight.dtype, torch.float32))
        self.lora_A = nn.Parameter(torch.empty(config.rank, in_features, **kw))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank, **kw))  # (out, r): Delta = 0 at init
        if config.method == "dora":
            self.magnitude = nn.Parameter(row_norm(base.weight).to(kw["dtype"]))  # (out,) m = ||W0||_row
        self.dropout = nn.Dropout(config.dropout)
        self.gate_logit = None  # gives z, the gate's logit: g = sigmoid(z)
        if config.gate == "token":
            self.gate_logit = nn.Linear(in_features, 1, **kw)  # z = w_g . x + b_g
            nn.init.normal_(self.gate_logit.weight, std=config.gate_init_std)
            nn.init.constant_(self.gate_logit.bias, config.gate_init_bias)
        elif config.gate == "static":
            self.gate_logit = nn.Parameter(torch.tensor(config.gate_init_bias, **kw))  # one z for every token
        self.kept_delta_w = None  # HiRA's W0 * BA, kept for decoding (inference_delta_w)

    def gate_value(self, x, wx=None):
        """g = sigmoid(z) -> (..., 1) in the adapter's dtype, or None without a gate. x (..., in) is what
        the gate reads (x, or dropout(x) with gate_on_dropout). wx (..., 1): w_g . x when the caller
        has computed it already (forward_fused gets it from A's matmul)."""
        cfg = self.config
        if cfg.gate == "none":
            return None
        if cfg.gate == "static":
            return torch.sigmoid(self.gate_logit).expand(*x.shape[:-1], 1)  # (..., 1), one value for all
        if wx is None:
            x = x.detach() if cfg.gate_detach_input else x
            wx = F.linear(x, self.gate_logit.weight.to(x.dtype))                # (..., 1) w_g . x, in x's dtype
        return torch.sigmoid(wx.to(self.lora_A.dtype) + self.gate_logit.bias)  # (..., 1) sigmoid(w_g . x + b_g)

    def forward(self, x, gates=None):  # x: (..., in), in the base's dtype
        """y (..., out). gates: a dict that receives this layer's g(x) (...) under its name, for the
        entropy term and the gate recorder (the model's forward passes the same dict to every layer)."""
        y, g = self.forward_fused(x) if self.config.fused else self.forward_plain(x)
        if gates is not None and g is not None:
            gates[self.name] = g.squeeze(-1)  # (...) one value per token
        return y

    def forward_plain(self, x):  # x: (..., in)
        """The papers' equations as written, autograd doing the backward: y = W0 x + b + g(x) Delta(x).
        Returns (y, g). The reference that forward_fused computes faster."""
        cfg, W0, dtype = self.config, self.base.weight, self.base.weight.dtype
        A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)             # (r, in), (out, r)
        xd = self.dropout(x) if cfg.dropout > 0 else x                  # (..., in) drop(x)
        g = self.gate_value(xd if cfg.gate_on_dropout else x)           # (..., 1), or None: no gate
        if cfg.method == "lora":
            delta = cfg.scale * F.linear(F.linear(xd, A), B)             # s B A drop(x)
        elif cfg.method == "dora":
            with torch.no_grad():  # n = ||W0 + s B A||_row, a constant for autograd, as DoRA has it
                n = row_norm(W0.to(self.lora_A.dtype) + cfg.scale * self.lora_B @ self.lora_A)  # (out,)
            m_over_n = (self.magnitude / n).to(dtype)                    # (out,)
            delta = (m_over_n - 1) * F.linear(x, W0) + m_over_n * cfg.scale * F.linear(F.linear(xd, A), B)
        else:
            delta = F.linear(x, W0 * (B @ A))                            # (W0 * B A) x, high rank
        return self.base(x) + (delta if g is None else g.to(dtype) * delta), g  # (..., out)

    def forward_fused(self, x):  # x: (..., in), in the base's dtype
        """forward_plain's (y, g) through fused.py's Functions, which save memory or passes over the
        data (bench.py's plain-* rows measure them; test_gatera.py holds them equal in every gradient)."""
        cfg, W0 = self.config, self.base.weight
        if cfg.method != "lora" and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (W0, self.base.bias)):
            raise RuntimeError(f"{cfg.method}: the frozen base weight or bias requires grad, but the fused Functions "
                               "compute no gradient for it; keep the base frozen (apply_gatera does), or fused=False")
        # A LoRA/DoRA token gate that reads the adapter's own input (no dropout, no detach) is one more
        # row of A: one matmul gives A x and w_g . x, and one matmul their input gradient.
        fold = cfg.method != "hira" and cfg.gate == "token" and cfg.dropout == 0 and not cfg.gate_detach_input
        hz = F.linear(x, torch.cat([self.lora_A, self.gate_logit.weight]).to(W0.dtype)) if fold else None
        xd = self.dropout(x) if cfg.dropout > 0 else x                  # (..., in) one mask for adapter and gate
        g = self.gate_value(xd if cfg.gate_on_dropout else x, wx=hz[..., -1:] if fold else None)  # (..., 1)
        lead, x, xd = x.shape[:-1], x.reshape(-1, x.shape[-1]), xd.reshape(-1, x.shape[-1])  # (N, in)
        if cfg.gate == "token":
            g_n = g.reshape(-1, 1)                                       # (N, 1) one value per token
        else:  # one value () for all tokens, so that products with it stay (out,)- or (out, r)-sized
            g_n = torch.sigmoid(self.gate_logit) if cfg.gate == "static" else self.lora_A.new_ones(())
        if cfg.method == "hira":
            y = self.hira_fused(x, g_n)
        else:
            y = self.low_rank_fused(x, xd, g_n, hz[..., :-1].reshape(-1, cfg.rank) if fold else None)
        return y.view(*lead, -1), g

    def hira_fused(self, x, g):  # x: (N, in); g: (N, 1) one value per token, or () one for all
        """W0 x + b + g (W0 * B A) x."""
        W0, dtype = self.base.weight, self.base.weight.dtype
        A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)
        if self.config.gate != "token" and dtype == self.lora_A.dtype:
            # One matmul with the merged weight W0 * (1 + g BA) instead of two. Only when the base is
            # as precise as the adapter: in bf16, W0 (1 + BA) would round a small BA away.
            return HiRAMerged.apply(x, W0, self.base.bias, (g * self.lora_B).to(dtype), A)
        return HiRAGated.apply(x, g.to(dtype), W0, self.base.bias, B, A, self.inference_delta_w())

    def low_rank_fused(self, x, xd, g, h=None):  # x, xd: (N, in); g: (N, 1) or (); h: (N, r) A x or None
        """LoRA: W0 x + b + g s B A drop(x).  DoRA: (1 + g (m/n - 1)) W0 x + b + (m/n) B (g s A drop(x)).
        g and s are numbers per token, so they scale the r numbers of A x instead of the out numbers of
        B A x; one value for all tokens scales A (r, in) itself."""
        cfg, W0, dtype = self.config, self.base.weight, self.base.weight.dtype
        if cfg.gate == "token":
            h = F.linear(xd, self.lora_A.to(dtype)) if h is None else h  # (N, r) A drop(x)
        else:
            h = F.linear(xd, (g * cfg.scale * self.lora_A).to(dtype))   # (N, r) g s A drop(x)
        if cfg.method == "lora":
            y, B = self.base(x), self.lora_B.to(dtype)                   # W0 x + b; B (out, r)
        else:
            # m/n scales the rows of B, not the output; n is a constant for autograd, computed in fp32
            # (a bf16 W0 + sBA would round a small sBA away)
            with torch.no_grad():
                n = row_norm(torch.addmm(W0.to(self.lora_A.dtype), self.lora_B, self.lora_A, alpha=cfg.scale))
            m_over_n = self.magnitude / n                                # (out,)
            y = DoRAScaledBase.apply(x, W0, self.base.bias, g.to(dtype), (m_over_n - 1).to(dtype))  # (N, out)
            B = (m_over_n[:, None] * self.lora_B).to(dtype)              # (out, r)
        if cfg.gate == "token":
            return LowRankTokenGated.apply(y, h, g.to(dtype), B, cfg.scale)
        return add_linear(y, h, B)

    def inference_delta_w(self):
        """HiRA's Delta_W = W0 * BA (out, in) while autograd is off, kept between forwards so that decoding
        a token at a time does not rebuild it; rebuilt when W0, A or B is replaced or changed in place
        (their storage and torch's _version counter tell). None, nothing kept, while training."""
        if torch.is_grad_enabled():
            self.kept_delta_w = None
            return None
        W0, A, B = self.base.weight, self.lora_A, self.lora_B
        key = [(t.data_ptr(), t._version) for t in (W0, A, B)]
        if self.kept_delta_w is None or self.kept_delta_w[0] != key:  # in the base's dtype, as the forward uses it
            self.kept_delta_w = (key, W0 * (B.to(W0.dtype) @ A.to(W0.dtype)))
        return self.kept_delta_w[1]

    def merged_weight(self):
        """W = W0 + g Delta_W for gate none (g = 1) or static; a token gate depends on x and cannot merge.
        LoRA: W0 + g s BA.   DoRA: W0 + g ((m/n - 1) W0 + (m/n) s BA).   HiRA: W0 * (1 + g BA).
        Computed in the adapter's dtype (fp32, or fp64 for an fp64 base) whatever the base's."""
        cfg = self.config
        W0 = self.base.weight.to(self.lora_A.dtype)                      # (out, in)
        BA = self.lora_B @ self.lora_A                                   # (out, in)
        g = torch.sigmoid(self.gate_logit) if cfg.gate == "static" else 1.0
        if cfg.method == "lora":
            return W0 + g * cfg.scale * BA
        if cfg.method == "dora":
            m_over_n = (self.magnitude / row_norm(W0 + cfg.scale * BA).detach())[:, None]  # (out, 1)
            return W0 + g * ((m_over_n - 1) * W0 + m_over_n * cfg.scale * BA)
        return W0 * (1 + g * BA)

    def extra_repr(self):
        c = self.config
        return f"method={c.method}, rank={c.rank}, scale={c.scale:g}, gate={c.gate}"


# -----------------------------------------------------------------------------
# whole-model helpers

def adapted_layers(model):
    """(name, AdaptedLinear) for every adapted layer of the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def target_layers(model, target_modules):
    """The names of the nn.Linear layers of `model` whose attribute name is in target_modules; a name
    that matches none is an error that lists the names there are."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linears if n.rsplit(".", 1)[-1] in target_modules]
    missing = [t for t in target_modules if t not in {n.rsplit(".", 1)[-1] for n in chosen}]
    if missing:
        raise UserError(f"target module(s) {missing} match no nn.Linear in the model (--target-modules); "
                        f"its linear layers are named {sorted({n.rsplit('.', 1)[-1] for n in linears})}")
    return chosen


def apply_gatera(model, cfg: GateRAConfig):
    """Freeze every parameter of `model` and wrap each nn.Linear whose attribute name is in
    cfg.target_modules in an AdaptedLinear. Returns the names of the adapted modules."""
    if adapted_layers(model):
        raise ValueError("apply_gatera: the model already has adapters; build a fresh model to adapt it again")
    chosen = target_layers(model, cfg.target_modules)
    model.requires_grad_(False)
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, AdaptedLinear(getattr(parent, attr), cfg, name))
    return chosen


def binary_entropy(g, eps=1e-6):
    """H(g) = -[g log g + (1 - g) log(1 - g)], elementwise, logs clamped away from 0 and 1.
    With g = sigmoid(z): dH/dz = -g (1 - g) z, so H pushes z away from 0 (g towards 0 or 1)."""
    return -(g * torch.log(g.clamp_min(eps)) + (1 - g) * torch.log((1 - g).clamp_min(eps)))


def gate_entropy(gates, mask=None):
    """H: the mean binary entropy of the gate values of one forward, over every gated layer and every
    real token. gates: the dict {layer name: g (B, T)} that the forward filled (model(..., gates=gates));
    mask (B, T) is 1 for real tokens, 0 for padding (None: all tokens). 0 without gates."""
    if not gates:
        return torch.zeros(())
    h = binary_entropy(torch.stack(list(gates.values())))               # (L, B, T)
    if mask is None:
        return h.mean()
    mask = mask.to(h.dtype)                                              # (B, T)
    return (h * mask).sum() / (mask.sum().clamp_min(1) * len(gates))


def refuse_token_gate(cfg, what):
    """The one refusal of a token gate, for merging and for export: g(x) differs per token, so no
    single weight holds the update, and PEFT's layers have no gate to carry it."""
    if cfg.gate == "token":
        raise UserError(f"{what}: the adapter has a token gate g(x) = sigmoid(w_g . x + b_g), which scales the "
                        "update differently for every token, so no single weight matrix holds it and PEFT cannot "
                        "express it (its LoRA, DoRA and HiRA layers have no gate); keep the adapter as it is: only "
                        "gate none or static can be merged or exported")


@torch.no_grad()
def merge_gatera(model):
    """Fold every adapter (gate none or static) into its base weight and put the plain layer back. The
    merged weight is computed in fp32 (fp64 on an fp64 base) and rounded once to the base's dtype:
    exact up to that rounding; in bf16 within 2^-8 of each weight, so a small update can round away."""
    layers = adapted_layers(model)
    for _, layer in layers:
        refuse_token_gate(layer.config, "merge_gatera")
    for name, layer in layers:
        layer.base.weight.copy_(layer.merged_weight().to(layer.base.weight.dtype))
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer.base)
    return model
