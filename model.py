"""
One decoder-only transformer for two families of pretrained checkpoints, in the style of nanoGPT:

- GPT-2: LayerNorm, GELU (tanh) MLP, learned positions, biases on every linear, tied lm_head.
- Llama (Llama 3.x, SmolLM2, ...): RMSNorm, SwiGLU MLP, rotary positions (RoPE, with Llama 3.x
  "llama3" scaling), grouped-query attention, no biases, tied or untied lm_head. Llama 2's weights
  have the same layout, but its SentencePiece tokenizer is not supported (tokenizer.load_tokenizer says so).

Every projection is a Linear (an nn.Linear whose forward also takes the `gates` dict and ignores it)
named q_proj, k_proj, v_proj, o_proj (attention) or gate_proj, up_proj, down_proj (MLP), and the forward
pass only calls them, so gatera.apply_gatera can wrap them; an adapter with a gate writes its gate value
g into the dict that GPT.forward(..., gates={}) passes down.
checkpoints.load_pretrained reads Hugging Face checkpoints (local directory or Hub id) and llama.cpp .gguf
files into this GPT. Start reading at GPT.forward.
"""

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cli import UserError
from fused import LinearCrossEntropy, RMSNormKeepingInput, SiLUMul


@dataclass
class GPTConfig:
    arch: str = "gpt2"  # "gpt2" or "llama"
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence (GPT-2: number of learned positions)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # key/value heads for grouped-query attention; None: n_head
    n_embd: int = 768
    head_dim: int | None = None  # None: n_embd // n_head
    mlp_hidden: int | None = None  # None: 4 * n_embd
    norm_eps: float = 1e-5
    attn_bias: bool = True  # biases on q/k/v/o_proj
    mlp_bias: bool = True  # biases on gate/up/down_proj
    tie_embeddings: bool = True  # lm_head shares its weight with the token embedding
    rope_theta: float = 10000.0
    # Llama 3.x "llama3" scaling: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    rope_scaling: dict | None = None
    rope_factors: tuple | None = None  # per-frequency divisors: the llama3 scaling as llama.cpp stores it (rope_freqs)

    def __post_init__(self):
        """Refuse values no model can be built from (a config.json damaged or edited by hand: UserError,
        which checkpoints.py re-raises naming the file), then fill in the derived sizes."""
        def whole(v, low):  # an integer >= low (JSON's true is not one)
            return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low

        def positive(v):  # a finite number > 0
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0

        checks = [("arch", self.arch in ("gpt2", "llama"), "'gpt2' or 'llama'"),
                  ("n_layer", whole(self.n_layer, 0), "an integer >= 0")]
        checks += [(f, whole(getattr(self, f), 1), "a positive integer")
                   for f in ("vocab_size", "block_size", "n_head", "n_embd")]
        checks += [(f, getattr(self, f) is None or whole(getattr(self, f), 1), "a positive integer or null")
                   for f in ("n_kv_head", "head_dim", "mlp_hidden")]
        checks += [(f, positive(getattr(self, f)), "a number > 0") for f in ("norm_eps", "rope_theta")]
        checks += [(f, isinstance(getattr(self, f), bool), "true or false")
                   for f in ("attn_bias", "mlp_bias", "tie_embeddings")]
        for name, ok, wanted in checks:
            if not ok:
                raise UserError(f"GPTConfig.{name} must be {wanted}, got {getattr(self, name)!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:  # each key/value head serves n_head / n_kv_head query heads
            raise UserError(f"GPTConfig.n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise UserError(f"GPTConfig.n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.arch == "llama" and self.head_dim % 2:  # RoPE rotates pairs of a head's dimensions
            raise UserError(f"GPTConfig.head_dim {self.head_dim} is odd; rotary positions need it even")
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd


# -----------------------------------------------------------------------------
# building blocks

class Linear(nn.Linear):
    """y = x W^T + b, an nn.Linear that also accepts the `gates` dict and ignores it. Every projection in
    the GPT is one, so an adapter that replaces it (gatera.AdaptedLinear) receives the dict and can write
    its gate value there: the gates travel in the data flow of a forward, not in hidden state."""

    def forward(self, x, gates=None):
        return super().forward(x)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back before the scale (as Llama does);
    fused.RMSNormKeepingInput keeps x, not its fp32 copy, for the backward."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return RMSNormKeepingInput.apply(x, self.weight, self.eps)


def make_norm(config):
    if config.arch == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps)
    return RMSNorm(config.n_embd, config.norm_eps)


def rope_inv_freq(config, device=None):
    """RoPE inverse frequencies theta^(-2i/d), i = 0 .. d/2-1, with Llama 3.x's long-context rescaling:
    wavelengths 2*pi/f longer than original_max/low_freq_factor are stretched by `factor`, shorter than
    original_max/high_freq_factor are kept, and the ones between are interpolated smoothly."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d)  # (d/2,)
    if config.rope_factors is not None:
        return inv_freq / torch.tensor(config.rope_factors, device=device)
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high, old_len = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                                  s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(between, smoothed, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+d/2}) pair by angle pos * f_i (Hugging Face's rotate_half layout)."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of one attention layer for every position processed so far (used by generate).

    Reusing them is exact: attention is causal, so the key and value at a position depend only on the
    tokens up to it and never change when tokens are appended; recomputing them gives the same tensors."""

    def __init__(self):
        self.k = self.v = None

    @property
    def length(self):
        return 0 if self.k is None else self.k.size(2)

    def fork(self):
        """A cache that starts from this one's keys and values: scoring several continuations of one
        prompt extends a fork each, and this cache stays as it is (update makes new tensors)."""
        forked = KVCache()
        forked.k, forked.v = self.k, self.v
        return forked

    def update(self, k, v):
        """Append k, v (B, n_kv_head, T, hd); return all keys and values so far (B, n_kv_head, past + T, hd)."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(hd) + mask) v over n_head heads; k, v have n_kv_head heads, each shared by
    n_head / n_kv_head consecutive query heads (grouped-query attention)."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C, bias = config.n_embd, config.attn_bias
        self.q_proj = Linear(C, self.n_head * self.head_dim, bias=bias)
        self.k_proj = Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_head * self.head_dim, C, bias=bias)

    def forward(self, x, rope, attn_mask, cache=None, gates=None):
        B, T, _ = x.shape
        q = self.q_proj(x, gates).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x, gates).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x, gates).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, past + T, hd)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
            # PyTorch's CPU attention backward runs 2-3x slower in bf16 than in fp32 (measured on 2 cores, one
            # layer of SmolLM2, 16 x 48 tokens: 14.5 ms forward and backward in bf16, 4.7 ms in fp32)
            q, k, v = q.float(), k.float(), v.float()
        # enable_gqa: each k, v head serves n_head / n_kv_head query heads, without copying it that many times
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=self.n_kv_head < self.n_head).to(x.dtype)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hd)
        return self.o_proj(y, gates)


class MLP(nn.Module):
    """GPT-2: down(gelu_tanh(up(x))).  Llama (SwiGLU): down(silu(gate(x)) * up(x)), the product by
    fused.SiLUMul, which keeps two (N, hidden) tensors for the backward where autograd keeps three."""

    def __init__(self, config):
        super().__init__()
        C, H, bias = config.n_embd, config.mlp_hidden, config.mlp_bias
        self.swiglu = config.arch == "llama"
        if self.swiglu:
            self.gate_proj = Linear(C, H, bias=bias)
        self.up_proj = Linear(C, H, bias=bias)
        self.down_proj = Linear(H, C, bias=bias)

    def forward(self, x, gates=None):
        if self.swiglu:
            return self.down_proj(SiLUMul.apply(self.gate_proj(x, gates), self.up_proj(x, gates)), gates)
        return self.down_proj(F.gelu(self.up_proj(x, gates), approximate="tanh"), gates)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, attn_mask, cache=None, gates=None):
        x = x + self.attn(self.ln_1(x), rope, attn_mask, cache, gates)
        return x + self.mlp(self.ln_2(x), gates)


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    """Token embedding (+ learned positions for GPT-2), n_layer Blocks, a final norm, the lm_head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute each block in backward instead of storing activations
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=make_norm(config),
        ))
        if config.arch == "gpt2":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, mask=None, cache=None, logits_at=None, gates=None, targets=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size) at every position.

        mask (B, past + T): 1 for real tokens, 0 for padding (Hugging Face's attention_mask). With LEFT
        padding every row computes what it would alone: positions count real tokens only
        (pos = cumsum(mask) - 1) and no query attends to a padded key.
        cache: one KVCache per layer holding the `past` earlier positions (see generate).
        logits_at: only these positions get logits, because the lm_head over a large vocabulary is the
        biggest matmul and training needs logits only where a target is: a bool (B, T) mask -> (N, vocab_size)
        in row-major order, or an index along T (e.g. -1 -> (B, vocab_size)).
        gates: a dict to collect, for this forward, each gated adapter's gate value g (B, T) under its
        module name (gatera.AdaptedLinear writes it; gatera.gate_entropy and gates.GateRecorder read it).
        targets: the next token at each of logits_at's positions (N,): returns the sum of their cross-entropies
        instead of the logits; through a frozen lm_head by fused.LinearCrossEntropy, which never keeps the
        (N, vocab_size) logits (the largest tensors of a training step)."""
        B, T = idx.shape
        past = cache[0].length if cache else 0
        if mask is None and past == 0:
            pos = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
            attn_mask = None  # plain causal attention
        else:
            if mask is None:
                mask = torch.ones(B, past + T, dtype=torch.bool, device=idx.device)
            if mask.shape != (B, past + T):
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (batch, past + new tokens) = "
                                 f"{(B, past + T)}")
            mask = mask.bool()
            pos = (mask.cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
            q_at = torch.arange(past, past + T, device=idx.device)[:, None]  # (T, 1) index of each query
            k_at = torch.arange(past + T, device=idx.device)  # (Tk,) index of each key
            attn_mask = (k_at <= q_at) & mask[:, None, :]  # (B, T, Tk): causal, real keys only
            # a padding query also sees itself: no softmax row is fully masked (NaN in older PyTorch)
            attn_mask = (attn_mask | (k_at == q_at))[:, None]  # (B, 1, T, Tk), broadcast over heads
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.arch == "gpt2":
            if past + T > self.config.block_size:
                raise ValueError(f"{past + T} positions exceed GPT-2's block_size {self.config.block_size}")
            x = x + self.transformer.wpe(pos)  # (B, T, C)
        else:
            angles = pos[..., None].float() * rope_inv_freq(self.config, idx.device)  # (B, T, hd/2)
            angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hd)
            rope = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i, block in enumerate(self.transformer.h):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recomputing a block in backward writes its gates into the dict again: the same values
                x = checkpoint(block, x, rope, attn_mask, None, gates, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, cache[i] if cache else None, gates)
        if logits_at is not None:
            is_mask = isinstance(logits_at, torch.Tensor) and logits_at.dtype == torch.bool
            x = x[logits_at] if is_mask else x[:, logits_at]  # (N, C) or (B, C)
        x = self.transformer.ln_f(x)
        head = self.lm_head
        if targets is None:
            return head(x, gates)  # (B, T, vocab_size), or the positions asked for
        if type(head) is Linear and head.bias is None and not head.weight.requires_grad:  # frozen: no dW needed
            return LinearCrossEntropy.apply(x, head.weight, targets)
        return F.cross_entropy(head(x, gates).float(), targets, reduction="sum")  # an adapted or trained head

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, mask=None, eos_id=None, on_step=None):
        """Continue idx (B, T) -> (B, T + n) token ids, n <= max_new_tokens.

        Greedy (argmax) when temperature == 0, else samples from softmax(logits / temperature) over the
        top_k most likely tokens (all when None; seed with torch.manual_seed). mask (B, T) marks left
        padding as in forward. Rows that emitted eos_id keep emitting it; generation stops early once
        every row has. The first step feeds the whole prompt, each later step only the newest token:
        the KV cache supplies the keys and values of all earlier positions.
        on_step(fed, real, nxt, gates), if given, is called after every step: fed (B, t) the ids that
        step's forward read, real (B, t) which of them are real tokens (not padding, not after an EOS),
        nxt (B,) the tokens chosen, gates the dict that step's forward filled (a fresh one per step:
        module name -> g (B, t), the gate values of GateRA's layers, which belong to the fed tokens).
        A caller can stream the text, or record the gates."""
        B = idx.size(0)
        mask = torch.ones_like(idx) if mask is None else mask
        cache = [KVCache() for _ in self.transformer.h]
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        new, real = idx, mask.bool()
        for _ in range(max_new_tokens):
            gates = {} if on_step is not None else None  # filled by this step's forward
            logits = self(new, mask=mask, cache=cache, logits_at=-1, gates=gates).float()  # (B, vocab_size)
            if temperature == 0:
                nxt = logits.argmax(dim=-1)  # (B,)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)[:, 0]  # (B,)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
            if on_step is not None:
                on_step(new, real, nxt, gates)
            real = ~done[:, None]  # (B, 1): nxt is a real token unless its row had ended before it
            if eos_id is not None:
                done |= nxt == eos_id
            new = nxt[:, None]  # (B, 1)
            idx = torch.cat([idx, new], dim=1)
            mask = torch.cat([mask, torch.ones_like(new, dtype=mask.dtype)], dim=1)
            if done.all():
                break
        return idx
