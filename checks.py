"""
The checks train.py makes before any long work starts: an extra that a learner may skip.

Flags that mean nothing together, the output folder (no run writes over another: an --out that
holds a run needs --resume to continue it or --overwrite to start over; --eval-only writes beside
it, into <out>/eval-<n>/), and what only the encoded training set can show. Each failure is a
cli.UserError whose message says what to do; the numbers of single flags are checked earlier still,
by cli's argparse types.
"""

import os
import shutil

from checkpoints import check_adapter, check_resume, read_checkpoint
from cli import UserError, first_free, writable_folder
from gatera import config_from_args

RUN_FILES = ("ckpt.pt", "metrics.json", "log.jsonl", "adapter", "before", "after")  # what a run writes in --out


def check_flags(args, given, training_only):
    """Refuse flags that mean nothing in this combination. given: the flags written on the command
    line (cli.given); training_only: the flags that --eval-only would ignore."""
    extra = sorted(given & training_only) if args.eval_only else []
    if extra:
        raise UserError(f"--eval-only trains nothing, so {', '.join('--' + k.replace('_', '-') for k in extra)} "
                        f"would be ignored: leave {'it' if len(extra) == 1 else 'them'} out")
    if args.adapter and not args.eval_only:
        raise UserError(f"--adapter {args.adapter} names the adapter that --eval-only evaluates: add --eval-only to "
                        "score it; to train a new adapter, leave --adapter out")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if args.format == "cloze" and args.eval == "generate":
        raise UserError("--eval generate is for --format label: a cloze is scored, not generated")
    if args.grad_accum > args.batch_size:
        raise UserError(f"--grad-accum {args.grad_accum} cuts each batch of --batch-size {args.batch_size} into more "
                        "micro-batches than it has examples: take --grad-accum <= --batch-size")
    how_much = [f for f, given_ in (("--train-examples", args.train_examples is not None), ("--max-steps", args.max_steps))
                if given_]  # --max-steps 0 is its default: the epochs decide
    if args.time_budget is not None and how_much:
        raise UserError(f"--time-budget chooses how many examples to train on, and {' and '.join(how_much)} "
                        f"{'says' if len(how_much) == 1 else 'say'} it too, so one would be ignored: give one of them")
    if args.train_examples and args.train_examples < args.batch_size:
        raise UserError(f"--train-examples {args.train_examples} is less than one batch (--batch-size "
                        f"{args.batch_size}): take at least {args.batch_size}, or 0 for all")


def check_visualize(args, cfg):
    """--visualize draws gates: refuse it where there are none (no adapter, or gate none)."""
    if args.visualize and (cfg is None or cfg.gate == "none"):
        what = "the bare model" if cfg is None else f"{args.adapter or 'an adapter'} with gate none"
        raise UserError(f"--visualize shows the gates, but {what} has none: leave --visualize out, or "
                        + ("evaluate a gated --adapter" if args.eval_only else "train a gate (--gate token or static)"))


def check_out(args):
    """The folder policy: --out must be a folder this process can write in. A training run refuses
    one that holds a run unless --resume (continue it) or --overwrite (start over: returns the run's
    files, which train.py deletes just before it writes); --resume with no ckpt.pt may only find before/
    (a run stopped before its first checkpoint). --eval-only writes beside the run, into <out>/eval-<n>
    with n the first free number. Returns (the files to delete, the folder of --eval-only)."""
    writable_folder(args.out, "--out")
    if args.eval_only:
        return [], first_free(os.path.join(args.out, "eval-{}"))
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if args.resume and "ckpt.pt" not in found and set(found) - {"before"}:
        raise UserError(f"--resume: {args.out} holds a run ({', '.join(found)}) but no ckpt.pt to continue it from: "
                        "start over with --overwrite (deletes those), or give another --out")
    if found and not (args.resume or args.overwrite):
        raise UserError(f"--out {args.out} holds a run ({', '.join(found)}): continue it with --resume, start over "
                        "with --overwrite (deletes those), or give another --out")
    return found if args.overwrite else [], None


def check_run(args):
    """What the run starts from, checked: the output folder (check_out), the checkpoint that --resume
    continues (read and compared with these flags), the adapter (--eval-only's, or the one to train).
    Returns (the files --overwrite deletes, --eval-only's folder, the checkpoint or None, the adapter's
    config: None for --eval-only on the bare model)."""
    doomed, eval_dir = check_out(args)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    state = read_checkpoint(ckpt_path) if args.resume and os.path.exists(ckpt_path) else None
    if state is not None:
        check_resume(state, ckpt_path, args)  # the same flags as the run it continues
    if args.eval_only:
        cfg = check_adapter(args.adapter) if args.adapter else None  # None: the pretrained model alone
    else:
        cfg = config_from_args(args)
    check_visualize(args, cfg)
    return doomed, eval_dir, state, cfg


def delete_run(out, files):
    """--overwrite: delete exactly the run's files in out (anything else there stays); returns the line to say."""
    for f in files:
        path = os.path.join(out, f)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return f"--overwrite: deleted {', '.join(files)} in {out}"


def check_training_set(args, encoded, total_steps=None):
    """What only the encoded training set shows: a --cutoff that leaves no answer token in any example
    (nothing to learn: an error), and a run of total_steps no longer than its --warmup (a notice,
    returned: no decay)."""
    if not any(y != -100 for _, labels in encoded for y in labels[1:]):  # the first token is never a target
        raise UserError(f"--cutoff {args.cutoff}: no training example keeps a token of its answer within the "
                        "cutoff, so there is nothing to learn: raise --cutoff")
    if total_steps is not None and args.warmup is not None and args.warmup >= total_steps:  # a given --warmup
        top = args.lr * total_steps / args.warmup  # the last step's learning rate, still in the warmup
        reached = f"reaches the peak --lr {args.lr:g} only at the last step" if top >= args.lr else \
            f"never reaches the peak --lr {args.lr:g} (at most {top:.3g})"
        return (f"notice: --warmup {args.warmup} is not shorter than the run's {total_steps} steps: the learning "
                f"rate {reached} and never decays; a smaller --warmup gives warmup, then decay")
    return None
