"""
An extra: the gate study (docs/study.md). Does the token gate help, and when? Three tables, every row
one or two runs of train.py, each in a fresh process, one at a time (two trainings on 2 cores slow
each other several times over):

  A. the paper's ablation on PIQA, with seeds: zero-shot, LoRA, HiRA, HiRA with a static gate,
     GateRA with lambda = 0, GateRA, token-gated LoRA;
  B. what the entropy term and the gate's start do: GateRA with lambda in {0, 0.01, 0.1, 1}, the
     gate starting at 0.5 (bias 0) and closed (bias -3), one seed; then the setting whose gates come
     closest to the paper's pattern (closed on the prompt, open on the answer) in the label format
     with generation, so that decode positions exist; each writes the gate page of 8 test items
     (<row>/after/piqa/gates.html);
  C. the paper's protocol at this scale: trained on the six-task mix, scored on its six test sets
     and WinoGrande's: zero-shot, LoRA, HiRA, GateRA (the default lambda, and B's best).

Every row of a table trains on the same examples in the same order for a seed (--seed draws them)
and is scored on the same test items (train.py draws those with a fixed seed). A row's runs go to
<out>/<table>/<row>/; a row whose metrics.json exists is skipped, one that was interrupted resumes
(--resume), so the study runs across sittings. At the end, and with --tables-only, it writes
<out>/study.md and <out>/study.json: every table, the tests, each row's command, commit and wall time.

    python scripts/study.py --data-dir ../shared/data/llm_adapters --out runs/study   # about 6 h on 2 cores
    python scripts/study.py --out runs/study --tables-only                           # the tables so far
    python scripts/study.py --quick --model DIR --data-dir DIR --out /tmp/study       # the test's tiny run

The tests: a paired randomization test (evaluate.macro_test) with each seed (and, in C, each task)
a stratum: per item and seed, the two methods' answers are exchangeable under "equally accurate".
It accounts for the items and pools the seeds; three seeds are too few for a test across seeds
alone (a sign test's smallest p is 0.25), so the table also gives each seed's difference.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli import COUNT, POSITIVE_INT, Parser, UserError, run, text  # noqa: E402  (the repository's modules)
from evaluate import hms, macro_test, read_predictions  # noqa: E402
from files import atomic_write, write_json  # noqa: E402

SIX = "boolq,piqa,social_i_qa,ARC-Easy,ARC-Challenge,openbookqa"  # the tasks with a train file on these machines
ABLATION = {  # table A's trained rows: name -> train.py's flags
    "lora": ["--method", "lora", "--gate", "none"],
    "hira": ["--method", "hira", "--gate", "none"],
    "hira-static": ["--method", "hira", "--gate", "static"],
    "gatera-l0": ["--method", "hira", "--gate", "token", "--entropy-weight", "0"],
    "gatera": ["--method", "hira", "--gate", "token"],
    "lora-token": ["--method", "lora", "--gate", "token"],
}
COMPARED = [("gatera", "hira"), ("gatera", "hira-static"), ("gatera", "gatera-l0"), ("lora-token", "lora"),
            ("hira", "lora")]  # (method, baseline): the paper's comparisons, and its HiRA > LoRA
LAMBDAS, BIASES = ("0", "0.01", "0.1", "1"), ("0", "-3")  # table B: the entropy weight, the gate's start

parser = Parser(description=__doc__.split("\n\n")[0].strip())
parser.add_argument("--out", type=text, default="runs/study", help="the study's folder (one sub-folder a row)")
parser.add_argument("--data-dir", type=text, default=None, help="train.py's --data-dir (the six tasks' files)")
parser.add_argument("--model", type=text, default="smollm2", help="train.py's --model")
parser.add_argument("--seeds", type=POSITIVE_INT, default=3, help="seeds of tables A and C (C takes at most 2)")
parser.add_argument("--train-examples", type=POSITIVE_INT, default=800, help="every trained row's budget")
parser.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="train.py's --batch-size (--quick: 4)")
parser.add_argument("--eval-examples", type=COUNT, default=1000, help="PIQA test items of tables A and B (0: all)")
parser.add_argument("--task-examples", type=POSITIVE_INT, default=200, help="table C: test items of each task")
parser.add_argument("--generate-examples", type=POSITIVE_INT, default=200, help="table B's generation row: test items")
parser.add_argument("--mix", type=text, default=SIX, help="table C: the tasks trained on (and scored)")
parser.add_argument("--also", type=text, default="winogrande", help="table C: test sets scored, not trained on")
parser.add_argument("--tables-only", action="store_true", help="run nothing: write the tables of the rows that exist")
parser.add_argument("--quick", action="store_true", help="a tiny run of every row (2 seeds, 8 examples, 3 items)")


# -----------------------------------------------------------------------------
# running a row


def commit():
    """The repository's commit (and '+changes' if its tracked files differ from it), for each row's record."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+changes" if git("status", "--porcelain", "-uno") else "")


def run_row(args, folder, runs):
    """Run a row: runs is [train.py's arguments], each written into folder; skipped where folder's
    record (study_row.json) says they all ended; an interrupted training resumes (the record's wall
    time is then the last sitting's). Returns the row's result (None with --tables-only, where it has
    not run); says what it ran, and the sitting's progress (args.sitting)."""
    record_path = folder / "study_row.json"
    if record_path.exists():
        args.sitting["skipped"] += 1
        return result(folder, json.loads(record_path.read_text()))
    if args.tables_only:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    record, t0 = {"commit": commit(), "commands": [], "wall_s": 0.0}, time.time()
    for argv in runs:
        argv = argv + (["--resume"] if "--eval-only" not in argv and (folder / "ckpt.pt").exists() else [])
        command = [sys.executable, str(ROOT / "train.py"), *argv]
        record["commands"].append(" ".join(["python", "train.py", *argv]))
        print(f"  $ {record['commands'][-1]}   (its log: {folder / 'train.log'})", flush=True)
        with open(folder / "train.log", "a") as log:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise UserError(f"{folder}: train.py ended with exit code {done.returncode}; its output is in "
                            f"{folder / 'train.log'}. Fix the cause and run the study again: it resumes this row")
    record["wall_s"] = time.time() - t0
    write_json(record_path, record)
    r, sitting = result(folder, record), args.sitting
    sitting["ran"] += 1
    elapsed = time.time() - sitting["start"]
    left = sitting["rows"] - sitting["skipped"] - sitting["ran"]
    print(f"  {folder}: acc {', '.join(f'{t} {100 * a:.2f}' for t, a in r['acc'].items())} in {hms(record['wall_s'])} | "
          f"{sitting['ran']} rows run, {hms(elapsed)} elapsed, about {left} rows and {hms(elapsed / sitting['ran'] * left)} "
          "to go", flush=True)
    return r


def common(args, seed):
    """train.py's flags that every run of the study shares: fp32 on every machine, so that a row run on
    a CPU with bf16 and one run on a CPU without compute the same thing (bf16 is slow where it is emulated)."""
    return ["--model", args.model, "--seed", str(seed), "--dtype", "float32"] + (
        ["--data-dir", args.data_dir] if args.data_dir else [])


def trained(args, seed, folder, task, flags, eval_examples):
    """train.py's arguments of a trained row: --train-examples of task's train files, one epoch, no
    evaluation before (the zero-shot row is that), eval_examples test items of each task."""
    return [["--task", task, "--train-examples", str(args.train_examples), "--epochs", "1", "--skip-eval-before",
             "--batch-size", str(args.batch_size),
             "--eval-examples", str(eval_examples), "--out", str(folder), *flags, *common(args, seed)]]


def zero_shot(args, folder, task, eval_examples):
    """train.py's arguments of a zero-shot row: the bare model scored (--eval-only), into <folder>/eval-1/."""
    return [["--eval-only", "--task", task, "--eval-examples", str(eval_examples), "--out", str(folder),
             *common(args, 1)]]


def also_scored(args, folder, seed):
    """The run that scores a table-C adapter on the test sets it did not train on, into <folder>/eval-1/."""
    return [["--eval-only", "--adapter", str(folder / "adapter"), "--task", args.also, "--eval-examples",
             str(args.task_examples), "--out", str(folder), *common(args, seed)]]


# -----------------------------------------------------------------------------
# what a row's runs wrote


def result(folder, record):
    """A finished row's figures, read from the files train.py wrote in folder: per task, acc, acc_norm
    and the predictions (<folder>/after/<task>/, or eval-1/ for --eval-only); the gates on the first
    task's test items and the gate entropy at the last training step, where there are gates. Of the
    --eval-only folders eval-<n>, the last is read (a row that was interrupted and ran again made more)."""
    metrics, preds = {}, {}
    scored = sorted((int(p.parent.name[5:]), p.parent.name) for p in folder.glob("eval-*/metrics.json"))
    for sub in ["", *[name for _, name in scored[-1:]]]:  # the run's own, and the latest --eval-only's
        path = folder / sub / "metrics.json"
        if path.exists():
            m = json.loads(path.read_text())
            metrics.update(m["eval_after"])
            for t in m["eval_after"]:
                preds[t] = read_predictions(str(folder / (sub or "after") / t / "predictions.jsonl"))
    log = folder / "log.jsonl"
    steps = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    steps = [r for r in steps if "entropy" in r]
    first = next(iter(metrics))
    return {"acc": {t: r["acc"] for t, r in metrics.items()}, "acc_norm": {t: r["acc_norm"] for t, r in metrics.items()},
            "preds": preds, "gates": metrics[first]["gates"], "entropy_end": steps[-1]["entropy"] if steps else None,
            "wall_s": record["wall_s"], "commit": record["commit"], "commands": record["commands"]}


def average(values):
    return sum(values) / len(values)


def mean_sd(values):
    """'mean ± sd' in percent over seeds (sd: the sample standard deviation; one seed: the value alone)."""
    values = [100 * v for v in values]
    return f"{average(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def compare(results, method, baseline, key="acc"):
    """method against baseline over the seeds both have, each seed and task a stratum of
    evaluate.macro_test: (the mean difference of the tasks' average in points, each seed's, p)."""
    seeds = sorted(set(results[method]) & set(results[baseline]))
    before = {(s, t): results[baseline][s]["preds"][t] for s in seeds for t in results[baseline][s]["preds"]}
    after = {k: results[method][k[0]]["preds"][k[1]] for k in before}
    per_seed = [100 * (average(list(results[method][s][key].values())) - average(list(results[baseline][s][key].values())))
                for s in seeds]
    pred = "pred" if key == "acc" else "pred_norm"
    b, a, p = macro_test(before, after, pred)
    return 100 * (a - b), per_seed, p


# -----------------------------------------------------------------------------
# the rows of each table, and their tables


def run_table_a(args, out):
    """Table A: {row name: {seed: result}}; the zero-shot row's one run stands for every seed."""
    seeds = range(1, args.seeds + 1)
    folder = out / "A" / "zero-shot"
    zs = run_row(args, folder, zero_shot(args, folder, "piqa", args.eval_examples))
    results = {"zero-shot": {s: zs for s in seeds}}
    for seed in seeds:
        for name, flags in ABLATION.items():
            folder = out / "A" / f"{name}-seed{seed}"
            results.setdefault(name, {})[seed] = run_row(args, folder, trained(args, seed, folder, "piqa", flags,
                                                                                 args.eval_examples))
    return ran(results)


def ran(results):
    """results {row: {seed: result or None}} less what has not run (--tables-only)."""
    results = {name: {s: r for s, r in by_seed.items() if r is not None} for name, by_seed in results.items()}
    return {name: by_seed for name, by_seed in results.items() if by_seed}


def table_a(results):
    """Table A's Markdown: each row's mean ± sd over seeds, then the comparisons."""
    lines = ["| row | seeds | acc % | acc_norm % | acc % of each seed | wall time (mean) |", "|---|---|---|---|---|---|"]
    for name, by_seed in results.items():
        rs = list(by_seed.values())[:1 if name == "zero-shot" else None]
        acc, acc_norm = [r["acc"]["piqa"] for r in rs], [r["acc_norm"]["piqa"] for r in rs]
        each = ", ".join(f"{100 * a:.2f}" for a in acc)
        lines.append(f"| {name} | {len(rs)} | {mean_sd(acc)} | {mean_sd(acc_norm)} | {each} | "
                     f"{hms(average([r['wall_s'] for r in rs]))} |")
    return lines + [""] + comparisons(results, COMPARED + [(name, "zero-shot") for name in ABLATION])


def comparisons(results, pairs):
    """The Markdown table of each (method, baseline) pair: the mean difference over seeds (and tasks),
    each seed's, and the paired randomization test's p, for acc and acc_norm."""
    lines = ["| comparison | Δ acc (points) | each seed | p | Δ acc_norm | each seed | p |", "|---|---|---|---|---|---|---|"]
    for method, baseline in pairs:
        if method in results and baseline in results:
            cells = []
            for key in ("acc", "acc_norm"):
                diff, per_seed, p = compare(results, method, baseline, key)
                cells += [f"{diff:+.2f}", ", ".join(f"{d:+.2f}" for d in per_seed), f"{p:.2g}"]
            lines.append(f"| {method} vs {baseline} | " + " | ".join(cells) + " |")
    return lines


def run_table_b(args, out, a):
    """Table B: {(lambda, bias): result} at seed 1 (the two of table A's rows it holds are taken from
    there), and the generation row: (its setting, its result)."""
    results = {}
    for lam in LAMBDAS:
        for bias in BIASES:
            if bias == "0" and lam in ("0", "0.01"):  # table A's gatera-l0 and gatera (the default lambda)
                results[lam, bias] = a.get("gatera-l0" if lam == "0" else "gatera", {}).get(1)
                continue
            folder = out / "B" / f"gatera-l{lam}-b{bias}"
            flags = ABLATION["gatera"] + ["--entropy-weight", lam, "--gate-init-bias", bias, "--visualize", "8"]
            results[lam, bias] = run_row(args, folder, trained(args, 1, folder, "piqa", flags, args.eval_examples))
    results = {k: r for k, r in results.items() if r is not None}
    if len(results) < len(LAMBDAS) * len(BIASES):  # --tables-only, before all have run
        return results, None
    lam, bias = max(results, key=lambda k: pattern(results[k]))  # the closest to the paper's gates
    folder = out / "B" / f"gatera-l{lam}-b{bias}-label-generate"
    flags = ABLATION["gatera"] + ["--entropy-weight", lam, "--gate-init-bias", bias, "--format", "label", "--eval",
                                  "generate", "--visualize", "8"]
    generated = run_row(args, folder, trained(args, 1, folder, "piqa", flags, args.generate_examples))
    return results, generated and ((lam, bias), generated)


def pattern(r):
    """How close a row's gates come to the paper's pattern: the mean gate on the answer's tokens minus
    the mean gate on the prompt's (1: closed on the prompt, open on the answer)."""
    answer = r["gates"].get("decode") or r["gates"]["scored"]
    return answer["mean"] - r["gates"]["prefill"]["mean"]


def table_b(results, generation):
    """Table B's Markdown: accuracy and gates for each (lambda, start), then the generation row."""
    lines = ["| λ | gate start | acc % | acc_norm % | gate: prompt | answer | answer − prompt | < 0.1 | ≥ 0.9 | "
             "entropy at the end |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (lam, bias), r in results.items():
        lines.append(row_b(lam, bias, r, "scored"))
    if generation is None:
        return lines
    (lam, bias), r = generation
    lines += ["", f"The setting closest to the paper's pattern (the largest answer − prompt), λ = {lam} and gate "
              f"bias {bias}, trained and scored in the label format with greedy generation "
              f"({len(r['preds']['piqa'])} test items): the answer is what the model generates.", "",
              lines[0], lines[1], row_b(lam, bias, r, "decode")]
    return lines


def row_b(lam, bias, r, answer_kind):
    """One row of table B: the gates on the prompt (prefill) and on the answer (scored or decode);
    the shares below 0.1 and at or above 0.9 are over the answer's gates."""
    start = f"{1 / (1 + math.exp(-float(bias))):.2f} (bias {bias})"          # sigmoid(bias): the gate at init
    prompt, answer = r["gates"]["prefill"], r["gates"][answer_kind]
    norm = "–" if r["acc_norm"]["piqa"] is None else f"{100 * r['acc_norm']['piqa']:.2f}"
    return (f"| {lam} | {start} | {100 * r['acc']['piqa']:.2f} | {norm} | {prompt['mean']:.3f} | {answer['mean']:.3f} | "
            f"{answer['mean'] - prompt['mean']:+.3f} | {answer['below_0.1']:.1%} | {answer['above_0.9']:.1%} | "
            f"{r['entropy_end']:.4f} |")


def run_table_c(args, out, best):
    """Table C: {row name: {seed: result}}, trained on --mix, scored on its tasks and --also's; best:
    table B's most accurate (lambda, bias), a row of its own where it is not the default."""
    tasks, seeds = f"{args.mix},{args.also}", range(1, min(args.seeds, 2) + 1)
    folder = out / "C" / "zero-shot"
    zs = run_row(args, folder, zero_shot(args, folder, tasks, args.task_examples))
    rows = {"lora": ABLATION["lora"], "hira": ABLATION["hira"], "gatera": ABLATION["gatera"]}
    if best != ("0.01", "0"):
        rows[f"gatera-l{best[0]}-b{best[1]}"] = ABLATION["gatera"] + ["--entropy-weight", best[0],
                                                                      "--gate-init-bias", best[1]]
    results = {"zero-shot": {s: zs for s in seeds}}
    for seed in seeds:
        for name, flags in rows.items():
            folder = out / "C" / f"{name}-seed{seed}"
            runs = trained(args, seed, folder, args.mix, flags, args.task_examples) + also_scored(args, folder, seed)
            results.setdefault(name, {})[seed] = run_row(args, folder, runs)
    return ran(results)


def table_c(results):
    """Table C's Markdown: a column per task and the average (mean over seeds), as the paper's Table 1."""
    tasks = list(next(iter(results["zero-shot"].values()))["acc"])
    lines = ["| row | seeds | " + " | ".join(tasks) + " | average |", "|---|---|" + "---|" * (len(tasks) + 1)]
    for name, by_seed in results.items():
        rs = list(by_seed.values())[:1 if name == "zero-shot" else None]
        cells = [mean_sd([r["acc"][t] for r in rs]) for t in tasks]
        cells.append(mean_sd([average([r["acc"][t] for t in tasks]) for r in rs]))
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    pairs = [(m, "zero-shot") for m in results if m != "zero-shot"] + [("hira", "lora"), ("gatera", "hira")]
    pairs += [(m, "gatera") for m in results if m.startswith("gatera-")]
    return lines + [""] + comparisons(results, pairs)


# -----------------------------------------------------------------------------
# the study: every table, written after each


def write_tables(args, out, tables):
    """<out>/study.md (every table so far, with the study's settings) and <out>/study.json (every row's
    figures, commands, commit and wall time; no predictions). tables: [(title, markdown lines, results)]."""
    md = [f"# The gate study: {args.model}, {args.train_examples} training examples a row (one epoch, fp32)", "",
          f"Tables A and B: {args.eval_examples or 'all'} PIQA test items; table C: {args.task_examples} of each test "
          f"set, trained on {args.mix}. Made by `python scripts/study.py` (docs/study.md).", ""]
    rows = []
    for title, lines, results in tables:
        md += [f"## {title}", "", *lines, ""]
        for name, by_seed in results.items():
            for seed, r in list(by_seed.items())[:1 if name == "zero-shot" else None]:  # zero-shot: one run for all
                rows.append({"table": title[0], "row": name, "seed": seed,
                             **{k: v for k, v in r.items() if k not in ("preds", "gates")},
                             "gates": {kind: {k: g[k] for k in ("mean", "below_0.1", "above_0.9", "positions")}
                                       for kind, g in (r["gates"] or {}).items()}})
    walls = sum({tuple(r["commands"]): r["wall_s"] for r in rows}.values())  # table B's two rows of A once
    md += [f"Rows' commits: {', '.join(sorted({r['commit'] for r in rows}))}; their wall time in all: {hms(walls)}."]
    atomic_write(str(out / "study.md"), lambda tmp: Path(tmp).write_text("\n".join(md) + "\n"))
    settings = {k: v for k, v in vars(args).items() if k != "sitting"}
    write_json(str(out / "study.json"), {"settings": settings, "rows": rows})


def main(argv=None):
    args = parser.parse_args(argv)
    if args.quick:  # every row, tiny: that the script runs end to end
        args.seeds, args.train_examples, args.eval_examples, args.task_examples, args.generate_examples = 2, 8, 3, 3, 3
        args.batch_size = 4
    out = Path(args.out)
    if args.tables_only and not out.is_dir():
        raise UserError(f"--tables-only: {out} is not a folder; give the --out of a study that has run")
    out.mkdir(parents=True, exist_ok=True)
    rows = 1 + len(ABLATION) * args.seeds + len(LAMBDAS) * len(BIASES) - 2 + 1 + 1 + 4 * min(args.seeds, 2)
    args.sitting = {"rows": rows, "skipped": 0, "ran": 0, "start": time.time()}  # progress: rows run in this sitting
    tables = []
    print("table A: the ablation on PIQA", flush=True)
    a = run_table_a(args, out)
    tables.append(("A. The ablation on PIQA", table_a(a), a))
    write_tables(args, out, tables)
    print("table B: the entropy weight and the gate's start", flush=True)
    b, generation = run_table_b(args, out, a)
    b_rows = {f"gatera-l{lam}-b{bias}": {1: r} for (lam, bias), r in b.items()}
    if generation:
        b_rows[f"gatera-l{generation[0][0]}-b{generation[0][1]}-label-generate"] = {1: generation[1]}
    tables.append(("B. The entropy weight and the gate's start", table_b(b, generation), b_rows))
    write_tables(args, out, tables)
    print("table C: trained on the mix, scored on each task", flush=True)
    best = max(b, key=lambda k: b[k]["acc"]["piqa"]) if b else ("0.01", "0")
    c = run_table_c(args, out, best)
    tables.append(("C. Several tasks", table_c(c) if "zero-shot" in c else [], c))
    write_tables(args, out, tables)
    print(f"wrote {out / 'study.md'} and {out / 'study.json'}")


if __name__ == "__main__":
    run(main)
