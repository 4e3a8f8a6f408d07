"""
An extra: how long a training run takes, measured on this machine: the timing model behind train.py's
ETA and its --time-budget (the CPU preset: the whole command in about 30 minutes on any CPU).

A micro-batch of n padded tokens takes about fixed + per_token * n seconds of forward and backward,
timed on two real micro-batches; a step costs the sum of its micro-batches, cut as the loop cuts them.
The batches of every step are known in advance (their order is a function of the seed), so the
model prices the whole run before it starts. The loop's ETA scales the cost of the steps still to
run by what the steps so far took against their cost: what the timed micro-batches miss (the
optimizer, the log, new shapes, memory first touched) is in that ratio, and a run of short or long
batches early on does not skew it, as a plain "seconds per step so far" would. What none of this
sees is a run that slows as it goes: on a 2-core AMD EPYC the default run slowed by a quarter over its
614 steps, and the budget and the ETA at step 50 came out 29 % and 16 % short (docs/results.md).
"""

import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cli import UserError
from data import collate, length_grouped_batches, micro_batches, part_size, token_counts
from evaluate import evaluate, hms


class Timing(NamedTuple):
    """What a run's time is made of on this machine: a micro-batch of n padded tokens takes fixed +
    per_token * n seconds; a real token's forward and backward run flops_per_token matmul FLOPs; the
    model's matmuls reach matmul_flops_per_s here."""
    fixed: float
    per_token: float
    flops_per_token: float
    matmul_flops_per_s: float


def sync(device):
    """Wait for the device (a GPU runs asynchronously), so that a clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def addmm_flops(input_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    """FlopCounterMode's missing formula for the in-place addmm_ (fused.add_linear): (m, k) @ (k, n)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def matmul_flops(fn):
    """The matmul FLOPs that fn() runs (forward and backward), as torch's FlopCounterMode counts them,
    attention left out (the counter does not see CPU flash attention; on a GPU it would)."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flops}) as counter:
        fn()
    return sum(v for op, v in counter.get_flop_counts().get("Global", {}).items() if "attention" not in str(op))


def matmul_rate(config, device, dtype, tokens=1024, reps=10):
    """FLOP/s of this machine's matmuls at the model's own shapes (tokens x n_embd -> mlp_hidden, back,
    n_embd -> n_embd and -> the k/v width), 2 FLOPs a multiply-add, each shape's time the median of
    `reps` calls after two untimed ones: what a training step's FLOPs are measured against, as a GPU's
    MFU is against its peak."""
    C, H, kv = config.n_embd, config.mlp_hidden, config.n_kv_head * config.head_dim
    flops, seconds = 0, 0.0
    for n_in, n_out in ((C, H), (H, C), (C, C), (C, kv)):
        x, w = torch.randn(tokens, n_in, device=device, dtype=dtype), torch.randn(n_out, n_in, device=device, dtype=dtype)
        times = []
        for _ in range(reps + 2):  # the first calls build the kernel and touch the memory
            sync(device)
            t = time.time()
            F.linear(x, w)
            sync(device)
            times.append(time.time() - t)
        flops, seconds = flops + 2 * tokens * n_in * n_out, seconds + sorted(times[2:])[reps // 2]
    return flops / seconds


def timing_model(run, encoded, pad_id, device, args):
    """(fixed, per_token, flops_per_token): a micro-batch of n padded tokens takes fixed + per_token * n
    seconds. Timed on a micro-batch of median-length examples, as the loop cuts it, and on its first
    half (two sizes twice apart: the slope is well defined whatever --micro-batch-tokens does), the
    second run of each (the first touches new memory); run(batch, n_targets, n_real) is the forward and
    backward. flops_per_token: the matmul FLOPs (matmul_flops) of the whole micro-batch's forward and
    backward per real token. The RNG is left as it was; the caller clears the gradients."""
    by_length, timed, start = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0])), [], len(encoded) // 2
    longest = len(encoded[by_length[min(start + args.batch_size, len(encoded)) - 1]][0])  # in a batch from there
    whole = by_length[start:][:part_size(args.batch_size, longest, args.grad_accum, args.micro_batch_tokens)]
    for mb in (whole, whole[:max(1, len(whole) // 2)]):                  # timed: (padded tokens, seconds)
        batch = [t.to(device) for t in collate([encoded[i] for i in mb], pad_id)]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for _ in range(2):
                sync(device)
                t = time.time()
                run(batch, *token_counts(mb, encoded))
                sync(device)
                t = time.time() - t
            if not timed:  # the whole micro-batch: its FLOPs
                flops_per_token = matmul_flops(lambda: run(batch, *token_counts(mb, encoded))) / token_counts(mb, encoded)[1]
        timed.append((batch[0].numel(), t))
    (n_long, t_long), (n_short, t_short) = timed
    per_token = max(t_long - t_short, 0) / max(n_long - n_short, 1)
    return max(t_short - per_token * n_short, 0.0), per_token, flops_per_token


def step_seconds(encoded, args, world, total_steps, timing):
    """The modelled seconds of each of total_steps steps over encoded: step s takes batch s % (steps
    per epoch) of its epoch, as train.train does, cut into the first rank's micro-batches."""
    fixed, per_token = timing.fixed, timing.per_token
    lengths, steps_per_epoch, costs = [len(ids) for ids, _ in encoded], math.ceil(len(encoded) / args.batch_size), []
    for s in range(total_steps):
        if s % steps_per_epoch == 0:
            batches = length_grouped_batches(lengths, args.batch_size, args.seed + s // steps_per_epoch)
        micro = micro_batches(batches[s % steps_per_epoch], encoded, args.grad_accum, args.micro_batch_tokens, 0,
                              world)[0]
        costs.append(sum(fixed + per_token * len(mb) * max(lengths[i] for i in mb) for mb in micro if mb))
    return costs


def eta(costs, step0, step, elapsed):
    """Seconds still to go after `step`, the steps from step0 having taken `elapsed`: the modelled cost
    of the steps left, scaled by what the steps so far took against their modelled cost."""
    return elapsed * sum(costs[step:]) / max(sum(costs[step0:step]), 1e-9)


def evaluation_seconds(model, tok, tests, args, device, sample=32):
    """About how long the evaluation of tests takes with this model: the first `sample` items of each
    task scored and timed, scaled to all of them."""
    sync(device)
    t, timed = time.time(), 0
    for task, items in tests.items():
        evaluate(model, tok, task, items[:sample], args.format, args.eval, args.eval_batch_size, device)
        timed += len(items[:sample])
    sync(device)
    return (time.time() - t) * sum(map(len, tests.values())) / timed, timed


def fit_examples(args, encoded, world, timing, left_s):
    """How many of the encoded examples --epochs passes fit into left_s seconds of training, at the
    modelled cost of an example (one epoch over all of them, divided by their number); a budget that
    leaves less than one step is a UserError."""
    steps_per_epoch = math.ceil(len(encoded) / args.batch_size)
    per_example = sum(step_seconds(encoded, args, world, steps_per_epoch, timing)) / len(encoded)
    n = min(len(encoded), int(left_s / (args.epochs * per_example)))
    if n < args.batch_size:
        raise UserError(f"--time-budget {hms(args.time_budget)} leaves {hms(max(left_s, 0))} for training after "
                        f"loading and the evaluations, less than one step of {args.batch_size} examples (about "
                        f"{args.batch_size * per_example:.0f} s here): give a longer budget, or --eval-examples to "
                        "evaluate fewer questions")
    return n, per_example
