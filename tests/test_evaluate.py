"""evaluate.py: cached label scoring, McNemar's test, the comparison command."""

import itertools
import math
import subprocess
import sys

import pytest
import torch

import data
import evaluate
from checkpoints import load_pretrained
from tokenizer import load_tokenizer
from tests.conftest import CLOZE, ROOT, PIQA, piqa_example


def test_cached_label_scoring_equals_scoring_each_full_sequence(workdir):
    """score_labels runs the shared prompt once and forks its KV cache per label; the plain way scores
    every prompt + label sequence on its own. Same answers, same losses on the answer and on the label
    tokens (those from the first position where the two labels' tokens differ)."""
    model_dir, data_dir, _ = workdir
    tok, model = load_tokenizer(model_dir), load_pretrained(model_dir).eval()
    batch = [piqa_example(*r) for r in PIQA[:5]]
    for ex, label in zip(batch[:3], ("solution1", "solution2", "solution2")):
        ex["answer"] = label  # vary which label is the correct one
    loss_sums = {"answer": [0.0, 0], "label": [0.0, 0]}
    predictions = evaluate.score_labels(model, tok, "piqa", list(enumerate(batch)), "cpu", loss_sums)
    correct = sum(p["pred"] == p["gold"] for p in predictions)
    sums = {f"{k}_{part}": loss_sums[k][i] for k in ("answer", "label") for i, part in enumerate(("nll", "tokens"))}
    plain = {"correct": 0, "answer_nll": 0.0, "answer_tokens": 0, "label_nll": 0.0, "label_tokens": 0}
    with torch.no_grad():
        for ex in batch:
            scores, picked, seqs = {}, {}, {}
            for label, text in data.label_choices("piqa", ex["instruction"]).items():
                ids, labels = data.encode_example(tok, {"instruction": ex["instruction"], "output": text}, cutoff=10**9)
                ids, labels = ids[:-1], labels[:-1]  # not EOS
                logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], -1)  # (T-1, V)
                picked[label] = {t: logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100}
                scores[label], seqs[label] = sum(picked[label].values()), ids
            plain["correct"] += max(scores, key=scores.get) == ex["answer"]
            answer, other = seqs[ex["answer"]], next(q for label, q in seqs.items() if label != ex["answer"])
            split = next(t for t in range(len(answer)) if t >= len(other) or answer[t] != other[t])  # the labels differ
            plain["answer_nll"] -= sum(picked[ex["answer"]].values())
            plain["answer_tokens"] += len(picked[ex["answer"]])
            plain["label_nll"] -= sum(v for t, v in picked[ex["answer"]].items() if t >= split)
            plain["label_tokens"] += sum(t >= split for t in picked[ex["answer"]])
    assert (correct, sums["answer_tokens"], sums["label_tokens"]) == (plain["correct"], plain["answer_tokens"], plain["label_tokens"])
    assert 0 < plain["label_tokens"] < plain["answer_tokens"]
    assert sums["answer_nll"] == pytest.approx(plain["answer_nll"], rel=1e-5)
    assert sums["label_nll"] == pytest.approx(plain["label_nll"], rel=1e-5)


@pytest.mark.parametrize("b, c, p", CLOZE["mcnemar"])
def test_mcnemar_p_value_equals_scipys_exact_binomial_test(b, c, p):
    first = [{"index": i, "pred": 0, "gold": 0} for i in range(b)] + [{"index": b + i, "pred": 1, "gold": 0} for i in range(c)]
    second = [{"index": i, "pred": 1, "gold": 0} for i in range(b)] + [{"index": b + i, "pred": 0, "gold": 0} for i in range(c)]
    agree = [{"index": -1 - i, "pred": i % 2, "gold": 0} for i in range(7)]  # the same answer in both: no evidence
    got = evaluate.mcnemar(first + agree, list(reversed(second + agree)))
    assert got[:2] == (b, c) and got[2] == pytest.approx(p, rel=1e-12)


def test_mcnemar_refuses_predictions_on_different_items():
    with pytest.raises(ValueError, match="same items"):
        evaluate.mcnemar([{"index": 0, "pred": 0, "gold": 0}], [{"index": 1, "pred": 0, "gold": 0}])


def runs(b, c, same=0, offset=0):
    """Two runs' predictions: b items only the first gets right, c only the second, `same` both get right."""
    first = [{"index": offset + i, "pred": int(b <= i < b + c), "gold": 0} for i in range(b + c + same)]
    second = [{"index": offset + i, "pred": int(i < b), "gold": 0} for i in range(b + c + same)]
    return first, second


@pytest.mark.parametrize("b, c, p", CLOZE["mcnemar"])
def test_macro_test_of_one_task_is_mcnemars_exact_test(b, c, p):
    """One task: the randomization test draws McNemar's exact binomial test (scipy's p), within 4 standard
    errors of 20,000 draws."""
    first, second = runs(b, c, same=4)
    before, after, got = evaluate.macro_test({"t": first}, {"t": second})
    assert (before, after) == ((b + 4) / (b + c + 4), (c + 4) / (b + c + 4))
    assert abs(got - p) <= 4 * math.sqrt(p * (1 - p) / 20000) + 1 / 20001


def exact_macro_p(tasks):
    """The exact p of the macro average's sign-flip test by enumeration: tasks [(b, c, n)]; every one
    of the 2^(b+c) ways the disagreements can fall, weighed equally."""
    observed = sum((c - b) / n for b, c, n in tasks) / len(tasks)
    signs = [(1 / n / len(tasks)) for b, c, n in tasks for _ in range(b + c)]
    at_least = sum(abs(sum(s * w for s, w in zip(flip, signs))) >= abs(observed) - 1e-12
                   for flip in itertools.product((1, -1), repeat=len(signs)))
    return at_least / 2 ** len(signs)


@pytest.mark.parametrize("tasks", [[(1, 5, 10), (2, 4, 40)], [(0, 3, 5), (3, 0, 50), (1, 4, 12)], [(4, 4, 8), (2, 3, 9)]])
def test_macro_test_weighs_each_task_the_same(tasks):
    """Several tasks of different sizes: the drawn p equals the exact sign-flip p (enumerated), and the
    averages are each task's accuracy averaged, not the pooled accuracy."""
    before, after, offset = {}, {}, 0
    for k, (b, c, n) in enumerate(tasks):
        before[k], after[k] = runs(b, c, same=n - b - c, offset=offset)
        offset += n
    got = evaluate.macro_test(before, after)
    p = exact_macro_p(tasks)
    assert got[0] == pytest.approx(sum((n - c) / n for b, c, n in tasks) / len(tasks))
    assert got[1] == pytest.approx(sum((n - b) / n for b, c, n in tasks) / len(tasks))
    assert abs(got[2] - p) <= 4 * math.sqrt(p * (1 - p) / 20000) + 1 / 20001


def test_compare_prints_each_run_against_the_first(tmp_path):
    a = [{"index": i, "pred": 0, "pred_norm": 0, "gold": int(i < 60)} for i in range(100)]  # 40 right
    b = [{"index": i, "pred": 1, "pred_norm": 0, "gold": int(i < 60)} for i in range(100)]  # 60 right
    for name, preds in (("a", a), ("b", b)):
        evaluate.write_predictions(str(tmp_path / name / "predictions.jsonl"), preds)
    r = subprocess.run([sys.executable, ROOT / "evaluate.py", tmp_path / "a" / "predictions.jsonl",
                        tmp_path / "b" / "predictions.jsonl"], capture_output=True, text=True, check=True,
                       timeout=120)
    lines = r.stdout.splitlines()
    b_, c_, p = evaluate.mcnemar(a, b)
    assert (b_, c_) == (40, 60) and f"p={p:.2g}" in lines[2] and "+20.00" in lines[2] and "40.00 %" in lines[1]


def test_the_evaluation_eta_counts_the_work_done_not_the_rows(monkeypatch, capsys):
    """The longest rows run first: 10 of 100 rows in 10 s that were half the tokens leave 10 s, not 90 s."""
    monkeypatch.setattr(evaluate.time, "time", lambda: 1010.0)
    evaluate.progress("eval piqa", 10, 100, 1000.0, share=0.5)
    evaluate.progress("eval piqa", 10, 100, 1000.0)
    assert capsys.readouterr().err.splitlines() == [
        "eval piqa: 10/100 | 1.0/s | 00:00:10 elapsed, ETA 00:00:10",
        "eval piqa: 10/100 | 1.0/s | 00:00:10 elapsed, ETA 00:01:30"]


def test_cloze_scoring_caps_each_forward_at_eval_tokens_and_scores_the_same(workdir, monkeypatch, capsys):
    """score_cloze runs at most EVAL_TOKENS padded tokens a forward (one row alone where it is longer),
    so the fp32 logits of a batch of long rows stay small: the same log-likelihoods as uncapped batches,
    and the last progress line counts every row."""
    model_dir, _, _ = workdir
    tok, model = load_tokenizer(model_dir), load_pretrained(model_dir).eval()
    items = list(enumerate(piqa_example(*r) for r in PIQA))
    shapes, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda ids, **k: shapes.append(tuple(ids.shape)) or forward(ids, **k))
    runs = {}
    for cap in (10**6, 100):
        monkeypatch.setattr(evaluate, "EVAL_TOKENS", cap)
        shapes.clear()
        runs[cap] = evaluate.score_cloze(model, tok, "piqa", items, 4, "cpu", {"answer": [0.0, 0]})
        assert all(B * T <= cap or B == 1 for B, T in shapes) and sum(B for B, _ in shapes) == 2 * len(items)
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"eval piqa: {2 * len(items)}/{2 * len(items)} |")
    assert max(B for B, _ in shapes) < 4  # the cap cut the batches of 4 rows
    for a, b in zip(runs[10**6], runs[100]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-5)
