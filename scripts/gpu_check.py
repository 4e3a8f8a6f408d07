"""
An extra: the CUDA path, checked in one run of a few minutes on a machine with one NVIDIA GPU and no
network (no weights can be downloaded there). Four parts, each logged to <out>/gpu_check.log:

1. every adapter (LoRA, DoRA, HiRA x gate none, static, token) on the GPU in bf16 and fp32 against
   the papers' formula in fp64 on the CPU (tests.conftest.plain_formula): output and gradients;
2. bench.py --device cuda: GPT-2-124M's shape (tokens/s, TFLOP/s, MFU) and SmolLM2-135M's, bf16;
3. the default training run (gated HiRA, cloze PIQA) on a random-weight SmolLM2-shaped model,
   30 steps and 200 test questions (random weights: the accuracy means nothing, the run does);
4. the test suite (its tests run on the CPU of that machine; part 1 is the CUDA part).

    python scripts/gpu_check.py --out gpu-check            # on the GPU machine, from the repository root
    python scripts/gpu_check.py --device cpu --quick       # the same steps on a CPU, smaller: that it runs
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import SMOLLM2  # noqa: E402  (the repository's modules, from its root)
from gatera import GateRAConfig, AdaptedLinear  # noqa: E402
from model import GPT  # noqa: E402
from tests.conftest import LLAMA_RENAMES, plain_formula  # noqa: E402


def log(out, text):
    print(text, flush=True)
    with open(out / "gpu_check.log", "a") as f:
        f.write(text + "\n")


def relative(a, b):
    return ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-12)).item()


def check_adapters(device, out):
    """Every method x gate on `device` in fp32 and bf16 against the formula in fp64 on the CPU, each
    error relative to the reference's norm: the output, each gradient matrix, and the scalar gradients
    (a static gate, a gate's bias) together as one vector. Limits: 1e-4 in fp32; in bf16
    tests/test_bf16.py's, 3 % on the output and 15 % on the gradient matrices; in bf16 a layer's scalar
    gradient is one sum that cancels (DoRA's token gate: 18 % on the CPU), so it is shown, not limited.
    Returns the failures."""
    failures = []
    for dtype, out_tol, grad_tol in ((torch.float32, 1e-4, 1e-4), (torch.bfloat16, 0.03, 0.15)):
        for method in ("lora", "dora", "hira"):
            for gate in ("none", "static", "token"):
                torch.manual_seed(0)
                cfg = GateRAConfig(method=method, gate=gate, rank=8, dropout=0.0)
                layer = AdaptedLinear(torch.nn.Linear(64, 96).double(), cfg, "probe").double()
                with torch.no_grad():
                    layer.lora_B.normal_(0, 0.1)  # B = 0 at init would test nothing
                x = torch.randn(20, 64, dtype=torch.float64)
                want = plain_formula(layer, x)
                want.square().sum().backward()
                fast = AdaptedLinear(torch.nn.Linear(64, 96).to(device, dtype), cfg, "probe")
                fast.load_state_dict(layer.state_dict())  # copied into each tensor's own dtype
                fast.requires_grad_(True).base.requires_grad_(False)
                y = fast(x.to(device, dtype))
                y.float().square().sum().backward()
                pairs = [(n, p.grad, dict(layer.named_parameters())[n].grad) for n, p in fast.named_parameters()
                         if p.grad is not None]
                errs = {n: relative(g, want_g) for n, g, want_g in pairs if g.numel() > 1}
                scalars = [(g.flatten(), want_g.flatten()) for _, g, want_g in pairs if g.numel() == 1]
                scalar_err = relative(torch.cat([g.cpu() for g, _ in scalars]), torch.cat([w for _, w in scalars])) \
                    if scalars else 0.0
                worst = max(errs, key=errs.get)
                ok = relative(y.detach(), want.detach()) <= out_tol and errs[worst] <= grad_tol and \
                    (dtype == torch.bfloat16 or scalar_err <= grad_tol)
                failures += [] if ok else [f"{method}/{gate} {str(dtype)[6:]}"]
                log(out, f"{'ok  ' if ok else 'FAIL'} {method}/{gate} {str(dtype)[6:]}: output {relative(y.detach(), want.detach()):.1e}"
                         f" (limit {out_tol:g}), worst gradient matrix {errs[worst]:.1e} ({worst}; limit {grad_tol:g})"
                         + (f", scalar gradients {scalar_err:.1e}" if scalars else ""))
    return failures


def random_smollm2(folder, layers):
    """A Hugging Face folder of a SmolLM2-135M-shaped Llama (`layers` layers) with random weights and the
    tiny SmolLM-style tokenizer of the tests (its ids fit SmolLM2's vocabulary)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "llama", "vocab_size": SMOLLM2.vocab_size, "hidden_size": SMOLLM2.n_embd,
           "intermediate_size": SMOLLM2.mlp_hidden, "num_hidden_layers": layers, "num_attention_heads": SMOLLM2.n_head,
           "num_key_value_heads": SMOLLM2.n_kv_head, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
           "rope_theta": SMOLLM2.rope_theta, "tie_word_embeddings": True}
    torch.manual_seed(0)
    state = GPT(dataclasses.replace(SMOLLM2, n_layer=layers)).state_dict()
    tensors = {}
    for name, t in state.items():
        if name != "lm_head.weight":  # tied to the embedding
            for ours, hf in LLAMA_RENAMES:
                name = name.replace(ours, hf)
            tensors[name] = t.to(torch.bfloat16).contiguous()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((ROOT / "fixtures" / "tokenizers" / "smollm_tiny" / f).read_bytes())


def command(out, name, argv, timeout):
    """Run one command, its output into <out>/<name>.log; returns its exit status (124: timed out)."""
    t = time.time()
    with open(out / f"{name}.log", "w") as f:
        try:
            rc = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    tail = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()[-12:]
    log(out, f"\n$ {' '.join(map(str, argv))}\nexit {rc} after {time.time() - t:.0f} s; its last lines:\n" + "\n".join(tail))
    return rc


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu-check")
    parser.add_argument("--quick", action="store_true", help="2 layers, a few steps: that every part runs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py, device = sys.executable, torch.device(args.device)
    log(out, f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    failures = check_adapters(device, out)
    layers, steps, questions = (2, 3, 8) if args.quick else (30, 30, 200)
    bench_size = ["--quick"] if args.quick else []
    rcs = {"bench gpt2": command(out, "bench_gpt2", [py, "bench.py", "--device", args.device, *bench_size, "--rows",
                                                     "base,lora/none,hira/token", "--out", out / "bench_gpt2.json"], 240),
           "bench smollm2": command(out, "bench_smollm2", [py, "bench.py", "--device", args.device, *bench_size,
                                                           "--rows", "smollm2-lora,smollm2-gatera", "--out",
                                                           out / "bench_smollm2.json"], 240)}
    random_smollm2(out / "random-smollm2", layers)
    rcs["train"] = command(out, "train", [py, "train.py", "--task", "piqa", "--model", out / "random-smollm2",
                                          "--device", args.device, "--max-steps", str(steps), "--eval-examples",
                                          str(questions), "--out", out / "run", "--overwrite"], 300)
    if not args.quick:
        rcs["pytest"] = command(out, "pytest", [py, "-m", "pytest", "-q", "-x", "-m", "not slow"], 400)
    failures += [name for name, rc in rcs.items() if rc != 0]
    log(out, f"\n{'FAILED: ' + ', '.join(failures) if failures else 'every part passed'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
