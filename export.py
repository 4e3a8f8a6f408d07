"""
An extra: adapters into the Hugging Face ecosystem, as PEFT-format adapters and merged checkpoints.

    python export.py --adapter out/adapter --peft out/peft         # PEFT's layout, for PeftModel
    python export.py --adapter out/adapter --merged out/merged     # one Hugging Face model folder
    python export.py --adapter out/adapter --model path/to/llama --peft out/peft   # another base

The base (--model, as train.py's) is loaded in fp32, the adapter put on it, and each merged weight is
computed in fp32. Only gate none or static can leave: a token gate g(x) is refused, saying why.
In Python, three ways out of (and one into) this repository's GPT:

    export_peft(model, out_dir, base)   the adapter in Hugging Face PEFT's on-disk layout
                                        (adapter_config.json + adapter_model.safetensors), which
                                        PeftModel.from_pretrained loads onto the transformers model
    import_peft(model, peft_dir)        the reverse: a PEFT LoRA, DoRA or HiRA adapter onto our GPT
    merge_to_hf(model, out_dir, source) the merged model as a Hugging Face checkpoint folder
                                        (config.json + model.safetensors) for AutoModelForCausalLM

PEFT (checked against peft 0.21.2) computes the same three updates as gatera.py: LoRA (Hu et al.,
ICLR 2022), DoRA (Liu et al., ICML 2024), HiRA (Huang et al., ICLR 2025); W0 is (out, in), B (out, r),
A (r, in):

    LoRA   y = W0 x + b + s B A x                                 s = lora_alpha / r  (rsLoRA: / sqrt(r))
    DoRA   y = W0 x + b + (m/n - 1) W0 x + (m/n) s B A x          n = ||W0 + s B A||_row  (use_dora)
    HiRA   y = W0 x + b + (W0 * B A) x                            no scale  (peft_type HIRA)

but has no gate. A static gate g = sigmoid(z), one number per layer, folds into the tensors (see
ungated); a token gate g(x) cannot be expressed in PEFT's format, so export_peft refuses it.

Names: PEFT keys a tensor by the module path in the transformers model, prefixed by "base_model.model."
(e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight for Llama). GPT-2 fuses q, k and
v into one Conv1D c_attn (W stored as (in, out)); our model splits it, so an adapter on our q/k/v_proj
is exported as one c_attn adapter: A stacks the parts' A, B is block-diagonal (rank r per part), which
gives each part of c_attn's output exactly its own update (see fuse).
"""

import argparse
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from checkpoints import (GPT2_NAMES, HUB_NAMES, LLAMA_NAMES, check_adapter, checkpoint_files, config_from_hf,
                         load_adapter, load_pretrained)
from cli import Parser, UserError, run, text, writable_folder
from files import atomic_write
from gatera import GateRAConfig, adapted_layers, apply_gatera, refuse_token_gate, row_norm

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps the transformers model as base_model.model
FUSED = ("q_proj", "k_proj", "v_proj")  # GPT-2's c_attn: these three, in this order along its output
# what a Hugging Face model folder holds besides its weights and config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


# -----------------------------------------------------------------------------
# names: ours <-> Hugging Face transformers' (the inverse of checkpoints.hf_to_ours's renaming)

def hf_name(name, arch):
    """Our module or parameter name -> transformers' (GPT-2's q/k/v_proj -> the fused c_attn)."""
    name = name + "."
    if arch == "gpt2":
        for hf, ours in GPT2_NAMES.items():
            name = name.replace(f".{ours}.", f".{hf}.")
        name = re.sub(r"\.attn\.[qkv]_proj\.", ".attn.c_attn.", name)
    else:
        for hf, ours in LLAMA_NAMES:
            name = name.replace(ours, hf)
    return name[:-1]


def our_modules(module, arch):
    """A transformers module name -> our module name(s): three for GPT-2's c_attn (q, k, v), else one."""
    if arch == "gpt2" and module.endswith(".attn.c_attn"):
        return [module.removesuffix("c_attn") + p for p in FUSED]
    name = module + "."
    if arch == "gpt2":
        for hf, ours in GPT2_NAMES.items():
            name = name.replace(f".{hf}.", f".{ours}.")
    else:
        for hf, ours in LLAMA_NAMES:
            name = name.replace(hf, ours)
    return [name[:-1]]


# -----------------------------------------------------------------------------
# PEFT adapters out

@torch.no_grad()
def ungated(name, layer):
    """(A, B, m) of the ungated adapter that gives this layer's output (gate none or static), in the
    adapter's dtype (fp32; fp64 for an fp64 base); m is DoRA's magnitude, None otherwise.

    A static gate g = sigmoid(z) is one number, so it moves into B:
        LoRA   g s B A = s (g B) A                   HiRA   W0 * (g B A) = W0 * ((g B) A)
        DoRA   W0 + g ((m/n - 1) W0 + (m/n) s B A) = c W0 + g (m/n) s B A,   c = 1 + g (m/n - 1) per row
               = c (W0 + s B' A)  with  B' = (g (m/n) / c) B  (each row of B scaled),
    which is again a DoRA: with m' = c ||W0 + s B' A||_row its m'/n' is c. c lies between 1 and m/n, so it
    is positive unless a magnitude went negative; a row with c <= 0 is refused."""
    cfg = layer.config
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    m = layer.magnitude.detach() if cfg.method == "dora" else None
    if cfg.gate == "none":
        return A, B, m
    g = torch.sigmoid(layer.gate_logit.detach())
    if cfg.method != "dora":
        return A, g * B, None
    W0 = layer.base.weight.to(A.dtype)                                   # (out, in)
    m_over_n = m / row_norm(W0 + cfg.scale * B @ A)                      # (out,)
    c = 1 + g * (m_over_n - 1)                                           # (out,)
    if (c <= 0).any():
        row = int((c <= 0).nonzero()[0])
        raise ValueError(f"export_peft: {name} row {row}: with the static gate g = {g.item():.4g} and m/n = "
                         f"{m_over_n[row].item():.4g} the layer scales W0 by 1 + g (m/n - 1) = {c[row].item():.4g} "
                         "<= 0, which no DoRA W = m/n (W0 + s B A) with n > 0 expresses; keep our format "
                         "(save_adapter)")
    B = (g * m_over_n / c)[:, None] * B                                  # (out, r)
    return A, B, c * row_norm(W0 + cfg.scale * B @ A)


def fuse(parts, W0s):
    """One c_attn adapter from GPT-2's q, k, v parts: parts[i] is (A_i, B_i, m_i), or None for a part
    without an adapter; W0s[i] its frozen weight (out_i, in).

    A = [A_q; A_k; A_v] (sum r_i, in) and B = blockdiag(B_q, B_k, B_v) (sum out_i, sum r_i), so that
    B A = [B_q A_q; B_k A_k; B_v A_v]: each part's rows get exactly its own update. A part without an
    adapter gets zero rows of B and, for DoRA, the magnitude ||W0_i||_row, for which m/n = 1: no change."""
    adapted = [p for p in parts if p is not None]
    A = torch.cat([a for a, _, _ in adapted])                            # (sum r_i, in)
    B = A.new_zeros(sum(w.shape[0] for w in W0s), A.shape[0])            # (sum out_i, sum r_i)
    rows = cols = 0
    for p, w in zip(parts, W0s):
        if p is not None:
            B[rows:rows + w.shape[0], cols:cols + p[1].shape[1]] = p[1]
            cols += p[1].shape[1]
        rows += w.shape[0]
    if adapted[0][2] is None:
        return A, B, None
    m = torch.cat([row_norm(w).to(A.dtype) if p is None else p[2] for p, w in zip(parts, W0s)])  # (sum out_i,)
    return A, B, m


def peft_tensors(model, layers, method):
    """{transformers module: {PEFT's tensor name: tensor}} of the ungated adapters (see ungated), GPT-2's
    q, k, v parts fused into one c_attn adapter (see fuse), and {transformers module: its rank}."""
    arch, modules, tensors, ranks = model.config.arch, {}, {}, {}
    for name, layer in layers:  # every transformers module -> its parts: one for most, q, k, v for c_attn
        modules.setdefault(hf_name(name, arch), {})[name] = ungated(name, layer)
    for module, parts in modules.items():
        ours = our_modules(module, arch)
        if len(ours) == 1:
            A, B, m = parts[ours[0]]
        else:
            W0s = [getattr(model.get_submodule(n), "base", model.get_submodule(n)).weight for n in ours]  # frozen W0
            A, B, m = fuse([parts.get(n) for n in ours], W0s)
        ranks[module] = A.shape[0]
        if method == "hira":
            tensors[module] = {"hira_A": A, "hira_B": B}
        else:
            tensors[module] = {"lora_A.weight": A, "lora_B.weight": B}
            if m is not None:
                tensors[module]["lora_magnitude_vector"] = m
    return tensors, ranks


def peft_config(cfg, arch, tensors, ranks, base_name_or_path):
    """adapter_config.json for the adapters of peft_tensors. LoRA and DoRA: a module of another rank
    (GPT-2's c_attn) in rank_pattern, with alpha_pattern keeping s = alpha / r. HiRA: PEFT builds every
    layer with the config's r, so every adapter is padded here to the largest rank with zero rows of A
    and zero columns of B, which changes no B A."""
    target_modules = sorted({".".join(module.split(".")[-2:]) for module in tensors})  # e.g. self_attn.q_proj
    common = {"base_model_name_or_path": str(base_name_or_path), "task_type": "CAUSAL_LM", "inference_mode": True,
              "target_modules": target_modules, "fan_in_fan_out": arch == "gpt2"}  # GPT-2's Conv1D: W is (in, out)
    if cfg.method == "hira":
        r = max(ranks.values())
        for module, t in tensors.items():
            pad = r - t["hira_A"].shape[0]
            t["hira_A"] = torch.cat([t["hira_A"], t["hira_A"].new_zeros(pad, t["hira_A"].shape[1])])
            t["hira_B"] = torch.cat([t["hira_B"], t["hira_B"].new_zeros(t["hira_B"].shape[0], pad)], dim=1)
        return {"peft_type": "HIRA", "r": r, "hira_dropout": 0.0, "init_weights": True, **common}
    # a module of rank k r (GPT-2's c_attn, k parts) keeps s with alpha k (rsLoRA: alpha sqrt(k))
    pattern = {".".join(module.split(".")[-2:]): k for module, k in ranks.items() if k != cfg.rank}
    return {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora,
            "use_dora": cfg.method == "dora", "lora_dropout": cfg.dropout, "bias": "none",
            "init_lora_weights": True, "rank_pattern": pattern,
            "alpha_pattern": {key: cfg.alpha * (math.sqrt(k / cfg.rank) if cfg.rslora else k / cfg.rank)
                              for key, k in pattern.items()}, **common}


def export_peft(model, out_dir, base_name_or_path):
    """Write model's adapter to out_dir in PEFT's layout: adapter_config.json + adapter_model.safetensors
    (keys base_model.model.<transformers module>.lora_A.weight / .lora_B.weight / .lora_magnitude_vector,
    or .hira_A / .hira_B), for PeftModel.from_pretrained on base_name_or_path (written into the config).
    Gate none exports as it is, a static gate folded into B (see ungated); a token gate is refused.
    GPT-2's c_attn adapter has rank r times the number of q/k/v parts adapted (see fuse and peft_config).
    Returns the adapter_config.json dict."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no adapters (call apply_gatera or load_adapter first)")
    cfg = layers[0][1].config
    refuse_token_gate(cfg, "export_peft")
    tensors, ranks = peft_tensors(model, layers, cfg.method)
    config = peft_config(cfg, model.config.arch, tensors, ranks, base_name_or_path)
    flat = {f"{PREFIX}{module}.{kind}": v.contiguous().cpu() for module, t in tensors.items() for kind, v in t.items()}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, PEFT_WEIGHTS), lambda p: save_file(flat, p, metadata={"format": "pt"}))
    atomic_write(os.path.join(out_dir, PEFT_CONFIG), lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return config


# -----------------------------------------------------------------------------
# PEFT adapters in

# adapter_config.json fields that change the function in a way our adapters cannot hold, with the value
# that means "off" (extra tensors, e.g. trained biases, are also refused by name)
PEFT_UNSUPPORTED = {"bias": "none", "lora_bias": False, "modules_to_save": None, "layer_replication": None,
                    "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None,
                    "use_qalora": False, "kasa_config": None, "monteclora_config": None, "use_bdlora": None,
                    "arrow_config": None}
PEFT_KEY = re.compile(rf"{re.escape(PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|hira_A|hira_B)")


def pattern_value(patterns, module, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name
    (peft.utils.other.get_pattern_key: re.match(rf"(.*\\.)?({key})$", module)), else the default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft_config(peft_dir):
    """(adapter_config.json as a dict, the method it describes, the config's path, the weights' path),
    refusing a missing file, a peft_type other than LORA or HIRA, and any option our adapters lack."""
    config_path, weights_path = Path(peft_dir) / PEFT_CONFIG, Path(peft_dir) / PEFT_WEIGHTS
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"import_peft: {p} not found (a PEFT adapter folder holds {PEFT_CONFIG} and "
                                    f"{PEFT_WEIGHTS}, as PEFT's save_pretrained writes them)")
    pc = json.loads(config_path.read_text())
    if pc.get("peft_type") not in ("LORA", "HIRA"):
        raise ValueError(f"import_peft: {config_path} has peft_type {pc.get('peft_type')!r}; only LORA (with or "
                         "without use_dora) and HIRA adapters can be imported")
    for key, off in PEFT_UNSUPPORTED.items():
        if pc.get(key, off) not in (off, None, [], {}):
            raise ValueError(f"import_peft: {config_path} sets {key}={pc[key]!r}, which our adapters cannot hold; "
                             "only LoRA/DoRA/HiRA updates of linear layers can be imported")
    method = "hira" if pc["peft_type"] == "HIRA" else "dora" if pc.get("use_dora") else "lora"
    return pc, method, config_path, weights_path


def read_peft_tensors(weights_path, keys, method):
    """{transformers module: {key: tensor}} of adapter_model.safetensors, whose every tensor must be
    one of keys (the method's A, B and, for DoRA, m) and none of them missing."""
    found = {}
    for key, t in load_file(weights_path).items():
        match = PEFT_KEY.fullmatch(key)
        if match is None or match.group(2) not in keys:
            raise ValueError(f"import_peft: {weights_path} has tensor {key}, which a {method} adapter of linear "
                             f"layers does not have (its tensors end in {', '.join(keys)})")
        found.setdefault(match.group(1), {})[match.group(2)] = t
    if not found:
        raise ValueError(f"import_peft: {weights_path} holds no adapter tensors")
    for module, t in found.items():
        missing = [k for k in keys if k not in t]
        if missing:
            raise ValueError(f"import_peft: tensor {PREFIX}{module}.{missing[0]} is missing from {weights_path}")
    return found


def peft_layers(model, found, keys, pc, paths):
    """Our module -> (A, B, m or None, the layer's scale s_l) of every adapter in found, each checked
    against the model's layer (it exists, the shapes fit, the rank is the config's). GPT-2's c_attn
    adapter gives q, k and v the same A and each its rows of B (and m)."""
    (config_path, weights_path), arch, per_layer = paths, model.config.arch, {}
    rslora = pc["peft_type"] == "LORA" and bool(pc.get("use_rslora"))
    for module, t in found.items():
        ours = our_modules(module, arch)
        try:
            W0s = [model.get_submodule(n).weight for n in ours]
        except AttributeError:
            raise ValueError(f"import_peft: {weights_path} adapts {module}, which this {arch} model does not have "
                             "(the adapter was trained on another architecture)") from None
        A, B, m = t[keys[0]], t[keys[1]], t.get("lora_magnitude_vector")
        out, r = sum(w.shape[0] for w in W0s), A.shape[0]
        for k, want in zip(keys, [(r, W0s[0].shape[1]), (out, r), (out,)]):
            if tuple(t[k].shape) != want:
                raise ValueError(f"import_peft: tensor {PREFIX}{module}.{k} in {weights_path} has shape "
                                 f"{tuple(t[k].shape)}, the model expects {want}: the adapter was trained on another "
                                 "base model")
        r_config = pattern_value(pc.get("rank_pattern"), module, pc["r"])
        if r != r_config:
            raise ValueError(f"import_peft: tensor {PREFIX}{module}.{keys[0]} in {weights_path} has rank {r}, but "
                             f"{config_path} gives {module} r={r_config}")
        alpha = pattern_value(pc.get("alpha_pattern"), module, pc.get("lora_alpha"))
        s_l = 1.0 if pc["peft_type"] == "HIRA" else alpha / (math.sqrt(r) if rslora else r)
        start = 0
        for n, w in zip(ours, W0s):  # GPT-2's c_attn: each of q, k, v gets its rows of B and m
            rows = slice(start, start + w.shape[0])
            per_layer[n] = (A, B[rows], None if m is None else m[rows], s_l)
            start += w.shape[0]
    return per_layer


@torch.no_grad()
def import_peft(model, peft_dir):
    """Apply the PEFT adapter in peft_dir (adapter_config.json + adapter_model.safetensors: LoRA, rsLoRA,
    DoRA or HiRA, as PEFT's save_pretrained writes it) to our plain `model`, with gate none. Returns the
    GateRAConfig. Everything is checked before the model is touched; any unsupported option, unknown,
    missing or misshapen tensor is refused, naming the file and the tensor.

    Our adapters have one rank and one scale for all layers: a layer of lower rank (PEFT's rank_pattern)
    gets zero rows of A and zero columns of B, a layer with another scale s_l (alpha_pattern) gets
    B s_l / s; neither changes s B A. GPT-2's c_attn adapter (A, B) becomes q, k, v adapters (A, B's
    rows of each part), with the same rank. fan_in_fan_out only says that GPT-2's Conv1D stores W as
    (in, out); PEFT's A and B are (r, in) and (out, r) either way. Dropout acts only in training."""
    if adapted_layers(model):
        raise ValueError("import_peft: the model already has adapters; import into a plain (unadapted) model")
    pc, method, config_path, weights_path = read_peft_config(peft_dir)
    keys = {"lora": ("lora_A.weight", "lora_B.weight"), "hira": ("hira_A", "hira_B"),
            "dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}[method]  # A, B, m
    found = read_peft_tensors(weights_path, keys, method)
    per_layer = peft_layers(model, found, keys, pc, (config_path, weights_path))

    # one config for every layer: the largest rank, with the scale that PEFT's r and lora_alpha give
    R, rslora = max(a.shape[0] for a, _, _, _ in per_layer.values()), method != "hira" and bool(pc.get("use_rslora"))
    target_modules = tuple(sorted({n.rsplit(".", 1)[-1] for n in per_layer}))
    grow = math.sqrt(R / pc["r"]) if rslora else R / pc["r"]  # alpha for rank R with PEFT's s = alpha / r
    extra = {} if method == "hira" else {"alpha": pc["lora_alpha"] * grow, "rslora": rslora,
                                         "dropout": pc.get("lora_dropout", 0.0)}
    cfg = GateRAConfig(method=method, rank=R, gate="none", target_modules=target_modules, **extra)
    linears = {n for n, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] in target_modules}
    if linears - set(per_layer):
        n = hf_name(sorted(linears - set(per_layer))[0], model.config.arch)
        raise ValueError(f"import_peft: tensor {PREFIX}{n}.{keys[0]} is missing from {weights_path}: the adapter "
                         f"adapts other {n.rsplit('.', 1)[-1]} layers, and ours go on every layer of a name")
    apply_gatera(model, cfg)
    for name, layer in adapted_layers(model):
        A, B, m, s_l = per_layer[name]
        r = A.shape[0]
        layer.lora_A.zero_()[:r] = A
        layer.lora_B.zero_()[:, :r] = B if s_l == cfg.scale else B * (s_l / cfg.scale)
        if m is not None:
            layer.magnitude.copy_(m)
    return cfg


# -----------------------------------------------------------------------------
# merged checkpoints out

def hf_config(config, dtype):
    """config.json (a dict) for a Llama GPTConfig, as transformers' LlamaConfig reads it."""
    if config.arch != "llama" or config.rope_factors is not None:
        raise ValueError("merge_to_hf: only a Llama config without per-frequency rope factors (a GGUF's rope_freqs, "
                         "Llama 3.x's scaling) can be written from our GPTConfig; pass the original Hugging Face "
                         "checkpoint folder as the source instead")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd, "intermediate_size": config.mlp_hidden,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
            "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
            "attention_bias": config.attn_bias, "mlp_bias": config.mlp_bias,
            "tie_word_embeddings": config.tie_embeddings, "dtype": str(dtype).removeprefix("torch."),
            # transformers >= 5 reads rope_parameters, older versions rope_theta
            "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}}


@torch.no_grad()
def merged_state_dict(model):
    """Our parameter name -> tensor of the model with every adapter folded into its base weight
    (AdaptedLinear.merged_weight, computed in fp32), the adapters' own tensors dropped."""
    layers = dict(adapted_layers(model))
    state = {}
    for name, t in model.state_dict().items():
        module = next((m for m in layers if name.startswith(m + ".")), None)
        if module is None:
            state[name] = t
        elif name == module + ".base.weight":
            state[module + ".weight"] = layers[module].merged_weight()
        elif name == module + ".base.bias":
            state[module + ".bias"] = t
    if model.config.tie_embeddings:
        if "lm_head" in layers:
            raise ValueError("merge_to_hf: lm_head has an adapter, but its weight is tied to the token embedding, "
                             "which a merged lm_head would no longer equal; adapt other layers")
        del state["lm_head.weight"]  # the token embedding; transformers ties it again
    return state


def merge_to_hf(model, out_dir, source, dtype=torch.float32):
    """Write the model with its adapters merged (gate none or static) as a Hugging Face checkpoint folder
    that transformers' AutoModelForCausalLM.from_pretrained loads: config.json, model.safetensors in
    transformers' names (model.layers.0.self_attn.q_proj.weight for Llama; for GPT-2 q, k, v fused into
    transformer.h.0.attn.c_attn with Conv1D's (in, out) layout, as every GPT-2 projection), and the
    tokenizer files of the source folder. A model without adapters is written as it is.

    source: the checkpoint the model was loaded from (folder, Hub id or .gguf). From a Hugging Face folder
    config.json is copied (checked against the model's config, dtype updated). A .gguf source is written
    in the Hugging Face layout, with config.json built from our GPTConfig (default rope only); its
    tokenizer lives inside the .gguf: transformers' AutoTokenizer.from_pretrained(folder, gguf_file=name)
    can rebuild it. Each merged weight is computed in fp32 and cast once to dtype; the default fp32 keeps
    a small update that bf16 would round away (see gatera.merge_gatera)."""
    for _, layer in adapted_layers(model):
        refuse_token_gate(layer.config, "merge_to_hf")
    path = checkpoint_files(source, ["config.json", *TOKENIZER_FILES])
    arch = model.config.arch
    if path.suffix == ".gguf":
        config, side = hf_config(model.config, dtype), []
    else:
        config = json.loads((path / "config.json").read_text())
        if config_from_hf(config, path / "config.json") != model.config:
            raise ValueError(f"merge_to_hf: {path / 'config.json'} describes another model than the one given "
                             "(its GPTConfig differs); pass the checkpoint the model was loaded from")
        config.pop("torch_dtype", None)
        config["dtype"] = str(dtype).removeprefix("torch.")
        side = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
    state = merged_state_dict(model)
    if arch == "gpt2":  # q, k, v -> c_attn; Conv1D stores every projection's weight as (in, out)
        for i in range(model.config.n_layer):
            for kind in ("weight", "bias"):
                parts = [state.pop(f"transformer.h.{i}.attn.{p}.{kind}") for p in FUSED]
                state[f"transformer.h.{i}.attn.c_attn.{kind}"] = torch.cat(parts)
        state = {n: t.T if re.fullmatch(r"transformer\.h\.\d+\.(attn|mlp)\.\w+\.weight", n) else t
                 for n, t in state.items()}
    tensors = {hf_name(n, arch): t.to(dtype).contiguous().cpu() for n, t in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "model.safetensors"),
                 lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(os.path.join(out_dir, "config.json"),
                 lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    for f in side:
        atomic_write(os.path.join(out_dir, f.name), lambda p: shutil.copyfile(f, p))


# -----------------------------------------------------------------------------
# the command line: a trained adapter out as PEFT's adapter or as a merged checkpoint

parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--adapter", type=text, required=True, help="the adapter folder (train.py's <out>/adapter)")
parser.add_argument("--model", type=text, default="smollm2", help="the base it was trained on, as train.py's "
                    "--model: smollm2, a Hub id, a local Hugging Face folder or a .gguf file")
parser.add_argument("--peft", type=text, metavar="OUT", help="write the adapter in PEFT's layout (gate none or static)")
parser.add_argument("--merged", type=text, metavar="OUT",
                    help="write the merged model as a Hugging Face checkpoint folder (gate none or static)")
parser.add_argument("--overwrite", action="store_true", help="replace the files of an OUT folder that holds some")


def check(args):
    """Every check before the model loads: something to write, into folders that can be written, are
    not the inputs and hold nothing yet (unless --overwrite), and the adapter's files."""
    if not (args.peft or args.merged):
        parser.error("nothing to write: give --peft OUT, --merged OUT, or both")
    inputs = {os.path.realpath(path): flag for flag, path in (("--adapter", args.adapter), ("--model", args.model))
              if os.path.isdir(path)}
    for flag, out in (("--peft", args.peft), ("--merged", args.merged)):
        if out and os.path.realpath(out) in inputs:
            raise UserError(f"{flag} {out} is the {inputs[os.path.realpath(out)]} folder, whose files it would "
                            "replace: give another folder")
        if out:
            writable_folder(out, flag)
        if out and os.path.isdir(out) and os.listdir(out) and not args.overwrite:
            raise UserError(f"{flag} {out} already holds {', '.join(sorted(os.listdir(out))[:4])}: give another "
                            "folder, or --overwrite to replace its files")
    refuse_token_gate(check_adapter(args.adapter), f"export.py --adapter {args.adapter}")  # before the model loads


def main(argv=None):
    """Writes --peft and / or --merged; returns {"peft": OUT, "merged": OUT} of what it wrote."""
    args = parser.parse_args(argv)
    check(args)
    model = load_pretrained(args.model, dtype=torch.float32).requires_grad_(False)  # merge and export in fp32
    load_adapter(model, args.adapter)
    written = {}
    if args.peft:
        base = HUB_NAMES.get(args.model, args.model)  # PEFT loads its base from the Hub or a folder, not a .gguf
        export_peft(model, args.peft, base)
        written["peft"] = args.peft
        print(f"wrote {args.peft}: PEFT adapter for {base}")
    if args.merged:
        merge_to_hf(model, args.merged, args.model)
        written["merged"] = args.merged
        print(f"wrote {args.merged}: the merged model, Hugging Face layout")
    return written


if __name__ == "__main__":
    run(main)
