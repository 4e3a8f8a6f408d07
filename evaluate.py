"""
Scoring a model on a commonsense task, and comparing the answers of two runs.

Two formats (train.py --format):
- cloze (the default): lm-eval-harness's zero-shot multiple-choice scoring, how small models are
  evaluated. Each choice is a (context, continuation) pair (data.cloze_choices) and its score is
  the log-likelihood of the continuation's tokens after the context, log p(cont | ctx) = sum_t
  log p(cont_t | ctx, cont_<t). `acc` picks the highest score; `acc_norm` the highest score per
  character of the choice's text, which does not favour short choices.
- label: the LLM-Adapters protocol of the papers, for models large enough to answer with a label.
  --eval score: the log-likelihood of each offered label's response ("the correct answer is
  solution1") after the evaluation prompt; --eval generate: greedy generation and the reference's
  answer extraction.

Every evaluation gives one prediction per test item; evaluate_tasks, train.py's evaluation of its
test sets, writes them to <out>/<when>/<task>/predictions.jsonl, so that two runs can be compared
item by item (McNemar's exact test):

    python evaluate.py out/before/piqa/predictions.jsonl out/after/piqa/predictions.jsonl [more ...]

prints each file's accuracy with its 95 % interval and the test of each against the first file.

Start reading at evaluate(). With a recorder (gates.GateRecorder), each forward is called with a
dict, model(ids, gates=gates), that the gated layers fill with their gate values, and the recorder
gets that dict with the kind of each position (prompt, scored continuation, generated).
"""

import itertools
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

from cli import UserError, run
from data import (cloze_choices, collate_prompts, encode_example, encode_pair, extract_answer, gold_index,
                  label_choices, pad)
from files import atomic_write, write_json
from gates import GateRecorder, gate_page, gate_report, write_page
from model import KVCache

# the most padded tokens one cloze forward scores: its (N, vocab) fp32 logits, 200 MB at most for SmolLM2,
# however long the rows (the longest run first, 16 of them would hold 16 times the longest's)
EVAL_TOKENS = 1024

# -----------------------------------------------------------------------------
# progress


def hms(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(max(0, seconds)))


def progress(what, done, total, t0, share=None):
    """A progress line: done of total, the rate, the elapsed time and the ETA. share: the fraction of
    the work done, where items differ in cost (the ETA uses it; default done / total)."""
    elapsed, share = time.time() - t0, done / total if share is None else share
    print(f"{what}: {done}/{total} | {done / max(elapsed, 1e-9):.1f}/s | {hms(elapsed)} elapsed, "
          f"ETA {hms(elapsed * (1 - share) / max(share, 1e-9))}", file=sys.stderr)


# -----------------------------------------------------------------------------
# cloze scoring


@torch.no_grad()
def score_cloze(model, tok, task, items, batch_size, device, loss_sums, recorder=None):
    """One prediction per item [(index, example)]: the log-likelihood of every choice's continuation
    after its context, with the context and continuation tokenized as lm-eval does (encode_pair).
    Every (item, choice) is one row; the rows run longest first, batch_size at a time, right-padded,
    so that a batch holds rows of about one length. Adds the correct choices' NLL and token count to
    loss_sums["answer"]; the recorder gets the gates on context (prefill) and continuation (scored)
    tokens, and keeps in full those of the correct choice's row of its first examples."""
    rows = []  # (item number, context ids, continuation ids)
    requests = [cloze_choices(task, ex["instruction"]) for _, ex in items]
    for n, choices in enumerate(requests):
        for context, continuation in choices:
            ctx, cont = encode_pair(tok, context, continuation)
            if not ctx:
                raise ValueError(f"{task}: the context {context!r} has no tokens; a cloze needs one to condition on")
            rows.append((n, ctx, cont))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][1]) - len(rows[i][2]))
    first_row = [0] + list(itertools.accumulate(len(c) for c in requests))
    golds = [rows[first_row[n] + gold_index(task, ex)] for n, (_, ex) in enumerate(items)]  # the correct rows
    scores = [0.0] * len(rows)
    t0, tokens = time.time(), [len(rows[i][1]) + len(rows[i][2]) for i in order]  # a row's cost: its tokens
    starts = [0]  # batches of batch_size rows, fewer where they would pass EVAL_TOKENS padded tokens
    while starts[-1] < len(order):
        starts.append(min(len(order), starts[-1] + min(batch_size, max(1, EVAL_TOKENS // tokens[starts[-1]]))))
    for b, (start, stop) in enumerate(zip(starts, starts[1:])):
        batch = [rows[i] for i in order[start:stop]]
        ids = pad([ctx + cont for _, ctx, cont in batch], tok.pad_id).to(device)      # (B, T) right padding
        pos = torch.arange(ids.shape[1], device=device)                                 # (T,)
        first = torch.tensor([len(ctx) for _, ctx, _ in batch], device=device)[:, None]  # (B, 1)
        end = first + torch.tensor([len(cont) for _, _, cont in batch], device=device)[:, None]
        is_cont = (pos >= first) & (pos < end)                                          # (B, T) continuation tokens
        before = F.pad(is_cont[:, 1:], (0, 1), value=False)                              # (B, T) the positions before them
        gates = {} if recorder else None                                                 # layer name -> g (B, T)
        logits = model(ids, logits_at=before, gates=gates).float()                      # (N, V) predicts them
        logp = F.log_softmax(logits, -1).gather(-1, ids[is_cont][:, None])[:, 0]        # (N,) row-major, as the mask
        row = torch.arange(len(batch), device=device)[:, None].expand_as(is_cont)[is_cont]  # (N,) row of each
        sums = torch.zeros(len(batch), device=device).index_add_(0, row, logp)          # (B,)
        for i, s in zip(order[start:stop], sums.tolist()):
            scores[i] = s
        if recorder:
            kinds = torch.where(pos < first, 0, torch.where(is_cont, 1, -1))            # (B, T) prefill, scored
            gold = {b: rows[i][0] for b, i in enumerate(order[start:stop])
                    if rows[i] is golds[rows[i][0]]}
            recorder.add(gates, kinds, ids, gold)
        if b % 20 == 19 or stop == len(order):  # the longest rows run first: the ETA counts tokens
            progress(f"eval {task}", stop, len(order), t0, sum(tokens[:stop]) / sum(tokens))
    predictions, k = [], 0
    for (index, ex), choices in zip(items, requests):
        ll, k = scores[k:k + len(choices)], k + len(choices)
        lengths = [len(continuation.removeprefix(" ")) for _, continuation in choices]  # the choice's characters
        gold = gold_index(task, ex)
        loss_sums["answer"][0] -= ll[gold]
        loss_sums["answer"][1] += len(rows[k - len(choices) + gold][2])
        predictions.append({"index": index, "loglikelihoods": ll, "lengths": lengths,
                            "pred": max(range(len(ll)), key=ll.__getitem__),
                            "pred_norm": max(range(len(ll)), key=lambda c: ll[c] / lengths[c]), "gold": gold})
    return predictions


# -----------------------------------------------------------------------------
# label scoring and generation (the papers' protocol)


def common_prefix(seqs):
    """Length of the longest common prefix of lists."""
    n = 0
    while all(len(q) > n for q in seqs) and len({q[n] for q in seqs}) == 1:
        n += 1
    return n


@torch.no_grad()
def score_labels(model, tok, task, batch, device, loss_sums, recorder=None, offset=0):
    """Log-likelihood scoring of labels: each offered label's continuation ("the correct answer is
    <label>") gets score = sum of log p(its response tokens | prompt); the highest score is the answer.
    The prompt is shared by all labels of an example, so it runs once and its KV cache is reused
    for every label's few remaining tokens. Returns one prediction per (index, example) of batch;
    adds to loss_sums, for the correct continuations, the NLL and token count of their response
    tokens ("answer") and of the tokens that tell the labels apart ("label", e.g. "1" of
    "solution1": the response minus the common format words). The recorder gets the gates on the
    prompt (prefill) and on the response tokens (scored); batch[b] is example number offset + b."""
    choices = []  # per example: [(label, ids, first response position)]
    for _, ex in batch:
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
    gates = {} if recorder else None                                 # layer name -> g (B, Tc)
    first = F.log_softmax(model(ids, mask=mask, cache=cache, logits_at=-1, gates=gates).float(), -1)  # (B, V)
    if recorder:
        recorder.add(gates, torch.where(mask.bool(), 0, -1), ids, {b: offset + b for b in range(len(batch))})
    scores = [[None] * len(rows) for rows in choices]
    for c in range(max(map(len, choices))):  # the c-th label of every example in one batch
        tails = [rows[c][1][s:] if c < len(rows) else [tok.pad_id] for rows, s in zip(choices, starts)]
        T = max(map(len, tails))
        tail_ids = torch.tensor([t + [tok.pad_id] * (T - len(t)) for t in tails], device=device)  # (B, T)
        tail_mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in tails], device=device)
        forked = [c.fork() for c in cache]  # each label extends the prompt's cache; the prompt's stays
        gates = {} if recorder else None
        logits = model(tail_ids, mask=torch.cat([mask, tail_mask], 1), cache=forked, gates=gates).float()  # (B, T, V)
        logp = torch.cat([first[:, None], F.log_softmax(logits[:, :-1], -1)], 1)  # (B, T, V) predicts tail t
        response = torch.tensor([[s + j >= rows[min(c, len(rows) - 1)][2] and j < len(t) for j in range(T)]
                                 for rows, s, t in zip(choices, starts, tails)], device=device)  # (B, T)
        token_logp = logp.gather(-1, tail_ids[..., None])[..., 0] * response  # (B, T) log p of response tokens
        label = response & (torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
                            >= torch.tensor(shared, device=device)[:, None])  # (B, T) past the shared words
        if recorder:
            real = torch.tensor([[j < len(t) and c < len(rows) for j in range(T)] for rows, t in zip(choices, tails)],
                                device=device)                       # (B, T) not padding
            recorder.add(gates, torch.where(response, 1, torch.where(real, 0, -1)), tail_ids,
                         {b: offset + b for b, (rows, (_, ex)) in enumerate(zip(choices, batch))
                          if c < len(rows) and rows[c][0] == ex["answer"]})
        for b, (rows, (_, ex)) in enumerate(zip(choices, batch)):
            if c < len(rows):
                scores[b][c] = token_logp[b].sum().item()
                if rows[c][0] == ex["answer"]:
                    loss_sums["answer"][0] -= scores[b][c]
                    loss_sums["answer"][1] += response[b].sum().item()
                    loss_sums["label"][0] -= (token_logp[b] * label[b]).sum().item()
                    loss_sums["label"][1] += label[b].sum().item()
    return [{"index": index, "labels": [label for label, _, _ in rows], "loglikelihoods": ll,
             "pred": max(range(len(ll)), key=ll.__getitem__), "gold": gold_index(task, ex)}
            for (index, ex), rows, ll in zip(batch, choices, scores)]


@torch.no_grad()
def generate_labels(model, tok, task, batch, device, recorder=None, offset=0):
    """Greedy generation (32 new tokens, batched with left padding) and the reference's extraction:
    the first case-sensitive label match after "### Response:" ("" counts as wrong). The recorder
    gets the gates on the prompt (prefill) and on each generated token fed back (decode)."""
    ids, mask = collate_prompts(tok, [ex["instruction"] for _, ex in batch])
    out = model.generate(ids.to(device), 32, mask=mask.to(device), eos_id=tok.eos_id,
                         on_step=recorder and recorder.new_generation({b: offset + b for b in range(len(batch))}))
    predictions = []
    for (index, ex), new in zip(batch, out[:, ids.shape[1]:].tolist()):
        text = tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new)
        labels, answer = list(label_choices(task, ex["instruction"])), extract_answer(task, text)
        predictions.append({"index": index, "generated": text, "extracted": answer,
                            "pred": labels.index(answer) if answer in labels else -1, "gold": gold_index(task, ex)})
    return predictions


# -----------------------------------------------------------------------------
# one task


@torch.no_grad()
def evaluate(model, tok, task, items, fmt="cloze", mode="score", batch_size=16, device="cpu", recorder=None):
    """Scores items [(index in the task's test file, example)]; returns (summary, predictions).
    The summary: acc (and acc_norm in cloze format), the mean loss on the correct continuation's
    tokens ("answer", and in label scoring on the label's own tokens, "label"), and with a
    GateRecorder the gates on each kind of position (the paper sees them near 0 on the prompt)."""
    was_training = model.training
    model.eval()
    loss_sums = {"answer": [0.0, 0], "label": [0.0, 0]}  # [NLL, tokens]
    if fmt == "cloze":
        predictions = score_cloze(model, tok, task, items, batch_size, device, loss_sums, recorder)
    else:
        predictions, t0 = [], time.time()
        for i in range(0, len(items), batch_size):
            batch = items[i:i + batch_size]
            predictions += (generate_labels(model, tok, task, batch, device, recorder, i) if mode == "generate"
                            else score_labels(model, tok, task, batch, device, loss_sums, recorder, i))
            if (i // batch_size) % 10 == 9 or i + batch_size >= len(items):
                progress(f"eval {task}", min(i + batch_size, len(items)), len(items), t0)
    model.train(was_training)
    summary = {"acc": accuracy(predictions), "acc_norm": accuracy(predictions, "pred_norm") if fmt == "cloze" else None,
               **{f"{k}_loss": s / n if n else None for k, (s, n) in loss_sums.items()},
               "gates": recorder.summary() if recorder else None}
    return summary, predictions


# -----------------------------------------------------------------------------
# statistics: accuracy, its interval, McNemar's exact test


def accuracy(predictions, key="pred"):
    return sum(p[key] == p["gold"] for p in predictions) / max(len(predictions), 1)


def interval95(acc, n):
    """Wilson score interval for an accuracy over n examples."""
    z = 1.96
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def mcnemar(first, second, key="pred"):
    """McNemar's exact test of two runs' predictions on the same items: with b items that only the
    first gets right and c that only the second does, under "equally accurate" each of the b + c
    disagreements goes either way with probability 1/2, and the two-sided p-value is
    p = min(1, 2 P(Binomial(b + c, 1/2) <= min(b, c))). Returns (b, c, p)."""
    second = {p["index"]: p for p in second}
    if set(second) != {p["index"] for p in first}:
        raise ValueError("McNemar's test needs predictions on the same items; these two sets of indices differ")
    right = [(p[key] == p["gold"], second[p["index"]][key] == p["gold"]) for p in first]
    b, c = sum(x and not y for x, y in right), sum(y and not x for x, y in right)
    n = b + c
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n) if n else 1.0
    return b, c, p


def macro_test(before, after, key="pred", draws=20000, seed=0):
    """A paired randomization test of the macro average (each task's accuracy averaged over the tasks,
    the papers' "Avg.") of two runs on the same items: before, after {task: predictions}. Under
    "equally accurate" the two answers to an item are exchangeable, so an item that one run alone gets
    right (b_t only before, c_t only after in task t of n_t items, m_t = b_t + c_t) adds +1 or -1 with
    probability 1/2: the observed D = mean_t (c_t - b_t) / n_t is set against draws of
    D* = mean_t (2 Binomial(m_t, 1/2) - m_t) / n_t, and p = (1 + #{|D*| >= |D|}) / (1 + draws).
    Each task weighs the same, however many items it has; with one task this is McNemar's exact test
    (mcnemar), by sampling. Returns (average before, average after, p)."""
    tasks = list(before)
    bc = torch.tensor([mcnemar(before[t], after[t], key)[:2] for t in tasks], dtype=torch.float64)  # (T, 2)
    n = torch.tensor([len(before[t]) for t in tasks], dtype=torch.float64)                         # (T,)
    observed = ((bc[:, 1] - bc[:, 0]) / n).mean()
    m = bc.sum(1).expand(draws, -1)                                                                 # (draws, T)
    drawn = ((2 * torch.binomial(m, torch.full_like(m, 0.5), generator=torch.Generator().manual_seed(seed)) - m)
             / n).mean(1)
    p = (1 + (drawn.abs() >= observed.abs() - 1e-12).sum().item()) / (1 + draws)
    mean = lambda runs: sum(accuracy(runs[t], key) for t in tasks) / len(tasks)
    return mean(before), mean(after), p


def comparison(runs):
    """Lines of a table: each run's acc (and acc_norm) with its 95 % interval, and McNemar's test of
    each against the first run. runs: [(name, predictions)] on the same items."""
    for name, preds in runs[1:]:  # McNemar's test pairs the items: the files must hold the same ones
        if {p["index"] for p in preds} != {p["index"] for p in runs[0][1]}:
            raise UserError(f"{name} and {runs[0][0]} hold predictions on different test items; compare the "
                            "evaluations of one test set (the same task, --eval-examples and seed)")
    keys = ["pred"] + (["pred_norm"] if all("pred_norm" in p for _, preds in runs for p in preds) else [])
    width = max(len(name) for name, _ in runs)
    lines = [f"{'':{width}s} {'n':>5s}  " + "  ".join(f"{'acc' if k == 'pred' else 'acc_norm':<40s}" for k in keys)]
    base = runs[0][1]
    for name, preds in runs:
        cells = []
        for k in keys:
            acc = accuracy(preds, k)
            lo, hi = interval95(acc, len(preds))
            cell = f"{100 * acc:5.2f} % ({100 * lo:.1f}-{100 * hi:.1f})"
            if preds is not base:
                b, c, p = mcnemar(base, preds, k)
                cell += f" {100 * (acc - accuracy(base, k)):+.2f} p={p:.2g}"
            cells.append(f"{cell:<40s}")
        lines.append(f"{name:{width}s} {len(preds):5d}  " + "  ".join(cells))
    lines.append(f"p: McNemar's exact test against {runs[0][0]} on the same {len(base)} items (two-sided)")
    return lines


def summarize(when, results, tests):
    """A run's evaluation over all its tasks (results {task: evaluate's summary}, tests {task:
    items}): metrics.json's accuracy "<acc name>_<when>" over all items with its 95 % interval (and,
    with several tasks, "<acc name>_avg_<when>", the average of the tasks' accuracies), the answer and label
    losses averaged over the tasks, and each task's summary; with one line of them for the log."""
    n, metrics, text = sum(map(len, tests.values())), {}, f"{when}:"
    for key, name in (("acc", "accuracy"), ("acc_norm", "accuracy_norm")):
        if next(iter(results.values()))[key] is not None:
            acc = sum(r[key] * len(tests[t]) for t, r in results.items()) / n
            metrics[f"{name}_{when}"], metrics[f"{name}_{when}_95"] = acc, interval95(acc, n)
            text += f" {key} {acc:.4f}"
            if len(results) > 1:  # the papers' "Avg.": each task weighs the same
                metrics[f"{name}_avg_{when}"] = sum(r[key] for r in results.values()) / len(results)
                text += f" (average of the tasks {metrics[f'{name}_avg_{when}']:.4f})"
    for k in ("answer", "label"):
        loss = [r[f"{k}_loss"] for r in results.values() if r[f"{k}_loss"] is not None]
        metrics[f"{k}_loss_{when}"] = sum(loss) / len(loss) if loss else None
        text += f" | {k} loss {metrics[f'{k}_loss_{when}']:.4f}" if loss else ""
    metrics[f"eval_{when}"] = results
    return metrics, f"{text} ({n} examples)"


def scored_keys(predictions):
    """{metric name: prediction key} that every one of predictions holds: acc, and acc_norm in cloze format."""
    return {"acc": "pred", **({"acc_norm": "pred_norm"} if all("pred_norm" in p for p in predictions) else {})}


def before_after(task, before, after):
    """Lines of the table of before vs after training on the same test items, and metrics.json's
    McNemar's test of them: {"acc" (and "acc_norm"): {only_before_right, only_after_right, p}}."""
    lines = [f"\n{task}, {len(after)} test examples: before vs after training"]
    lines += comparison([("before (zero-shot)", before), ("after", after)])
    return lines, {name: dict(zip(("only_before_right", "only_after_right", "p"), mcnemar(before, after, k)))
                   for name, k in scored_keys(before + after).items()}


def macro_before_after(before, after):
    """The line of the macro average over tasks before vs after training (before, after {task:
    predictions} on the same items) and metrics.json's test of it (macro_test):
    {"acc" (and "acc_norm"): {before, after, p}}."""
    every = [p for t in before for p in before[t] + after[t]]
    tested = {name: dict(zip(("before", "after", "p"), macro_test(before, after, k)))
              for name, k in scored_keys(every).items()}
    cells = [f"{name} {r['before']:.4f} -> {r['after']:.4f} ({100 * (r['after'] - r['before']):+.2f}, p={r['p']:.2g})"
             for name, r in tested.items()]
    return [f"\nthe average of the {len(before)} tasks (each weighs the same): {', '.join(cells)}",
            "p: a paired randomization test of the average (evaluate.macro_test, 20,000 draws)"], tested


def write_predictions(path, predictions):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in predictions)
    atomic_write(path, write)


def read_predictions(path):
    """The predictions in a predictions.jsonl file, one JSON object a line as write_predictions writes
    them; a missing, empty or damaged file is a UserError naming it (and the line)."""
    again = "pass a predictions.jsonl that train.py wrote (<out>/<when>/<task>/predictions.jsonl)"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as text ({e}); {again}") from e
    predictions = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not a predictions.jsonl file (line {n}: {e.msg}); {again}") from e
        missing = [k for k in ("index", "pred", "gold") if k not in p] if isinstance(p, dict) else ["an object"]
        if missing:
            raise UserError(f"{path}: line {n} is not a prediction (it lacks {', '.join(missing)}); {again}")
        predictions.append(p)
    if not predictions:
        raise UserError(f"{path} holds no predictions (it is empty); {again}")
    return predictions


# -----------------------------------------------------------------------------
# a training run's log and test sets: train.py's log records and its evaluations before, during and after


def evaluate_tasks(when, model, tok, tests, args, device, metrics=None, what="", folder=None):
    """Scores every test task: ({task: summary}, {task: predictions}, lines for the log). "before" and
    "after" also write <folder>/<task>/predictions.jsonl (folder: default <out>/<when>; --eval-only
    gives <out>/eval-<n>) and gates.html with --visualize, and put the accuracy, losses and gates into
    metrics and the lines; "during" (every --eval-interval steps) only scores."""
    results, predictions, lines = {}, {}, []
    for t, items in tests.items():
        recorder = GateRecorder(keep=0 if when == "during" else args.visualize)
        results[t], predictions[t] = evaluate(model, tok, t, items, args.format, args.eval, args.eval_batch_size,
                                              device, recorder)
        task_folder = os.path.join(folder or os.path.join(args.out, when), t)
        if when != "during":
            write_predictions(os.path.join(task_folder, "predictions.jsonl"), predictions[t])
        if when != "during" and args.visualize and recorder.kept:
            title = f"{args.model}, {what}, {t} ({args.format}), {when} training"
            kept = [items[n][0] for n in sorted(recorder.kept)]
            write_page(os.path.join(task_folder, "gates.html"), gate_page(title, recorder, tok, kept, predictions[t]))
            lines.append(f"wrote {os.path.join(task_folder, 'gates.html')}")
    if when != "during":
        entries, line = summarize(when, results, tests)  # accuracy over all tasks, with its interval; losses
        metrics.update(entries)
        lines.append(line)
        for t, r in results.items():
            lines += gate_report(r["gates"], f"{when} training" + (f", {t}" if len(results) > 1 else ""))
    return results, predictions, lines


def evaluate_after(args, model, tok, tests, before, log, metrics, device, what, t_start, folder=None):
    """The evaluation after training, into <out>/after/ (--eval-only's: before None, into folder), each
    task compared with the evaluation before on the same items (McNemar's test; after --resume the one
    before is read back from <out>/before/), metrics.json written beside. Returns the lines to say."""
    _, after, lines = evaluate_tasks("after", model, tok, tests, args, device, metrics, what, folder)
    paired = {}  # task -> the predictions before training, where there are some
    for t, preds in after.items():
        before_file = os.path.join(args.out, "before", t, "predictions.jsonl")
        if before is not None and (t in before or os.path.exists(before_file)):
            paired[t] = before.get(t) or read_predictions(before_file)
            compared, metrics.setdefault("mcnemar", {})[t] = before_after(t, paired[t], preds)
            lines += compared
    if len(paired) > 1:
        compared, metrics["macro_test"] = macro_before_after(paired, {t: after[t] for t in paired})
        lines += compared
    train_log = [r for r in log if "task_loss" in r]
    if train_log:
        metrics.update({"train_loss_first": train_log[0]["task_loss"], "train_loss_last": train_log[-1]["task_loss"],
                        "tokens_per_s": train_log[-1]["tokens_per_s"], "matmul_share": train_log[-1]["matmul_share"],
                        "steps": train_log[-1]["step"]})
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    metrics.update({"peak_memory_mb": peak / 2**20, "wall_s": time.time() - t_start})
    write_json(os.path.join(folder or args.out, "metrics.json"), metrics)
    wrote = f"{folder}: predictions, metrics.json" if folder else \
        f"{args.out}/adapter, before/ and after/ predictions, metrics.json, log.jsonl"
    return "\n".join(lines + [f"wrote {wrote} ({hms(time.time() - t_start)} in all; peak memory {peak / 2**30:.2f} GB)"])


def eval_record(step, results):
    """log.jsonl's record of an evaluation during training, and its line: each task's accuracy and gates."""
    keys = ("mean", "below_0.1", "above_0.9", "per_layer")
    rec = {"step": step, "eval": {t: {"acc": r["acc"], "acc_norm": r["acc_norm"], "gates": {
        kind: {k: s[k] for k in keys} for kind, s in (r["gates"] or {}).items()}} for t, r in results.items()}}
    return rec, f"step {step}: " + " | ".join(f"{t} acc {r['acc']:.4f}" + "".join(
        f", gate {kind} {s['mean']:.3f}" for kind, s in r["gates"].items()) for t, r in rec["eval"].items())


def step_record(step, task_loss, entropy, entropy_weight, gates, lr, tokens_seen, elapsed, s_per_token_at_rate):
    """log.jsonl's record of a training step: the losses; the gates of this rank's micro-batches (on
    all positions, each kind weighted by its count; the prompt's, prefill; the answer's, scored);
    the learning rate; the speed, and its share of the matmul rate: the seconds a token's matmul FLOPs
    take at this machine's matmul rate (budget.matmul_rate) x tokens per second."""
    n = sum(s["positions"] for s in gates.values())
    mean = {k: sum(s[k] * s["positions"] for s in gates.values()) / n if n else None
            for k in ("mean", "below_0.1", "above_0.9")}
    return {"step": step, "loss": task_loss + entropy_weight * entropy, "task_loss": task_loss, "entropy": entropy,
            "gate_mean": mean["mean"], "gate_below_0.1": mean["below_0.1"], "gate_above_0.9": mean["above_0.9"],
            "gate_prompt": gates.get("prefill", {}).get("mean"), "gate_answer": gates.get("scored", {}).get("mean"),
            "lr": lr, "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed,
            "matmul_share": tokens_seen / elapsed * s_per_token_at_rate}


def step_line(r, total_steps, eta):
    """The log's line of a training step's record r, with eta: the seconds of training left."""
    gate = "" if r["gate_mean"] is None else \
        f" | gate {r['gate_mean']:.3f} (<0.1 {r['gate_below_0.1']:.0%}, >=0.9 {r['gate_above_0.9']:.0%})"
    return (f"step {r['step']}/{total_steps} | loss {r['loss']:.4f} | task {r['task_loss']:.4f} | H {r['entropy']:.4f}"
            f"{gate} | lr {r['lr']:.2e} | {r['tokens_per_s']:.0f} tok/s ({r['matmul_share']:.2f} of the matmul rate) | "
            f"{hms(r['elapsed_s'])} elapsed, "
            f"ETA {hms(eta)}")


# -----------------------------------------------------------------------------
# the command line: python evaluate.py A.jsonl B.jsonl ...


def main(argv=None):
    """Prints each predictions file's accuracy with its 95 % interval and McNemar's test of each against
    the first; returns the lines."""
    paths = sys.argv[1:] if argv is None else argv
    if len(paths) < 2:
        raise UserError("give two or more predictions.jsonl files to compare, the baseline first: python evaluate.py "
                        "out/before/piqa/predictions.jsonl out/after/piqa/predictions.jsonl")
    lines = comparison([(path, read_predictions(path)) for path in paths])
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    run(main)
