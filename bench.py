"""
An extra: what each adapter and the gate cost: one training step (forward, backward, AdamW step) of a
GPT-2-124M-shaped model with random weights, for the frozen base alone and for LoRA, DoRA and HiRA
with gate none, static and token, beside the arithmetic floor of each; then KV-cache generation.
With peft and transformers installed, also transformers' GPT-2 of the same shape, frozen (hf-base),
and PEFT's LoRA, DoRA and HiRA on it, each timed beside our step of the same adapter. Last, the
frozen base stored in bf16 against fp32 (adapters fp32 both times) for SmolLM2-135M's shape and a
cloze training step, LoRA and GateRA (smollm2-lora, smollm2-gatera; see run_dtypes), each beside this
machine's matmul rate at the model's shapes in that dtype (budget.matmul_rate). The plain-*
rows run AdaptedLinear.forward_plain (the equations, plain autograd), each timed by turns with the
fused default of the same adapter: what the fast paths save, in time and in peak memory. The memory
row runs the main command itself, short (train.py --task piqa for 20 steps), and says what its peak
resident memory is made of (run_memory).

    python bench.py                        # CPU fp32, batch 8 x 256 (about 50 min on 2 cores)
    python bench.py --quick                # a sanity run of every row on a 2-layer model
    python bench.py --device cuda          # bf16, with the achieved TFLOP/s and MFU
    python bench.py --profile hira/token   # torch.profiler's table of one warm step of one row
    python bench.py --rows smollm2-lora,smollm2-gatera   # bf16 base / fp32 base only (about 3 min)
    python bench.py --rows base,plain-lora/token,plain-dora/token,plain-hira/token   # fused / plain
    python bench.py --rows memory          # the main command's peak RSS, and what holds it (2-4 min)

Each row runs in a fresh Python process, so that one cannot leave memory or warm caches to another.
Adapters: rank 32 (the paper's) on q, k, v, up and down of every layer (the paper's target modules),
alpha 64, no dropout. The frozen base runs forward and backward to its inputs (the token embeddings
get requires_grad) with no trainable parameter; every adapter row runs that same backward, so that
two rows differ only by the adapter.

The arithmetic floor: the matmul FLOPs of one step, 2 per multiply-add. With N = batch x seq tokens,
one matmul of the N tokens with an (out, in) weight costs one *unit*, U = 2 N in out.
  frozen linear    2U: forward W0 x and backward to the input dy W0 (a frozen weight needs no dW)
  attention        per layer 6 B T^2 C: q k^T and p v forward, four matmuls backward; causal half
  lm_head          2U with (out, in) = (vocab, C)
An adapted linear adds (r = rank):
  LoRA             6 N r (in + out): A x and B (A x) forward, an input and a weight gradient of each
  DoRA             LoRA + 2 out r in for B A in the weight norm ||W0 + s B A|| (once a step)
  HiRA, merged     + 1U: with gate none or static the step runs ONE matmul with W0 * (1 + g B A), whose
                   weight gradient dy^T x is the third unit; + 3 x 2 out r in for B A and its gradients
  HiRA, token      + 3U: g(x) differs per token, so W0 x and g (Delta_W x) are separate matmuls:
                   Delta_W x, its input gradient and its weight gradient, 5 units in all; + the B A terms
  token gate       + 6 N in: w_g . x forward and its two gradients (a static gate: nothing)
Elementwise work (norms, GELU, softmax, the gate's products, AdamW) is not counted: it moves memory
rather than multiplying. time/base beside FLOPs/base shows what a row costs beyond its arithmetic.

Start reading at main(); each row runs in run_child -> run_row (or run_dtypes, run_generation);
the run ends with goals (pass / fail limits on the ratios) and writes them into bench.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from importlib.util import find_spec

import torch
import torch.nn.functional as F

from cli import POSITIVE, POSITIVE_INT, Parser, UserError, pick_device, run, text, writable_folder
from budget import matmul_flops, matmul_rate
from files import write_json
from gatera import GateRAConfig, adapted_layers, apply_gatera
from model import GPT, GPTConfig

OURS = ["base"] + [f"{m}/{g}" for m in ("lora", "dora", "hira") for g in ("none", "static", "token")]
PEFT = ["hf-base", "peft-lora", "peft-dora", "peft-hira"]  # hf-base: transformers' GPT-2 frozen, the PEFT rows' base
PLAIN = [f"plain-{m}/{g}" for m in ("lora", "dora", "hira") for g in ("none", "token")]  # forward_plain
DTYPES = ["smollm2-lora", "smollm2-gatera"]  # SmolLM2-135M's shape, a frozen base in fp32 against one in bf16
SMOLLM2 = GPTConfig(arch="llama", vocab_size=49152, block_size=2048, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                    mlp_hidden=1536, attn_bias=False, mlp_bias=False, rope_theta=100000.0)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 peak, for MFU
EVERY = OURS + PLAIN + PEFT + DTYPES + ["generate", "memory"]  # every row, in the order they run
MEMORY_GOAL_MB = 2560  # the main command's peak resident memory on a CPU: what a laptop has to spare

parser = Parser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--batch", type=POSITIVE_INT, default=8)
parser.add_argument("--seq", type=POSITIVE_INT, default=256)
parser.add_argument("--layers", type=POSITIVE_INT, default=12)
parser.add_argument("--rank", type=POSITIVE_INT, default=32)
parser.add_argument("--steps", type=POSITIVE_INT, default=5, help="timed steps per row")
parser.add_argument("--warmup", type=POSITIVE_INT, default=3,
                    help="untimed steps before them (at least 1: the first step also measures the peak memory, and "
                    "the first steps run slower while memory is first mapped)")
parser.add_argument("--prompt", type=POSITIVE_INT, default=128, help="generation: prompt tokens")
parser.add_argument("--new", type=POSITIVE_INT, default=64, help="generation: new tokens")
parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps")
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "float64"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
parser.add_argument("--rows", default=None, help="comma-separated subset of: " + ", ".join(EVERY))
parser.add_argument("--peak-tflops", type=POSITIVE, default=None, help="the device's peak, for MFU")
parser.add_argument("--out", type=text, default="bench.json")
parser.add_argument("--quick", action="store_true", help="sanity run: 2 layers, batch 2 x 64, 1 timed step")
parser.add_argument("--profile", default=None, metavar="ROW", help="print torch.profiler's table of one warm step, by operator")
parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one row here, print its JSON


def parse_args(argv=None):
    """The flags, checked before any row runs: known rows, a device this machine has, a writable --out."""
    args = parser.parse_args(argv)
    asked = set(args.rows.split(",") if args.rows else []) | ({args.profile} if args.profile else set())
    unknown = sorted(asked - set(EVERY))
    if unknown:
        raise UserError(f"--rows / --profile: unknown row(s) {unknown}; choose from {', '.join(EVERY)}")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder: give the JSON file to write, e.g. {args.out}/bench.json")
    writable_folder(os.path.dirname(args.out) or ".", "--out")
    if args.quick:
        args.layers, args.batch, args.seq, args.steps, args.prompt, args.new = 2, 2, 64, 1, 16, 8
    args.device = pick_device(args.device)
    args.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.type == "cuda" else torch.float32)
    args.gpt = GPTConfig(n_layer=args.layers)  # GPT-2 124M: 12 heads, 768 wide, vocab 50257
    if max(args.seq, args.prompt + args.new) > args.gpt.block_size:  # GPT-2's learned positions
        raise UserError(f"--seq {args.seq} and --prompt + --new ({args.prompt + args.new}) must each fit GPT-2's "
                        f"{args.gpt.block_size} positions")
    return args


# -----------------------------------------------------------------------------
# the arithmetic floor


def step_flops(row, c, B, T, r, hira_merges=True):
    """Matmul FLOPs of one training step of `row` ("base", "lora/token", ...) for a GPT-2-shaped model
    of config c, batch B x T and adapter rank r (see the docstring). hira_merges: whether HiRA with
    gate none or static runs one merged matmul (AdaptedLinear does when base and adapter share a dtype)."""
    N, C = B * T, c.n_embd
    shapes = {"q_proj": (C, C), "k_proj": (C, C), "v_proj": (C, C), "o_proj": (C, C),
              "up_proj": (C, c.mlp_hidden), "down_proj": (c.mlp_hidden, C)}  # (in, out)

    def unit(fan_in, fan_out):  # one matmul of the N tokens with an (out, in) weight
        return 2 * N * fan_in * fan_out

    flops = c.n_layer * sum(2 * unit(*s) for s in shapes.values())       # frozen linears: forward + input grad
    flops += c.n_layer * 6 * B * T * T * C // 2                           # attention, causal half
    flops += 2 * unit(C, c.vocab_size)                                    # lm_head
    if row == "base":
        return flops
    method, gate = row.split("/")
    merged = method == "hira" and gate != "token" and hira_merges
    for module in GateRAConfig().target_modules:
        fan_in, fan_out = shapes[module]
        if method == "hira":
            extra = (1 if merged else 3) * unit(fan_in, fan_out) + 3 * 2 * fan_out * r * fan_in
        else:
            extra = 6 * N * r * (fan_in + fan_out) + (2 * fan_out * r * fan_in if method == "dora" else 0)
        if gate == "token":
            extra += 6 * N * fan_in
        flops += c.n_layer * extra
    return flops


# -----------------------------------------------------------------------------
# one row, in its own process


def build(row, args):
    """The model of `row`, its trainable parameters and a function idx -> logits."""
    torch.manual_seed(0)
    if row in PEFT:
        from peft import HiraConfig, LoraConfig, get_peft_model
        from transformers import GPT2Config, GPT2LMHeadModel
        hf_config = GPT2Config(n_layer=args.layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa").to(args.device, args.dtype)
        # GPT-2 fuses q, k and v into one Conv1D, c_attn: PEFT adapts the three with one rank-r adapter,
        # r (C + 3C) multiply-adds per token, where ours are three, 3 r (C + C): an eighth fewer adapter FLOPs
        common = dict(r=args.rank, target_modules=["c_attn", "c_fc", "mlp.c_proj"], fan_in_fan_out=True)
        if row == "hf-base":
            model = hf.requires_grad_(False)
        elif row == "peft-hira":
            model = get_peft_model(hf, HiraConfig(**common, init_weights=False))
        else:
            model = get_peft_model(hf, LoraConfig(**common, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                  use_dora=row == "peft-dora", init_lora_weights=False))
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
        return model, [p for p in model.parameters() if p.requires_grad], lambda idx: model(input_ids=idx).logits
    model = GPT(args.gpt).to(args.device, args.dtype).requires_grad_(False)
    if row != "base":
        method, gate = row.removeprefix("plain-").split("/")
        apply_gatera(model, GateRAConfig(method=method, gate=gate, rank=args.rank, alpha=2 * args.rank, dropout=0.0,
                                         fused=not row.startswith("plain-")))
        with torch.no_grad():
            for _, layer in adapted_layers(model):
                layer.lora_B.normal_(std=0.01)  # a non-zero update, as after some training
    model.transformer.wte.register_forward_hook(lambda m, i, out: out.requires_grad_())
    return model, [p for p in model.parameters() if p.requires_grad], model


def peak_allocated_mb(prof):
    """The most tensor memory that a torch.profiler(profile_memory=True) run allocated on top of what
    was live when it began: the peak of the running sum of its allocation (+) and free (-) events.
    (PyTorch keeps no memory statistics for the CPU, as torch.cuda.max_memory_allocated does.)"""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(seconds that fn() took, what it returned), the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def run_row(row, args):
    """Build `row` and run its steps: the first one measures the peak memory (weights, activations,
    gradients and optimizer state), the next args.warmup - 1 warm up, the last args.steps are timed.
    Every row but the base also builds the frozen base in the same process and times one base step
    after each of its own: this CPU's speed drifts by 10 % and more over minutes, and a ratio of two
    steps taken seconds apart cancels that drift where rows timed minutes apart would not."""

    def make_step(row):
        model, params, logits_of = build(row, args)
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

        def step():
            loss = F.cross_entropy(logits_of(idx).flatten(0, 1).float(), loss_targets.flatten())
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return model, step

    idx = torch.randint(args.gpt.vocab_size, (args.batch, args.seq), device=args.device)
    loss_targets = torch.randint(args.gpt.vocab_size, (args.batch, args.seq), device=args.device)
    def first_step_peak_mb(model, step):  # weights + the most memory a step's tensors hold at once
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
            step()
            return torch.cuda.max_memory_allocated(args.device) / 2**20
        weights = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for t in [*model.parameters(), *model.buffers()]}  # tied weights counted once
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        return sum(weights.values()) / 2**20 + peak_allocated_mb(prof)

    model, step = make_step(row)
    peak_mb = first_step_peak_mb(model, step)
    for _ in range(args.warmup - 1):
        step()
    if args.profile:
        with torch.profiler.profile(record_shapes=True) as prof:
            step()
        # by operator and autograd Function (e.g. DoRAScaledBaseBackward), each with what it calls
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
        return None
    ours = (row.removeprefix("peft-") + "/none" if row.startswith("peft-") else  # our step of PEFT's adapter
            row.removeprefix("plain-") if row.startswith("plain-") else None)    # the fused step of a plain row
    partners = [] if row == "base" else ["base"] + ([ours] if ours else [])
    partner_steps, ours_peak_mb = {}, None
    for p in partners:
        partner_model, partner_steps[p] = make_step(p)
        if p == ours and row.startswith("plain-"):  # the fused step's memory beside the plain one's
            ours_peak_mb = first_step_peak_mb(partner_model, partner_steps[p])
    for partner_step in partner_steps.values():
        for _ in range(args.warmup):
            partner_step()
    times, partner_times = [], {p: [] for p in partners}
    for _ in range(args.steps):
        times.append(timed(step, args.device)[0])
        for p, partner_step in partner_steps.items():
            partner_times[p].append(timed(partner_step, args.device)[0])
    return dict(row=row, times_s=times, base_times_s=partner_times.get("base", []),
                ours_times_s=partner_times.get(ours), peak_mb=peak_mb, ours_peak_mb=ours_peak_mb,
                flops=None if row in PEFT + PLAIN else
                step_flops(row, args.gpt, args.batch, args.seq, args.rank, hira_merges=args.dtype in (torch.float32, torch.float64)))


def run_dtypes(row, args):
    """One cloze-like training step (16 x 64 tokens, the loss on the last 32 of each row; forward,
    backward, AdamW) of SmolLM2-135M's shape with random weights: LoRA (gate none) for smollm2-lora,
    GateRA (HiRA, token gate) for smollm2-gatera, with the frozen base stored in fp32 and in bf16
    (adapters in fp32 both times). Both are built in this process and timed by turns, so that bf16 /
    fp32 is the median of ratios of steps taken seconds apart."""
    config = GPTConfig(**{**vars(SMOLLM2), "n_layer": args.layers if args.quick else SMOLLM2.n_layer})
    B, T = (2, 16) if args.quick else (16, 64)
    idx = torch.randint(config.vocab_size, (B, T), device=args.device)
    at = torch.zeros(B, T, dtype=torch.bool, device=args.device)
    at[:, T // 2:-1] = True                                              # positions whose next token is a target
    loss_targets = idx[:, 1:][at[:, :-1]]
    method, gate = ("lora", "none") if row == "smollm2-lora" else ("hira", "token")
    steps = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = GPT(config).to(args.device, dtype).requires_grad_(False)
        apply_gatera(model, GateRAConfig(method=method, gate=gate, rank=args.rank, alpha=2 * args.rank, dropout=0.0))
        with torch.no_grad():
            for _, layer in adapted_layers(model):
                layer.lora_B.normal_(std=0.01)  # a non-zero update, as after some training
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer):
            model(idx, logits_at=at, targets=loss_targets).backward()  # the summed loss, as train.py
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[dtype] = step
    flops = matmul_flops(steps[torch.float32])  # the same matmuls in either dtype
    rates = {str(dtype): matmul_rate(config, args.device, dtype, tokens=B * T) for dtype in steps}  # FLOP/s
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {dtype: [] for dtype in steps}
    for _ in range(args.steps):
        for dtype, step in steps.items():
            times[dtype].append(timed(step, args.device)[0])
    return dict(row=row, fp32_times_s=times[torch.float32], bf16_times_s=times[torch.bfloat16], tokens=B * T,
                flops=flops, matmul_flops_per_s=rates)


@torch.no_grad()
def run_generation(args):
    """Greedy generation of args.new tokens after an args.prompt-token prompt, batch 1: model.generate
    (with the KV cache each step feeds one token) against recomputing the whole sequence each step;
    and GateRA (HiRA, token gate) with the cache."""
    torch.manual_seed(0)
    model = GPT(args.gpt).to(args.device, args.dtype).eval()
    prompt = torch.randint(args.gpt.vocab_size, (1, args.prompt), device=args.device)

    def without_cache(idx, new):
        for _ in range(new):
            idx = torch.cat([idx, model(idx, logits_at=-1).argmax(-1, keepdim=True)], dim=1)
        return idx

    def tokens_per_s(generate, runs=3):  # the median of `runs` timed runs after a short warm-up
        generate(prompt[:, :8], 2)
        times, outs = zip(*(timed(lambda: generate(prompt, args.new), args.device) for _ in range(runs)))
        return args.new / statistics.median(times), outs[-1][0, args.prompt:].tolist()

    cache, cache_ids = tokens_per_s(model.generate)
    recompute, recompute_ids = tokens_per_s(without_cache)
    apply_gatera(model, GateRAConfig(method="hira", gate="token", rank=args.rank))
    gatera_cache, _ = tokens_per_s(model.generate)
    # what HiRA keeps for decoding: W0 * BA per adapted layer, in the base's dtype (AdaptedLinear.inference_delta_w)
    kept = sum(layer.kept_delta_w[1].numel() * layer.kept_delta_w[1].element_size()
               for _, layer in adapted_layers(model) if layer.kept_delta_w is not None)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return dict(row="generate", cache_tokens_per_s=cache, no_cache_tokens_per_s=recompute,
                same_tokens=cache_ids == recompute_ids, gatera_cache_tokens_per_s=gatera_cache,
                gatera_kept_mb=kept / 2**20, frozen_mb=frozen / 2**20)


def saved_by_module(model, fn):
    """{module class: bytes} of the tensors that fn's forward keeps for the backward, besides the
    model's own weights, each counted once and charged to the innermost module running when it was saved."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    running, seen, kept = ["GPT"], set(), {}
    hooks = [h for m in model.modules() for h in (
        m.register_forward_pre_hook(lambda m, a: running.append(type(m).__name__)),
        m.register_forward_hook(lambda m, a, o: running.pop() and None))]  # None: the output stays

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            seen.add(ptr)
            kept[running[-1]] = kept.get(running[-1], 0) + t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    for h in hooks:
        h.remove()
    return kept


def run_memory(args):
    """The main command, short (train.py --task piqa: SmolLM2-135M, the shipped PIQA, the default adapter,
    4 x --steps steps and 16 questions), in this fresh process: its peak resident memory (RSS), and what
    the peak is made of: this process before the model (Python, torch), the frozen weights, the adapters
    with their gradients and AdamW's two moments, the activations that the largest micro-batch keeps for the
    backward (PIQA's longest examples, --micro-batch-tokens of them), by module; the rest is what the
    allocator keeps of freed blocks and the step's transient tensors."""
    import resource
    import tempfile
    import train
    from checkpoints import load_pretrained
    from data import collate, load_training, micro_batches
    from tokenizer import load_tokenizer
    peak_rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux counts KiB)
    before = peak_rss()  # nothing large has run yet: the peak so far is what the process holds now
    steps = 3 if args.quick else 4 * args.steps
    with tempfile.TemporaryDirectory() as out:
        train.main(["--task", "piqa", "--max-steps", str(steps), "--skip-eval-before",
                    "--eval-examples", "16", "--device", str(args.device), "--out", out])
        metrics = json.load(open(os.path.join(out, "metrics.json")))
    peak = peak_rss()
    a = train.parser.parse_args(["--task", "piqa", "--train-examples", "0"])
    model = load_pretrained("smollm2", getattr(torch, metrics["dtype"])).requires_grad_(False)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters())
    apply_gatera(model, GateRAConfig())
    trained = 4 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # + grad, 2 moments
    tok = load_tokenizer("smollm2")
    _, encoded = load_training(a, tok)
    longest = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))[:a.batch_size]
    micro, n_targets, n_real, _ = micro_batches(longest, encoded, 1, metrics["args"]["micro_batch_tokens"], 0, 1)
    batch = collate([encoded[i] for i in micro[0]], tok.pad_id)
    kept = saved_by_module(model, lambda: train.forward_backward(model, batch, n_targets, n_real, 0.01))
    return dict(row="memory", peak_mb=peak / 2**20, steps=steps,
                dtype=metrics["dtype"], before_mb=before / 2**20, frozen_mb=frozen / 2**20, trained_mb=trained / 2**20,
                micro_tokens=batch[0].numel(), saved_mb={k: v / 2**20 for k, v in kept.items()})


# -----------------------------------------------------------------------------
# the parent: one child process per row, then the table


def run_child(row, capture=True):
    """Run `row` in a fresh process with this process's settings; its JSON result (capture=True)."""
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "bench.py"), *sys.argv[1:], "--child", row]
    # glibc hands every freed block above its mmap threshold (the logits, most activations) back to
    # the kernel and page-faults it in again at the next step: about 20 % of a step on this CPU, and
    # noisy. Every row runs with the allocator keeping its memory instead (only on glibc; settable).
    env = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40), **os.environ}
    env = os.environ if row == "memory" else env  # the memory row measures the main command as it runs
    proc = subprocess.run(cmd, capture_output=capture, text=True, cwd=here, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.py: row {row} failed (run `{' '.join(cmd)}` to see it alone)"
                           + (f":\n{proc.stderr[-3000:]}" if capture else ""))
    return json.loads(proc.stdout.strip().splitlines()[-1]) if capture else None


def paired_ratio(times, other_times):
    """The median over the timed steps of (a step / the other row's step timed next to it)."""
    return statistics.median(t / o for t, o in zip(times, other_times))


def check(goals, label, value, limit, at_least=False):
    """Record and print one goal: value <= limit (value >= limit when at_least)."""
    met = value >= limit if at_least else value <= limit
    goals.append(dict(goal=label, value=round(value, 3), limit=limit, at_least=at_least, met=met))
    print(f"  {'met   ' if met else 'MISSED'} {label}: {value:.3f} ({'>=' if at_least else '<='} {limit:g})")


def choose_rows(args):
    """The rows to run (--rows, else every row; the PEFT rows only with peft and transformers installed),
    after a header that says the settings."""
    have_peft = find_spec("peft") is not None and find_spec("transformers") is not None
    rows = args.rows.split(",") if args.rows else [r for r in EVERY if have_peft or r not in PEFT]  # checked in parse_args
    print(f"GPT-2-124M shape with {args.layers} layers (768 wide, 12 heads, vocab 50257), batch {args.batch} x "
          f"{args.seq}, {args.device.type} {str(args.dtype).removeprefix('torch.')}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; {args.steps} timed steps after {args.warmup} untimed")
    print(f"adapters: rank {args.rank} on {', '.join(GateRAConfig().target_modules)}, alpha {2 * args.rank}, "
          "no dropout")
    if not have_peft:
        print("peft or transformers is not installed: no PEFT rows (pip install peft)")
    return rows


def add_ratios(results, args):
    """Each step row's median time, spread, FLOPs, TFLOP/s and MFU, and its time, FLOPs and peak memory
    over the base's; PEFT's rows also over transformers' frozen GPT-2 (hf-base)."""
    peak = args.peak_tflops
    if peak is None and args.device.type == "cuda":
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(args.device)), None)
    base = results.get("base")
    for r in results.values():
        r["median_s"] = statistics.median(r["times_s"])
        r["spread"] = (max(r["times_s"]) - min(r["times_s"])) / r["median_s"]
        r["time_ratio"] = paired_ratio(r["times_s"], r["base_times_s"]) if r["base_times_s"] else 1.0
        if r["flops"]:
            r["gflop"] = r["flops"] / 1e9
            r["tflops_per_s"] = r["flops"] / r["median_s"] / 1e12
            r["mfu"] = r["tflops_per_s"] / peak if peak else None
            r["flop_ratio"] = r["flops"] / step_flops("base", args.gpt, args.batch, args.seq, args.rank)
            r["excess"] = r["time_ratio"] / r["flop_ratio"]  # the cost beyond the arithmetic
        if base:
            r["mem_ratio"] = r["peak_mb"] / base["peak_mb"]
    if "hf-base" in results:  # what PEFT's adapters cost over the model they wrap
        for name in PEFT[1:]:
            if name in results:
                results[name]["time_over_hf_base"] = results[name]["time_ratio"] / results["hf-base"]["time_ratio"]


def print_table(results, args):
    """The table of the step rows, then the fused steps over the plain ones and PEFT's over hf-base."""
    columns = [("step ms", "median_s", 1e3, ".0f"), ("spread", "spread", 1, ".1%"), ("GFLOP", "gflop", 1, ".0f"),
               ("TFLOP/s", "tflops_per_s", 1, ".3f"), ("MFU", "mfu", 1, ".1%"), ("time/base", "time_ratio", 1, ".3f"),
               ("FLOPs/base", "flop_ratio", 1, ".3f"), ("excess", "excess", 1, ".3f"),
               ("peak MB", "peak_mb", 1, ".0f"), ("mem/base", "mem_ratio", 1, ".3f")]
    header = f"{'row':12}" + "".join(f"{title:>11}" for title, *_ in columns)
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(f"{name:12}" + "".join(format(r[key] * scale, fmt).rjust(11) if r.get(key) is not None else "-".rjust(11)
                                     for _, key, scale, fmt in columns))
    print("step ms: median of the timed steps; spread: (max - min) / median; time/base: median of (step / the\n"
          "base step timed right after it, in the same process; hf-base and PEFT rows too are over OUR base);\n"
          "excess: time/base over FLOPs/base;\n"
          "peak MB: the most tensor memory live at once during a step (weights included), "
          + ("torch.cuda.max_memory_allocated" if args.device.type == "cuda"
             else "from torch.profiler's allocation events"))
    plain = {name: r for name, r in results.items() if name in PLAIN}
    if plain:
        print("the fused step over the plain one (forward_plain, autograd), time (by turns) and peak memory: " +
              ", ".join(f"{name.removeprefix('plain-')} {paired_ratio(r['ours_times_s'], r['times_s']):.3f} / "
                        f"{r['ours_peak_mb'] / r['peak_mb']:.3f}" for name, r in plain.items()))
    if "hf-base" in results:
        print("PEFT's rows over transformers' frozen GPT-2 (hf-base): " + ", ".join(
            f"{name} {r['time_over_hf_base']:.3f}" for name, r in results.items() if "time_over_hf_base" in r))


def check_step_goals(results, goals):
    """The goals of the training steps: what each adapter costs beyond its arithmetic and in memory,
    a token gate over none, DoRA over LoRA, ours against PEFT's."""
    for name in OURS[1:]:
        if name in results:
            check(goals, f"{name} time/base over FLOPs/base", results[name]["excess"], 1.10)
    if "base" in results:
        for name in OURS[1:]:
            if name in results:
                check(goals, f"{name} peak memory / base's", results[name]["mem_ratio"], 1.20)
    for m in ("lora", "dora"):
        if f"{m}/none" in results and f"{m}/token" in results:
            check(goals, f"{m}: gate token / gate none time",
                  results[f"{m}/token"]["time_ratio"] / results[f"{m}/none"]["time_ratio"], 1.05)
    for g in ("none", "static", "token"):
        if f"dora/{g}" in results and f"lora/{g}" in results:
            check(goals, f"dora/{g} / lora/{g} time",
                  results[f"dora/{g}"]["time_ratio"] / results[f"lora/{g}"]["time_ratio"], 1.15)
    for m, limit in (("lora", 0.90), ("dora", 0.90), ("hira", 1.0)):
        ours, theirs = results.get(f"{m}/none"), results.get(f"peft-{m}")
        if theirs:  # our steps and PEFT's, timed by turns in the PEFT row's process
            check(goals, f"{m}/none time / PEFT {m}'s", paired_ratio(theirs["ours_times_s"], theirs["times_s"]), limit)
        if ours and theirs:
            check(goals, f"{m}/none peak memory / PEFT {m}'s", ours["peak_mb"] / theirs["peak_mb"], 1.0)


def check_other_goals(dtype_rows, generation, args, goals):
    """The bf16 base against the fp32 one (smollm2-*), and KV-cache generation against recomputing."""
    for name, r in dtype_rows.items():
        r["bf16_over_fp32"] = paired_ratio(r["bf16_times_s"], r["fp32_times_s"])
        fp32_ms, bf16_ms = (1e3 * statistics.median(r[k]) for k in ("fp32_times_s", "bf16_times_s"))
        print(f"\n{name}: SmolLM2-135M's shape, a training step of {r['tokens']} tokens: fp32 base {fp32_ms:.0f} ms "
              f"({r['tokens'] / fp32_ms * 1e3:.0f} tok/s), bf16 base {bf16_ms:.0f} ms "
              f"({r['tokens'] / bf16_ms * 1e3:.0f} tok/s); bf16 / fp32 paired {r['bf16_over_fp32']:.3f}")
        for dtype, ms in (("torch.float32", fp32_ms), ("torch.bfloat16", bf16_ms)):  # the step's share of the rate
            rate = r["matmul_flops_per_s"][dtype]
            print(f"  {dtype[6:]}: matmuls at these shapes {rate / 1e9:.0f} GFLOP/s; the step's {r['flops'] / 1e9:.1f} "
                  f"GFLOP (attention not counted) in {ms:.0f} ms: {r['flops'] / (ms / 1e3) / rate:.2f} of that rate")
        check(goals, f"{name}: bf16 step / fp32 step", r["bf16_over_fp32"], 0.5)
    if generation:
        generation["speedup"] = generation["cache_tokens_per_s"] / generation["no_cache_tokens_per_s"]
        print(f"\ngeneration, batch 1, {args.new} new tokens after a {args.prompt}-token prompt (frozen base):\n"
              f"  KV cache {generation['cache_tokens_per_s']:.1f} tokens/s, recomputing "
              f"{generation['no_cache_tokens_per_s']:.1f} tokens/s: {generation['speedup']:.1f}x; "
              f"the same tokens: {generation['same_tokens']}\n"
              f"  GateRA (HiRA, token gate) with the KV cache: {generation['gatera_cache_tokens_per_s']:.1f} tokens/s, "
              f"keeping W0 * BA of every adapted layer in the base's dtype: {generation['gatera_kept_mb']:.0f} MB "
              f"(the frozen model: {generation['frozen_mb']:.0f} MB)")
        check(goals, "KV-cache generation speedup over recomputing", generation["speedup"], 5.0, at_least=True)


def check_memory_goal(r, goals):
    """The memory row: the main command's peak RSS and what it is made of."""
    saved = sum(r["saved_mb"].values())
    parts = [("before the model: Python, torch", r["before_mb"]), (f"the frozen weights ({r['dtype']})", r["frozen_mb"]),
             ("the adapters, their gradients, AdamW's moments", r["trained_mb"]),
             (f"the activations the largest micro-batch ({r['micro_tokens']} tokens) keeps for the backward", saved)]
    rest = r["peak_mb"] - sum(mb for _, mb in parts)
    print(f"\nmemory: python train.py --task piqa, {r['steps']} steps and 16 questions: peak RSS {r['peak_mb'] / 1024:.2f} GB")
    for what, mb in parts + [("the rest: the allocator's kept free blocks, a step's transient tensors", rest)]:
        print(f"  {mb / 1024:5.2f} GB  {what}")
    print("  activations by module: " + ", ".join(f"{k} {v / 1024:.2f} GB" for k, v in
                                                 sorted(r["saved_mb"].items(), key=lambda kv: -kv[1])))
    check(goals, "memory: the main command's peak RSS, MB", r["peak_mb"], MEMORY_GOAL_MB)


def main():
    args = parse_args()
    if args.child:  # one row, in this fresh process: its JSON on stdout (or, with --profile, the table)
        run_one = {"generate": run_generation, "memory": run_memory}.get(args.child)
        result = run_one(args) if run_one else run_dtypes(args.child, args) if args.child in DTYPES else run_row(
            args.child, args)
        if not args.profile:
            print(json.dumps(result))
        return
    if args.profile:
        run_child(args.profile, capture=False)
        return
    rows = choose_rows(args)
    results = {}
    for row in rows:  # each in its own process
        print(f"  running {row} ...", file=sys.stderr, flush=True)
        results[row] = run_child(row)
    generation, memory = results.pop("generate", None), results.pop("memory", None)
    dtype_rows = {row: results.pop(row) for row in DTYPES if row in results}
    add_ratios(results, args)
    print_table(results, args)
    goals = []
    print("\ngoals:")
    check_step_goals(results, goals)
    check_other_goals(dtype_rows, generation, args, goals)
    if memory:
        check_memory_goal(memory, goals)

    settings = {k: v if isinstance(v, (int, float, str, type(None))) else str(v)
                for k, v in vars(args).items() if k not in ("child", "profile", "gpt")}
    write_json(args.out, dict(settings=settings, torch=torch.__version__, threads=torch.get_num_threads(),
                              rows=results, dtypes=dtype_rows, generation=generation, memory=memory, goals=goals))
    missed = [g["goal"] for g in goals if not g["met"]]
    print(f"\nwrote {args.out}; {len(missed)} of {len(goals)} goals missed" +
          (": " + "; ".join(missed) if missed else ""))


if __name__ == "__main__":
    run(main)
