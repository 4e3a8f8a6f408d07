"""
Fine-tune a pretrained GPT-2 / Llama with GateRA on a commonsense task, then evaluate it.

    python train.py --task piqa                                  # GPT-2, gated HiRA, all defaults
    python train.py --task piqa --model model.gguf --data-dir ../shared/data/llm_adapters \
        --train-examples 1000 --eval-examples 500               # a quick CPU run with local files
    torchrun --standalone --nproc_per_node=2 train.py --task piqa   # data parallel

Loss = cross-entropy on the response tokens + lambda * mean gate entropy over real tokens.
Accuracy is measured before and after training; the output folder gets the adapter, log.jsonl,
metrics.json and a checkpoint that --resume continues from.
"""

import argparse
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from data import (LABELS, collate, collate_prompts, encode_example, encode_examples, extract_answer,
                  label_choices, load_task, load_tokenizer)
from gatera import (GateRAConfig, adapted_layers, adapter_state_dict, apply_gatera, atomic_write,
                    gate_entropy, load_adapter, save_adapter)
from model import GPT, KVCache

# -----------------------------------------------------------------------------
# flags (REFERENCE section 6 gives the papers' settings: r 32, alpha 64, lr 3e-4 LoRA, 1e-3 HiRA)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--task", default="piqa", help=f"one of {', '.join(LABELS)}, or commonsense_170k / commonsense_15k")
parser.add_argument("--model", default="gpt2", help="Hub id, local Hugging Face folder, or .gguf file")
parser.add_argument("--data-dir", default=None, help="local LLM-Adapters files (dataset/<task>/...), no download")
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
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs)")
parser.add_argument("--batch-size", type=int, default=4, help="micro-batch per process")
parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step over all processes")
parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then linear decay to 0")
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--cutoff", type=int, default=256, help="max tokens per training example")
parser.add_argument("--train-on-inputs", action="store_true", help="loss on the prompt too (LLM-Adapters, DoRA)")
parser.add_argument("--train-prompt", default="eval", choices=["eval", "reference"],
               help="training prompt bytes: the evaluation prompt, or LLM-Adapters' training variant")
parser.add_argument("--train-examples", type=int, default=0, help="random subset of the training set (0: all)")
parser.add_argument("--eval-examples", type=int, default=0, help="random subset of the test set (0: all)")
parser.add_argument("--eval", default="score", choices=["score", "generate"],
               help="score: log-likelihood of each label; generate: greedy answer + extraction")
parser.add_argument("--eval-batch-size", type=int, default=16)
parser.add_argument("--eval-only", action="store_true", help="evaluate --adapter (or the bare model), no training")
parser.add_argument("--adapter", default=None, help="adapter folder to evaluate with --eval-only")
parser.add_argument("--skip-eval-before", action="store_true", help="no evaluation before training (it equals zero-shot)")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--out", default="out", help="output folder")
parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
parser.add_argument("--ckpt-interval", type=int, default=50, help="checkpoint every N steps")
parser.add_argument("--log-interval", type=int, default=10)
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
               help="compute dtype (auto: bf16 autocast on CUDA, fp32 elsewhere); weights stay fp32")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")

# -----------------------------------------------------------------------------
# evaluation


def hms(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(max(0, seconds)))


def progress(what, done, total, t0):
    rate = done / max(time.time() - t0, 1e-9)
    print(f"{what}: {done}/{total} | {rate:.1f}/s | {hms(time.time() - t0)} elapsed, "
          f"ETA {hms((total - done) / max(rate, 1e-9))}", file=sys.stderr)


def record_gates(model, where, sums):
    """Add the gates of the last forward at positions `where` (B, T) bool to sums = [total, count]."""
    for _, layer in adapted_layers(model):
        if layer.last_gate is not None:
            sums[0] += layer.last_gate.float()[where].sum().item()
            sums[1] += where.sum().item()


def common_prefix(seqs):
    """Length of the longest common prefix of lists."""
    n = 0
    while all(len(q) > n for q in seqs) and len({q[n] for q in seqs}) == 1:
        n += 1
    return n


@torch.no_grad()
def score_batch(model, tok, task, batch, device, autocast, gate_sums, loss_sums):
    """Log-likelihood scoring: each offered label's continuation ("the correct answer is <label>")
    gets score = sum of log p(its response tokens | prompt); the highest score is the answer.
    The prompt is shared by all labels of an example, so it runs once and its KV cache is reused
    for every label's few remaining tokens. Returns the number correct; adds to loss_sums, for the
    correct continuations, the NLL and token count of their response tokens ("answer") and of the
    tokens that tell the labels apart ("label", e.g. "1" of "solution1": the response minus the
    common format words)."""
    choices = []  # per example: [(label, ids, first response position)]
    for ex in batch:
        rows = []
        for label, text in label_choices(task, ex["instruction"]).items():
            ids, labels = encode_example(tok, {"instruction": ex["instruction"], "output": text}, cutoff=10**9)
            rows.append((label, ids[:-1], labels.index(next(y for y in labels if y != -100))))  # drop EOS
        choices.append(rows)
    # the context: the tokens before the first response token that every label's sequence shares
    shared = [common_prefix([ids for _, ids, _ in rows]) for rows in choices]  # label tokens start here
    starts = [min(min(start for _, _, start in rows), n) for rows, n in zip(choices, shared)]
    ctx = [rows[0][1][:s] for rows, s in zip(choices, starts)]
    ids = torch.tensor([[tok.pad_id] * (max(map(len, ctx)) - len(c)) + c for c in ctx], device=device)  # (B, Tc)
    mask = (torch.arange(ids.shape[1], device=device) >= ids.shape[1] - torch.tensor([len(c) for c in ctx],
            device=device)[:, None]).long()                          # (B, Tc) left padding
    cache = [KVCache() for _ in model.transformer.h]
    with autocast:
        first = F.log_softmax(model(ids, mask=mask, cache=cache, logits_at=-1).float(), -1)  # (B, V) next token
    record_gates(model, mask.bool(), gate_sums["prompt"])
    best = [(None, -math.inf)] * len(batch)
    for c in range(max(map(len, choices))):  # the c-th label of every example in one batch
        tails = [rows[c][1][s:] if c < len(rows) else [tok.pad_id] for rows, s in zip(choices, starts)]
        T = max(map(len, tails))
        tail_ids = torch.tensor([t + [tok.pad_id] * (T - len(t)) for t in tails], device=device)  # (B, T)
        tail_mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in tails], device=device)
        forked = [KVCache() for _ in cache]  # update() concatenates into new tensors: the shared cache stays intact
        for f, k in zip(forked, cache):
            f.k, f.v = k.k, k.v
        with autocast:
            logits = model(tail_ids, mask=torch.cat([mask, tail_mask], 1), cache=forked).float()  # (B, T, V)
        logp = torch.cat([first[:, None], F.log_softmax(logits[:, :-1], -1)], 1)  # (B, T, V) predicts tail t
        response = torch.tensor([[s + j >= rows[min(c, len(rows) - 1)][2] and j < len(t) for j in range(T)]
                                 for rows, s, t in zip(choices, starts, tails)], device=device)  # (B, T)
        token_logp = logp.gather(-1, tail_ids[..., None])[..., 0] * response  # (B, T) log p of response tokens
        label = response & (torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
                            >= torch.tensor(shared, device=device)[:, None])  # (B, T) past the shared words
        record_gates(model, response, gate_sums["answer"])
        for b, (rows, ex) in enumerate(zip(choices, batch)):
            if c < len(rows):
                score = token_logp[b].sum().item()
                if score > best[b][1]:
                    best[b] = (rows[c][0], score)
                if rows[c][0] == ex["answer"]:
                    loss_sums["answer"][0] -= score
                    loss_sums["answer"][1] += response[b].sum().item()
                    loss_sums["label"][0] -= (token_logp[b] * label[b]).sum().item()
                    loss_sums["label"][1] += label[b].sum().item()
    return sum(answer == ex["answer"] for (answer, _), ex in zip(best, batch))


@torch.no_grad()
def evaluate(model, tok, task, examples, args, device, autocast):
    """Accuracy on examples, plus (score mode) the mean loss on the correct answer's response tokens
    and on its label tokens (see score_batch), and the mean gate on prompt vs answer tokens (the
    paper sees gates near 0 on the prompt)."""
    model.eval()
    correct, t0 = 0, time.time()
    loss_sums = {"answer": [0.0, 0], "label": [0.0, 0]}  # [NLL, tokens]
    gate_sums = {"prompt": [0.0, 0], "answer": [0.0, 0]}  # [sum of gates, count]
    bs = args.eval_batch_size
    for i in range(0, len(examples), bs):
        batch = examples[i:i + bs]
        if args.eval == "generate":
            ids, mask = collate_prompts(tok, [ex["instruction"] for ex in batch])
            out = model.generate(ids.to(device), 32, mask=mask.to(device), eos_id=tok.eos_id)
            for ex, new in zip(batch, out[:, ids.shape[1]:].tolist()):
                new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
                correct += extract_answer(task, tok.decode(new)) == ex["answer"]
        else:
            correct += score_batch(model, tok, task, batch, device, autocast, gate_sums, loss_sums)
        if (i // bs) % 10 == 9 or i + bs >= len(examples):
            progress(f"eval {task}", min(i + bs, len(examples)), len(examples), t0)
    model.train()
    return {"accuracy": correct / max(len(examples), 1),
            **{f"{k}_loss": s / n if n else None for k, (s, n) in loss_sums.items()},
            **{f"gate_{k}": s / n if n else None for k, (s, n) in gate_sums.items()}}


def interval95(acc, n):
    """Wilson score interval for an accuracy over n examples."""
    z = 1.96
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def subset(items, n, seed):
    """A random subset of n items (all if n is 0), the same for every run with this seed."""
    if not n or n >= len(items):
        return items
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n]
    return [items[i] for i in sorted(order.tolist())]


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


# -----------------------------------------------------------------------------
# setup


def main(argv=None):
    args = parser.parse_args(argv)
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
    master = rank == 0
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    args.dropout = (0.0 if args.method == "hira" else 0.05) if args.dropout is None else args.dropout
    args.lr = args.lr or {"hira": 1e-3, "lora": 3e-4, "dora": 2e-4}[args.method]
    torch.manual_seed(args.seed)
    say = print if master else (lambda *a, **k: None)

    model = GPT.from_pretrained(args.model)
    tok = load_tokenizer(args.model)
    cfg = GateRAConfig(method=args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                       rslora=args.rslora, gate=args.gate, gate_init_std=args.gate_init_std,
                       gate_init_bias=args.gate_init_bias, targets=args.targets)
    model.requires_grad_(False)
    if args.eval_only and args.adapter:
        cfg = load_adapter(model, args.adapter)
        args.method, args.rank, args.gate = cfg.method, cfg.rank, cfg.gate
    elif args.eval_only:
        args.method = args.gate = "none"  # the pretrained model alone: nothing is adapted
    else:
        apply_gatera(model, cfg)
    model.to(device)
    model.gradient_checkpointing = args.grad_checkpointing
    raw_model = model  # model may become a DDP / compiled wrapper below; evaluation and saving use raw_model
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    what = "no adapter" if args.method == "none" else f"{args.method} r={args.rank} gate={args.gate}"
    say(f"{args.model}: {n_total / 1e6:.1f}M parameters, {n_adapter / 1e6:.3f}M trainable "
        f"({100 * n_adapter / n_total:.3f}%) | {what} | {device} {dtype}")

    eval_tasks = [args.task] if args.task in LABELS else list(LABELS)
    tests = {t: subset(load_task(t, "test", args.data_dir), args.eval_examples, args.seed) for t in eval_tasks}
    os.makedirs(args.out, exist_ok=True)
    metrics = {"task": args.task, "model": args.model, "method": args.method, "gate": args.gate,
               "entropy_weight": args.entropy_weight, "eval_mode": args.eval,
               "n_eval": sum(map(len, tests.values())), "args": vars(args)}

    def run_eval(when):
        results = {t: evaluate(raw_model, tok, t, exs, args, device, autocast) for t, exs in tests.items()}
        acc = sum(r["accuracy"] * len(tests[t]) for t, r in results.items()) / metrics["n_eval"]
        lo, hi = interval95(acc, metrics["n_eval"])
        metrics.update({f"accuracy_{when}": acc, f"accuracy_{when}_95": [lo, hi], f"eval_{when}": results})
        text = f"accuracy {when}: {acc:.4f} (95% interval {lo:.4f}-{hi:.4f}, {metrics['n_eval']} examples)"
        for k in ("answer", "label"):  # averaged over the tasks
            loss = [r[f"{k}_loss"] for r in results.values() if r[f"{k}_loss"] is not None]
            metrics[f"{k}_loss_{when}"] = sum(loss) / len(loss) if loss else None
            text += f" | {k} loss {metrics[f'{k}_loss_{when}']:.4f}" if loss else ""
        say(text)

    t_start = time.time()
    if args.eval_only:
        run_eval("after")
        metrics["wall_s"] = time.time() - t_start
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        return metrics

    # ---------------------------------------------------------------------
    # training data and schedule: step s takes global batch s % steps_per_epoch of the
    # permutation of epoch s // steps_per_epoch, so the order is a function of (seed, s) alone

    train = subset(load_task(args.task, "train", args.data_dir), args.train_examples, args.seed)
    encoded = encode_examples(tok, train, name=f"{args.task} train", cutoff=args.cutoff,
                              train_on_inputs=args.train_on_inputs, variant=args.train_prompt)
    global_batch = args.batch_size * args.grad_accum
    steps_per_epoch = math.ceil(len(encoded) / global_batch)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    metrics["n_train"] = len(encoded)

    def global_batch_at(step):
        perm = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(args.seed + step // steps_per_epoch))
        k = step % steps_per_epoch
        return perm[k * global_batch:(k + 1) * global_batch].tolist()

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - args.warmup))

    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    step, log = 0, []
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        same = {k: v for k, v in ckpt["args"].items() if k not in ("resume", "out", "device", "eval_only")}
        changed = {k: (v, vars(args)[k]) for k, v in same.items() if vars(args).get(k) != v}
        if changed:
            sys.exit(f"--resume: {ckpt_path} was made with other settings {changed}; use the same flags or another --out")
        for k, v in adapter_state_dict(raw_model).items():
            v.copy_(ckpt["adapter"][k])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"].cpu())
        step, log, metrics = ckpt["step"], ckpt["log"], ckpt["metrics"]
        say(f"resumed from {ckpt_path} at step {step}/{total_steps}")
    elif args.resume:
        say(f"--resume: no {ckpt_path} yet, starting from scratch")

    def save_checkpoint():
        if master:
            state = {"step": step, "adapter": adapter_state_dict(raw_model), "optimizer": optimizer.state_dict(),
                     "rng": torch.get_rng_state(), "log": log, "metrics": metrics, "args": vars(args)}
            atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
            atomic_write(log_path, lambda tmp: open(tmp, "w").write("".join(json.dumps(r) + "\n" for r in log)))

    if step == 0:
        if master and not args.skip_eval_before:
            run_eval("before")
        save_checkpoint()

    # ---------------------------------------------------------------------
    # training loop

    say(f"training on {len(encoded)} examples: {total_steps} steps of {global_batch} examples, "
        f"{world} process(es), lr {args.lr:g}, entropy weight {args.entropy_weight:g}")
    model.train()
    local_accum = args.grad_accum // world
    t0, tokens_seen, step0 = time.time(), 0, step
    while step < total_steps:
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = global_batch_at(step)
        # micro-batches rank, rank + world, ...: together the ranks cover the global batch exactly once
        micro = [idx[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.grad_accum)][rank::world]
        stats = torch.zeros(4, device=device)  # task loss, entropy, real tokens, micro-batches
        gates = []
        for m, mb in enumerate(micro):
            if not mb:
                continue
            ids, labels, mask = (t.to(device) for t in collate([encoded[i] for i in mb], tok.pad_id))
            if ddp:  # only the last micro-batch all-reduces the gradients
                model.require_backward_grad_sync = m == len(micro) - 1
            is_target = labels[:, 1:] != -100                               # (B, T-1) -100: no loss
            with autocast:  # logits only at positions whose next token is a target: (N, V)
                logits = model(ids, logits_at=F.pad(is_target, (0, 1), value=False))
            targets = labels[:, 1:][is_target]                              # (N,) those next tokens
            # mean over the target tokens; a micro-batch of examples cut before their response has none: 0
            task_loss = F.cross_entropy(logits.float(), targets, reduction="sum") / max(len(targets), 1)
            entropy = gate_entropy(raw_model, mask).to(device)
            loss = (task_loss + args.entropy_weight * entropy) / local_accum
            if not torch.isfinite(loss):
                sys.exit(f"step {step}: the loss is {loss.item()} (not finite); stopping. The last good checkpoint "
                         f"is {ckpt_path}: lower --lr or check the data, then --resume")
            loss.backward()
            stats += torch.stack([task_loss.detach(), entropy.detach(), mask.sum().float(), torch.ones((), device=device)])
            gates += [layer.last_gate.detach()[mask.bool()].float() for _, layer in adapted_layers(raw_model)
                      if layer.last_gate is not None]
        if ddp:
            torch.distributed.all_reduce(stats)
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += stats[2].item()

        if step == 1 or step % args.log_interval == 0 or step == total_steps:
            task_loss, entropy = (stats[:2] / stats[3]).tolist()
            g = torch.cat(gates) if gates else torch.zeros(0)
            elapsed = time.time() - t0
            rec = {"step": step, "loss": task_loss + args.entropy_weight * entropy, "task_loss": task_loss,
                   "entropy": entropy, "gate_mean": g.mean().item() if len(g) else None,
                   "gate_below_0.1": (g < 0.1).float().mean().item() if len(g) else None,
                   "gate_above_0.9": (g > 0.9).float().mean().item() if len(g) else None,
                   "lr": lr, "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
            log.append(rec)
            eta = elapsed / (step - step0) * (total_steps - step)
            gate_txt = (f" | gate {rec['gate_mean']:.3f} (<0.1 {rec['gate_below_0.1']:.0%}, >0.9 {rec['gate_above_0.9']:.0%})"
                        if len(g) else "")
            say(f"step {step}/{total_steps} | loss {rec['loss']:.4f} | task {task_loss:.4f} | H {entropy:.4f}{gate_txt} | "
                f"lr {lr:.2e} | {rec['tokens_per_s']:.0f} tok/s | {hms(elapsed)} elapsed, ETA {hms(eta)}")
        if step % args.ckpt_interval == 0 or step == total_steps:
            save_checkpoint()

    # ---------------------------------------------------------------------
    # evaluate and write the results

    if master:
        run_eval("after")
        save_adapter(raw_model, os.path.join(args.out, "adapter"))
        train_log = [r for r in log if "task_loss" in r]
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        metrics.update({"train_loss_first": train_log[0]["task_loss"] if train_log else None,
                        "train_loss_last": train_log[-1]["task_loss"] if train_log else None,
                        "tokens_per_s": train_log[-1]["tokens_per_s"] if train_log else None,
                        "steps": total_steps, "peak_memory_mb": peak / 2**20, "wall_s": time.time() - t_start})
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        say(f"wrote {args.out}/adapter, metrics.json, log.jsonl")
    if ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:  # bad input: the message, not a traceback
        sys.exit(f"error: {e}")
