"""
Fine-tune a pretrained GPT-2 / Llama with GateRA on a commonsense task, then evaluate it.

    python train.py --task piqa                      # SmolLM2-135M (embedded), gated HiRA, cloze: the defaults
    python train.py --task piqa --method lora --gate none --out runs/lora      # an ungated baseline
    python train.py --task piqa --format label --model path/to/llama           # the papers' protocol
    python train.py --eval-only --adapter out/adapter                          # evaluate it again: out/eval-1/
    torchrun --standalone --nproc_per_node=2 train.py --task piqa              # data parallel

Loss = cross-entropy on the answer's tokens + lambda * mean gate entropy over real tokens. Accuracy
is measured before and after training on the same test items, then compared with McNemar's test; the
output folder gets the adapter, the predictions, log.jsonl, metrics.json and ckpt.pt (--resume).
No run writes over another (checks.py). Generating text is sample.py; PEFT export is export.py.

Start reading at main(); the training loop is train(), the building blocks are above them.
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from budget import Timing, eta, evaluation_seconds, fit_examples, matmul_rate, step_seconds, timing_model
from checkpoints import interrupted, load_adapter, load_pretrained, pick_dtype, resume, save_adapter, write_checkpoint
from checks import RUN_FILES, check_flags, check_run, check_training_set, delete_run
from cli import (COUNT, NONNEGATIVE, POSITIVE, POSITIVE_INT, SEED, Parser, UserError, duration, given, number,
                 pick_device, run, text)
from data import (LABELS, MIXES, collate, length_grouped_batches, load_tests, load_training, micro_batches, subset, task_list,
                  union_note)
from evaluate import eval_record, evaluate_after, evaluate_tasks, hms, step_line, step_record
from gatera import apply_gatera, config_flags, gate_entropy, target_layers
from gates import GateRecorder
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# flags (the papers' settings: r 32, alpha 64, lr 3e-4 LoRA, 1e-3 HiRA, 3 epochs, batch 16). Every number
# is checked where argparse parses it (cli's types): a bad value fails at once, naming the flag and the range.

parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--task", type=task_list, default="piqa", metavar="TASK[,TASK...]", help=f"{', '.join(LABELS)}: "
                    f"one, or several (trained together, each evaluated); or {' / '.join(MIXES)} (evaluated on all 8)")
parser.add_argument("--model", type=text, default="smollm2", help="smollm2 (embedded), a Hub id, a folder, a .gguf")
parser.add_argument("--data-dir", type=text, default=None, help="local LLM-Adapters files (dataset/<task>/...)")
parser.add_argument("--format", default="cloze", choices=["cloze", "label"],
                    help="cloze: lm-eval-harness's log-likelihoods; label: 'the correct answer is X' (the papers)")
parser.add_argument("--eval", default="score", choices=["score", "generate"],
                    help="label format: score the labels' log-likelihood, or generate greedily and extract")
parser.add_argument("--eval-examples", type=COUNT, default=None, help="a fixed random subset of each test set (0: all)")
parser.add_argument("--eval-batch-size", type=POSITIVE_INT, default=16, help="sequences per forward in evaluation")
parser.add_argument("--eval-only", action="store_true", help="score --adapter (or the bare model) into <out>/eval-<n>/")
parser.add_argument("--adapter", type=text, default=None, help="the adapter folder that --eval-only evaluates")
parser.add_argument("--visualize", type=COUNT, default=0, metavar="N", help="gates.html of the first N test examples")
parser.add_argument("--seed", type=SEED, default=1337)
parser.add_argument("--out", type=text, default="out", help="output folder, one run's (see --resume, --overwrite)")
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="the frozen base's dtype (adapters stay fp32); auto: bf16 where there are bf16 matrix units")
adapter_flags = parser.add_argument_group("the adapter to train (GateRAConfig's fields; not with --eval-only)")
config_flags(adapter_flags)  # --method, --rank, --alpha, --dropout, --gate, ...
training = parser.add_argument_group("training (not with --eval-only)")
training.add_argument("--entropy-weight", type=NONNEGATIVE, default=0.01, help="lambda, weight of the gate entropy")
training.add_argument("--lr", type=POSITIVE, default=None, help="peak learning rate (default: LR by method, below)")
training.add_argument("--weight-decay", type=NONNEGATIVE, default=0.0)
training.add_argument("--epochs", type=POSITIVE_INT, default=None, help="passes over the examples (default 3, CPU 1)")
training.add_argument("--max-steps", type=COUNT, default=0, help="stop after this many optimizer steps (0: epochs)")
training.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="examples per step, over all processes")
training.add_argument("--grad-accum", type=POSITIVE_INT, default=1, help="micro-batches per step (the same gradient)")
training.add_argument("--micro-batch-tokens", type=POSITIVE_INT, default=None, help="at most this many padded "
                      "tokens per micro-batch (bounds memory; see micro_batches; default: 1024 bf16, 512 fp32)")
training.add_argument("--warmup", type=COUNT, default=None, help="linear warmup steps (default: a tenth of the run, <= 100)")
training.add_argument("--grad-clip", type=NONNEGATIVE, default=1.0, help="clip the gradient norm to this (0: no clip)")
training.add_argument("--cutoff", type=number(int, low=2), default=256, help="max tokens per training example")
training.add_argument("--train-on-inputs", action="store_true", help="loss on the prompt too (LLM-Adapters, DoRA)")
training.add_argument("--train-prompt", default="eval", choices=["eval", "reference"],
                      help="label format's training prompt bytes: the evaluation prompt, or LLM-Adapters' variant")
training.add_argument("--time-budget", type=duration, default=None,
                      help="the whole command's time (90s, 10m, 1.5h; CPU default 30m): as many examples as fit")
training.add_argument("--train-examples", type=COUNT, default=None, help="random subset (default 0: all)")
training.add_argument("--skip-eval-before", action="store_true", help="no evaluation before training (= zero-shot)")
training.add_argument("--eval-interval", type=COUNT, default=0, help="also evaluate every N steps, into log.jsonl")
training.add_argument("--resume", action="store_true", help="continue the run in --out from <out>/ckpt.pt")
training.add_argument("--overwrite", action="store_true", help=f"start over: delete --out's {', '.join(RUN_FILES)}")
training.add_argument("--ckpt-interval", type=POSITIVE_INT, default=50, help="checkpoint every N steps")
training.add_argument("--log-interval", type=POSITIVE_INT, default=10, help="a log line every N steps")
training.add_argument("--compile", action="store_true", help="torch.compile the model")
training.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
TRAINING_ONLY = {a.dest for group in (adapter_flags, training) for a in group._group_actions}  # not with --eval-only

LR = {"hira": 1e-3, "lora": 3e-4, "dora": 2e-4}  # the papers' peak learning rates, the default of --lr
# no budget flag: a CPU run ends within 30 minutes, as many examples as fit (budget.py); a GPU run: the papers' budget
CPU_BUDGET = {"time_budget": 30 * 60, "epochs": 1, "eval_examples": 0}
PAPER_BUDGET = {"train_examples": 0, "epochs": 3, "eval_examples": 0}

# -----------------------------------------------------------------------------
# setup: the device, torchrun, the dtype, the defaults that depend on them; the schedule


def say(text):
    """print, on the first process only (under torchrun every process runs this file); None: nothing."""
    if text is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(text, flush=True)


def setup(args):
    """The device (and, under torchrun, the process group), the frozen base's dtype and why, and what
    depends on them: the budget preset and the lr. Returns (rank, world, device, dtype, why, preset)."""
    rank, world = 0, 1
    device = pick_device(args.device)  # a device this machine lacks fails here, first
    args.device = str(device)
    if "RANK" in os.environ:  # launched by torchrun
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if device.type == "cuda":
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
            device = torch.device(args.device)
    dtype, why = pick_dtype(args.dtype, device)
    budget = dict(CPU_BUDGET if device.type == "cpu" else PAPER_BUDGET)
    if args.time_budget is not None or args.train_examples is not None or args.max_steps:  # how much: given
        budget = {k: v for k, v in budget.items() if k not in ("time_budget", "train_examples")}
    preset = [k for k in budget if getattr(args, k) is None]  # budget flags left to the preset
    for k in preset:
        setattr(args, k, budget[k])
    args.lr = args.lr or LR[args.method]
    args.micro_batch_tokens = args.micro_batch_tokens or 2048 // dtype.itemsize  # about the same activation bytes
    torch.manual_seed(args.seed)  # the adapter's init, dropout's masks, the ETA's timed steps
    return rank, world, device, dtype, why, preset


def training_steps(args, n_examples):
    """(steps per epoch, total steps): --max-steps, else --epochs passes over n_examples in batches of --batch-size."""
    steps_per_epoch = math.ceil(n_examples / args.batch_size)
    return steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch


def lr_at(step, args, total_steps):
    """Linear warmup to args.lr over --warmup steps (default: a tenth of the run, at most 100), then decay to 0."""
    warmup = args.warmup if args.warmup is not None else min(100, max(1, total_steps // 10))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


# -----------------------------------------------------------------------------
# a micro-batch's forward and backward


def forward_backward(step_model, batch, n_targets, n_real, entropy_weight, scale=1.0, recorder=None):
    """Forward and backward of one micro-batch (ids, labels, mask). Its loss is its share of the
    whole batch's means: summed over its tokens, divided by the batch's counts, times scale (the
    number of processes, as DDP averages their gradients; 0 for a stand-in). Returns (task loss sum,
    entropy sum, real tokens); a GateRecorder gets the gates on the prompt (prefill) and on the
    answer (scored: the tokens with a target, teacher-forced)."""
    ids, labels, mask = batch                                            # (B, T) each
    is_target = labels[:, 1:] != -100                                    # (B, T-1) -100: no loss
    gates = {}                                                           # the forward fills it: layer -> g (B, T)
    task_sum = step_model(ids, logits_at=F.pad(is_target, (0, 1), value=False), gates=gates,  # the sum of the
                          targets=labels[:, 1:][is_target])              # cross-entropies at the N targets
    entropy_sum = gate_entropy(gates, mask) * mask.sum()                 # mean over layers, summed over tokens
    (scale * (task_sum / n_targets + entropy_weight * entropy_sum / n_real)).backward()
    if recorder is not None:
        recorder.add(gates, torch.where(labels != -100, 1, torch.where(mask.bool(), 0, -1)), ids)  # kinds (B, T)
    return torch.stack([task_sum.detach(), entropy_sum.detach(), mask.sum().float()])


def forward_backward_all(step_model, micro, first, encoded, n_targets, n_real, pad_id, args, world, device,
                         recorder=None):
    """Forward and backward of this rank's micro-batches of one batch: their gradients add up to the
    batch's. Returns the batch's (task loss sum, entropy sum, real tokens), summed over all ranks."""
    ddp = torch.distributed.is_initialized()
    stats = torch.zeros(3, device=device)
    for m, mb in enumerate(micro):
        if not mb and not ddp:
            continue
        if ddp:  # only the last micro-batch all-reduces the gradients
            step_model.require_backward_grad_sync = m == len(micro) - 1
        weight = 1.0 if mb else 0.0  # 0: DDP's stand-in for an empty micro-batch (see micro_batches)
        batch = [t.to(device) for t in collate([encoded[i] for i in mb or first], pad_id)]
        stats += weight * forward_backward(step_model, batch, n_targets, n_real, args.entropy_weight, weight * world,
                                           recorder if mb else None)
    if ddp:
        torch.distributed.all_reduce(stats)
    return stats


# -----------------------------------------------------------------------------
# the training loop


def start_training(args, model, encoded, metrics, rank, world, device, timing, state=None):
    """(step_model, optimizer, step, log, costs) to start from: the checkpoint's (state, with --resume),
    else step 0, after checkpoint 0. step_model is what the steps call, in training mode; costs the
    modelled seconds of every step (budget.step_seconds, from timing), which the ETA scales."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)  # on the adapters' parameters alone
    step_model = model  # maybe a DDP or compiled wrapper; evaluation and checkpoints use model
    if torch.distributed.is_initialized():  # under torchrun
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        step_model = torch.compile(step_model)
    total_steps = training_steps(args, len(encoded))[1]
    ckpt_path, step, log = os.path.join(args.out, "ckpt.pt"), 0, []
    if state is not None:
        step, log, saved = resume(state, ckpt_path, args, model, optimizer, device)
        metrics.update(saved)
        say(f"resumed from {ckpt_path} at step {step}/{total_steps}")
    elif args.resume:
        say(f"--resume: no {ckpt_path} yet, starting from scratch")
    if step == 0 and rank == 0:
        write_checkpoint(args, step, model, optimizer, log, metrics, device)
    costs = step_seconds(encoded, args, world, total_steps, timing)
    say(f"training on {len(encoded)} examples: {total_steps} steps of {args.batch_size} examples, {world} process(es), "
        f"lr {args.lr:g}, entropy weight {args.entropy_weight:g}: about {hms(sum(costs[step:]))} (two timed micro-batches)")
    step_model.train()
    return step_model, optimizer, step, log, costs


def train(args, model, tok, encoded, tests, metrics, rank, world, device, timing, state=None):
    """Train the adapters from the start, or from the checkpoint `state` with --resume; returns the log.
    Step s takes batch s % steps_per_epoch of epoch s // steps_per_epoch: the order is a function
    of (seed, s) alone, so a resumed run goes on exactly as the uninterrupted one would. Ctrl-C ends
    the run with a line that says which checkpoint is kept (whole: it is written atomically)."""
    step_model, optimizer, step, log, costs = start_training(args, model, encoded, metrics, rank, world, device,
                                                             timing, state)
    (steps_per_epoch, total_steps), ckpt_path = training_steps(args, len(encoded)), os.path.join(args.out, "ckpt.pt")
    t0, tokens_seen, step0, epoch = time.time(), 0, step, None
    try:
        while step < total_steps:
            # the learning rate of this step
            lr = lr_at(step, args, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # this step's batch (new batches each epoch), cut into this rank's micro-batches
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                batches = length_grouped_batches([len(ids) for ids, _ in encoded], args.batch_size, args.seed + epoch)
            micro, n_targets, n_real, first = micro_batches(batches[step % steps_per_epoch], encoded, args.grad_accum,
                                                            args.micro_batch_tokens, rank, world)
            # forward and backward of each micro-batch: their gradients add up to the batch's
            logging = step + 1 in (1, total_steps) or (step + 1) % args.log_interval == 0
            recorder = GateRecorder() if logging else None
            stats = forward_backward_all(step_model, micro, first, encoded, n_targets, n_real, tok.pad_id, args,
                                         world, device, recorder)
            # a loss that is not finite stops the run before the update: the last checkpoint stays good
            task_loss, entropy = stats[0].item() / n_targets, stats[1].item() / n_real
            if not math.isfinite(task_loss + entropy):
                raise UserError(f"step {step + 1}: the loss is {task_loss + args.entropy_weight * entropy} (not "
                                f"finite); stopping. The last good checkpoint is {ckpt_path}: lower --lr or check "
                                "the data, then --resume")
            # clip the gradient (--grad-clip 0: not at all), update the adapters, clear the gradient
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, tokens_seen = step + 1, tokens_seen + stats[2].item()
            # log the losses, the gates and the speed
            if logging:
                elapsed = time.time() - t0
                log.append(step_record(step, task_loss, entropy, args.entropy_weight, recorder.summary(), lr,
                                       tokens_seen, elapsed, timing.flops_per_token / timing.matmul_flops_per_s))
                say(step_line(log[-1], total_steps, eta=eta(costs, step0, step, elapsed)))
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
    except KeyboardInterrupt:  # Ctrl-C: the checkpoint on disk is whole (written atomically); say which it is
        raise interrupted(step, ckpt_path, rank) from None
    return log


# -----------------------------------------------------------------------------
# the run: check, load, evaluate before, train, evaluate after, compare


def prepare(args, argv):
    """Every check that needs no model, before anything loads (checks.py): the flags together, the
    device (setup), the output folder, the checkpoint to resume, the adapter. Returns setup's values,
    then (the files --overwrite deletes, --eval-only's folder, the checkpoint or None, the adapter's config)."""
    check_flags(args, given(parser, argv), TRAINING_ONLY)
    return (*setup(args), *check_run(args))


def training_set(args, model, tok, encoded, tests, sizes, preset, device, world, t_start):
    """(the examples to train on, their budget.Timing: timing_model's micro-batch model and FLOPs, matmul_rate's
    FLOP/s). With a time budget (--time-budget, or the CPU preset): as many of encoded as fit in what is left of it
    after the evaluation after (estimated from a sample), chosen by the seed as --train-examples chooses; the budget
    line says what it chose of the train files (sizes: {task: examples}) and why. Call with the adapters at init."""
    def run(batch, n_targets, n_real):
        forward_backward(model, batch, n_targets, n_real, args.entropy_weight)
    timing = Timing(*timing_model(run, encoded, tok.pad_id, device, args),
                    matmul_rate(model.config, device, model.lm_head.weight.dtype))
    model.zero_grad(set_to_none=True)
    why = ""
    if args.time_budget is not None and args.train_examples is None:  # None: not chosen yet (--resume: chosen)
        eval_after_s, timed = evaluation_seconds(model, tok, tests, args, device)
        spent = time.time() - t_start
        n, per_example = fit_examples(args, encoded, world, timing, args.time_budget - spent - eval_after_s)
        if torch.distributed.is_initialized():  # the first process's choice, for all
            torch.distributed.broadcast_object_list(chosen := [n], src=0)
            n = chosen[0]
        args.train_examples, encoded = n, [encoded[i] for i in subset(len(encoded), n, args.seed)]
        why = (f" to end within {hms(args.time_budget)}: {hms(spent)} spent so far, the evaluation after about "
               f"{hms(eval_after_s)} ({timed} questions timed), {per_example:.2f} s an example")
    total_steps = training_steps(args, len(encoded))[1]
    if preset or why:  # the budget flags left to the CPU or GPU preset, or --time-budget: say what they chose
        by = f"{device.type} preset for {', '.join('--' + k.replace('_', '-') for k in preset)}" if preset else "--time-budget"
        say(f"budget ({by}): {len(encoded)} of {sum(sizes.values())} train examples{union_note(sizes)} x {args.epochs} "
            f"epoch(s) = {total_steps} steps of {args.batch_size}; {sum(map(len, tests.values()))} test examples{why}")
    say(check_training_set(args, encoded, total_steps))  # a notice if --warmup is as long as the run
    return encoded, timing


def main(argv=None):
    t_start = time.time()  # the whole command's time: --time-budget counts it, metrics.json's wall_s reports it
    args = parser.parse_args(argv)
    rank, world, device, dtype, why, preset, doomed, eval_dir, state, cfg = prepare(args, argv)
    say(f"{device}: frozen base in {str(dtype).removeprefix('torch.')} ({why}); "
        "adapters, optimizer and loss in float32")
    say(eval_dir and f"--eval-only: writing to {eval_dir}")
    if state is not None and args.time_budget is not None:  # --resume: the examples its time budget chose
        args.train_examples = state["args"]["train_examples"]

    # the pretrained model, and the adapter: the one to evaluate (--eval-only), else the one to train
    model = load_pretrained(args.model, dtype=dtype).to(device).requires_grad_(False)
    model.gradient_checkpointing = args.grad_checkpointing
    tok = load_tokenizer(args.model)
    cfg = load_adapter(model, args.adapter) if args.eval_only and cfg is not None else cfg
    target_layers(model, () if args.eval_only else cfg.target_modules)  # a --target-modules name it lacks fails now
    what = "no adapter" if cfg is None else f"{cfg.method} r={cfg.rank} gate={cfg.gate}"
    say(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters | {what} | {args.format} format")
    tests = load_tests(args)
    if rank == 0 and doomed:  # --overwrite: the old run's files go just before the first write
        say(delete_run(args.out, doomed))
    os.makedirs(eval_dir or args.out, exist_ok=True)
    metrics = {"task": args.task, "model": args.model, "method": cfg and cfg.method, "gate": cfg and cfg.gate,
               "entropy_weight": args.entropy_weight, "format": args.format, "eval_mode": args.eval,
               "dtype": str(dtype).removeprefix("torch."), "n_eval": sum(map(len, tests.values())), "args": vars(args)}
    if args.eval_only:  # beside the run in --out, never over it
        say(evaluate_after(args, model, tok, tests, None, [], metrics, device, what, t_start, eval_dir))
        return metrics

    # the training examples: --train-examples of them, or all (a time budget chooses among them below)
    sizes, encoded = load_training(args, tok)
    check_training_set(args, encoded)  # no answer token within --cutoff: an error before any long work

    # the pretrained model's score, then the adapters (at init, B = 0: the adapted model equals it)
    before = {}
    if rank == 0 and not args.skip_eval_before and state is None:
        _, before, lines = evaluate_tasks("before", model, tok, tests, args, device, metrics, what)
        say("\n".join(lines))
    apply_gatera(model, cfg)
    n_adapter, n_total = (sum(p.numel() for p in model.parameters() if p.requires_grad or all_) for all_ in (0, 1))
    say(f"{n_adapter / 1e6:.3f}M trainable parameters ({100 * n_adapter / n_total:.3f}% of {n_total / 1e6:.1f}M)")

    encoded, timing = training_set(args, model, tok, encoded, tests, sizes, preset, device, world, t_start)
    metrics.update(n_train=len(encoded), flops_per_token=timing.flops_per_token, matmul_flops_per_s=timing.matmul_flops_per_s)
    log = train(args, model, tok, encoded, tests, metrics, rank, world, device, timing, state)

    # evaluate after, test the difference against before, write the adapter and the metrics
    if rank == 0:
        save_adapter(model, os.path.join(args.out, "adapter"), args.model)
        say(evaluate_after(args, model, tok, tests, before, log, metrics, device, what, t_start))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    run(main)
