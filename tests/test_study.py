"""scripts/study.py: the gate study runs end to end (--quick, on the tiny model), resumes, and its tables
hold what the runs wrote; scripts/peft_check.py: transformers + peft score an exported adapter as we do."""

import json
import os
import subprocess
import sys

import pytest

from evaluate import accuracy, read_predictions
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # about 40 train.py processes


def study(workdir, out, *extra):
    model_dir, data_dir, _ = workdir
    return subprocess.run([sys.executable, ROOT / "scripts" / "study.py", "--quick", "--model", str(model_dir),
                           "--data-dir", str(data_dir), "--mix", "piqa", "--also", "boolq", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=1200)


def test_the_study_runs_every_row_resumes_and_tabulates_them(workdir, tmp_path):
    out = tmp_path / "study"
    done = study(workdir, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "study.json").read_text())["rows"]
    names = {(r["table"], r["row"], r["seed"]) for r in rows}
    assert {("A", n, s) for n in ("lora", "hira", "hira-static", "gatera-l0", "gatera", "lora-token") for s in (1, 2)} < names
    assert ("A", "zero-shot", 1) in names and ("C", "zero-shot", 1) in names
    assert sum(r["table"] == "B" for r in rows) == 9  # 4 lambdas x 2 starts, and the generation row
    generated = next(r for r in rows if r["row"].endswith("label-generate"))
    assert generated["gates"]["decode"]["positions"] > 0  # generation: decode positions exist
    # a row's figures are those of its files: the accuracy of its predictions
    preds = read_predictions(str(out / "A" / "gatera-seed2" / "after" / "piqa" / "predictions.jsonl"))
    assert next(r for r in rows if (r["table"], r["row"], r["seed"]) == ("A", "gatera", 2))["acc"]["piqa"] == accuracy(preds)
    c = next(r for r in rows if (r["table"], r["row"], r["seed"]) == ("C", "hira", 1))
    assert set(c["acc"]) == {"piqa", "boolq"}  # trained on --mix, scored on it and on --also
    md = (out / "study.md").read_text()
    for line in ("## A. The ablation on PIQA", "| gatera vs hira |", "## B. The entropy weight", "## C. Several tasks",
                 "| row | seeds | piqa | boolq | average |", "| hira vs lora |"):
        assert line in md
    # a second run runs nothing; a row whose record is gone runs again, resuming its checkpoint
    (out / "A" / "lora-seed1" / "study_row.json").unlink()
    again = study(workdir, out)
    assert again.returncode == 0, again.stderr[-3000:]
    commands = [line for line in again.stdout.splitlines() if line.startswith("  $ ")]
    assert len(commands) == 1 and "--resume" in commands[0] and "lora-seed1" in commands[0]


def test_tables_only_runs_nothing(workdir, tmp_path):
    (tmp_path / "empty").mkdir()
    done = study(workdir, tmp_path / "empty", "--tables-only")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "$ python" not in done.stdout and json.loads((tmp_path / "empty" / "study.json").read_text())["rows"] == []
    missing = study(workdir, tmp_path / "typo", "--tables-only")
    assert missing.returncode == 2 and "--tables-only: " in missing.stderr and not (tmp_path / "typo").exists()


REFERENCE_PYTHON = os.environ.get("GATERA_REFERENCE_PYTHON")  # transformers + peft: see tests/test_export.py


def test_peft_check_scores_an_exported_adapter_as_we_do(workdir, tmp_path):
    """scripts/peft_check.py (transformers + peft, lm-eval's request split) on a trained tiny LoRA's PEFT
    export gives the log-likelihoods and accuracies of our predictions; a wrong file fails it."""
    if not REFERENCE_PYTHON:
        pytest.skip("needs the reference interpreter with transformers and peft, named by GATERA_REFERENCE_PYTHON "
                    "(.ci/run builds it)")
    model_dir, data_dir, _ = workdir
    out = tmp_path / "lora"
    common = ["--model", str(model_dir), "--data-dir", str(data_dir), "--dtype", "float32"]
    subprocess.run([sys.executable, ROOT / "train.py", "--task", "piqa", "--method", "lora", "--gate", "none",
                    "--rank", "4", "--batch-size", "4", "--max-steps", "6", "--lr", "1e-2", "--skip-eval-before",
                    "--out", str(out), *common], check=True, capture_output=True, timeout=600)
    subprocess.run([sys.executable, ROOT / "export.py", "--adapter", str(out / "adapter"), "--model", str(model_dir),
                    "--peft", str(tmp_path / "peft")], check=True, capture_output=True, timeout=600)
    predictions = out / "after" / "piqa" / "predictions.jsonl"

    def check(path):
        return subprocess.run([REFERENCE_PYTHON, ROOT / "scripts" / "peft_check.py", "--peft", str(tmp_path / "peft"),
                               "--predictions", str(path), "--task", "piqa", "--model", str(model_dir),
                               "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=600)
    done = check(predictions)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "picks that differ: none" in done.stdout
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    for r in rows:  # another adapter's scores, as a stale or mixed-up file would hold
        r["loglikelihoods"] = [x + 0.01 * i for i, x in enumerate(r["loglikelihoods"])]
    (tmp_path / "wrong.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wrong = check(tmp_path / "wrong.jsonl")
    assert wrong.returncode != 0 and "the two scorers disagree" in wrong.stderr
