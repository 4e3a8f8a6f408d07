"""train.py end to end: the loss falls, outputs, resume, torchrun, the CPU budget, micro-batches, evaluation."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import budget
import data
import fused
import train
from checkpoints import load_adapter, load_pretrained
from cli import UserError
from tokenizer import load_tokenizer
from tests.conftest import ROOT, logits, PIQA

TIMEOUT = 600  # seconds: a subprocess that hangs (torchrun, a resume) fails its test instead of stalling CI


@pytest.mark.parametrize("task", ["piqaa", "boolq,piqaa"])
def test_an_unknown_task_fails_at_once_with_the_valid_tasks(monkeypatch, capsys, task):
    monkeypatch.setattr(train, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(data, "load_task", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(SystemExit):
        train.main(["--task", task])
    err = capsys.readouterr().err
    assert "argument --task: unknown task 'piqaa'" in err and all(t in err for t in (*data.LABELS, *data.MIXES))


def test_several_tasks_train_together_and_report_each_and_their_average(workdir, monkeypatch, tmp_path, capsys):
    m = run_train(workdir, monkeypatch, tmp_path / "out", "--task", "piqa,boolq", "--max-steps", "3", "--eval-examples", "3")
    out = capsys.readouterr().out
    assert "14 of 14 train examples (the union of piqa 8, boolq 6: each task in proportion to its size)" in out
    assert m["task"] == "piqa,boolq" and m["n_train"] == 14 and m["n_eval"] == 6  # 3 items of each task
    for when in ("before", "after"):
        accs = [m[f"eval_{when}"][t]["acc"] for t in ("piqa", "boolq")]
        assert m[f"accuracy_avg_{when}"] == pytest.approx(sum(accs) / 2)  # each task weighs the same
        assert m[f"accuracy_{when}"] == pytest.approx(sum(accs) * 3 / 6)
        for t in ("piqa", "boolq"):
            assert len((tmp_path / "out" / when / t / "predictions.jsonl").read_text().splitlines()) == 3
    assert set(m["mcnemar"]) == {"piqa", "boolq"}
    assert m["macro_test"]["acc"]["before"] == pytest.approx(m["accuracy_avg_before"])
    assert m["macro_test"]["acc"]["after"] == pytest.approx(m["accuracy_avg_after"]) and 0 < m["macro_test"]["acc"]["p"] <= 1
    assert "the average of the 2 tasks (each weighs the same): acc" in out


def args_for(workdir, out, *extra):
    model_dir, data_dir, _ = workdir
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--task", "piqa", "--out", str(out),
            "--rank", "4", "--batch-size", "4", "--grad-accum", "2", "--warmup", "2", "--log-interval", "1",
            "--cutoff", "400", "--dtype", "float32", *extra]  # the same numbers on every machine


def run_train(workdir, monkeypatch, out, *extra):
    monkeypatch.setattr(data, "BLOBS", {**data.BLOBS, **workdir[2]})  # the hand-written files' hashes
    return train.main(args_for(workdir, out, *extra))


def run_eval(workdir, monkeypatch, out, *extra):
    """train.py --eval-only on the tiny model, with none of args_for's training flags (refused with it);
    it writes <out>/eval-<n>/."""
    model_dir, data_dir, blobs = workdir
    monkeypatch.setattr(data, "BLOBS", {**data.BLOBS, **blobs})
    return train.main(["--model", str(model_dir), "--data-dir", str(data_dir), "--task", "piqa", "--out", str(out),
                       "--dtype", "float32", "--eval-only", *extra])


def launcher(workdir, tmp_path):
    """A script that runs train.main in a fresh process with the hand-written files' hashes."""
    script = tmp_path / "launch.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\nimport data, train\n"
                      f"data.BLOBS.update({workdir[2]!r})\ntrain.main(sys.argv[1:])\n")
    return script


@pytest.mark.parametrize("fmt", ["cloze", "label"])
def test_training_lowers_the_loss_and_writes_every_output(workdir, monkeypatch, tmp_path, fmt):
    m = run_train(workdir, monkeypatch, tmp_path / "out", "--method", "lora", "--lr", "1e-2", "--max-steps", "60",
                  "--entropy-weight", "0.1", "--format", fmt)
    # the loss on the test items' correct answers (here also training items), before and after: nats
    assert m["answer_loss_after"] < m["answer_loss_before"] - 0.2  # measured: cloze 6.35 -> 5.99, label 6.27 -> 5.69
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))  # what main returns
    assert {k: m[k] for k in ("task", "method", "gate", "entropy_weight", "format", "dtype", "eval_mode", "n_train",
                              "n_eval", "steps")} == {"task": "piqa", "method": "lora", "gate": "token", "entropy_weight": 0.1,
                                                      "format": fmt, "dtype": "float32", "eval_mode": "score",
                                                      "n_train": len(PIQA), "n_eval": 4, "steps": 60}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 61))
    assert (m["train_loss_first"], m["train_loss_last"]) == (log[0]["task_loss"], log[-1]["task_loss"])
    assert m["tokens_per_s"] == log[-1]["tokens_per_s"] > 0 and m["wall_s"] > 0
    # the learning rate of step s (1-based): linear warmup over --warmup 2 steps to --lr, then linear decay to 0
    assert [r["lr"] for r in log] == pytest.approx([1e-2 * min(s / 2, (60 - s + 1) / (60 - 2)) for s in range(1, 61)])
    assert {"loss", "task_loss", "entropy", "gate_mean", "gate_below_0.1", "gate_above_0.9", "lr", "tokens_per_s"} <= set(log[0])
    assert sorted(os.listdir(out / "adapter")) == ["adapter.safetensors", "adapter_config.json"]
    for when in ("before", "after"):  # one line per test example, in the test file's order
        rows = [json.loads(line) for line in (out / when / "piqa" / "predictions.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == [0, 1, 2, 3]
        assert [r["gold"] for r in rows] == [r[3] - 1 for r in PIQA[:4]]
        assert {"loglikelihoods", "pred"} <= set(rows[0]) and len(rows[0]["loglikelihoods"]) == 2
        assert fmt == "label" or {"lengths", "pred_norm"} <= set(rows[0])
        check_metrics_against_predictions(m, when, rows, fmt)
    check_mcnemar_against_predictions(m, out, fmt)
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # atomic writes leave no temporary files


def check_metrics_against_predictions(m, when, rows, fmt):
    """metrics' accuracies and their 95 % intervals, recomputed from predictions.jsonl: each pred is the
    choice of highest log-likelihood (pred_norm: per character), the interval Wilson's."""
    keys = [("pred", "accuracy")] + [("pred_norm", "accuracy_norm")] * (fmt == "cloze")
    for key, name in keys:
        for r in rows:
            per = r["lengths"] if key == "pred_norm" else [1] * len(r["loglikelihoods"])
            scores = [ll / n for ll, n in zip(r["loglikelihoods"], per)]
            assert r[key] == scores.index(max(scores)), r
        n, acc = len(rows), sum(r[key] == r["gold"] for r in rows) / len(rows)
        z = 1.96
        centre, half = (acc + z * z / (2 * n)) / (1 + z * z / n), z * (acc * (1 - acc) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
        assert m[f"{name}_{when}"] == acc and m[f"{name}_{when}_95"] == pytest.approx([centre - half, centre + half])


def check_mcnemar_against_predictions(m, out, fmt):
    """metrics' McNemar test, recomputed from the predictions before and after on disk: b items only
    right before, c only right after, p = min(1, 2 P(Binomial(b + c, 1/2) <= min(b, c)))."""
    read = [[json.loads(line) for line in (out / when / "piqa" / "predictions.jsonl").read_text().splitlines()]
            for when in ("before", "after")]
    want = {}
    for key, name in [("pred", "acc")] + [("pred_norm", "acc_norm")] * (fmt == "cloze"):
        right = [(a[key] == a["gold"], b[key] == b["gold"]) for a, b in zip(*read)]
        b, c = sum(x and not y for x, y in right), sum(y and not x for x, y in right)
        p = min(1.0, 2 * sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c))
        want[name] = {"only_before_right": b, "only_after_right": c, "p": pytest.approx(p)}
    assert m["mcnemar"] == {"piqa": want}


def test_gates_are_logged_during_training_and_recorded_with_generation(workdir, monkeypatch, tmp_path):
    out = tmp_path / "g"
    m = run_train(workdir, monkeypatch, out, "--max-steps", "4", "--lr", "1e-2", "--format", "label", "--eval",
                  "generate", "--eval-interval", "2", "--visualize", "2", "--gate-init-bias", "1.5")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    during = [r for r in log if "eval" in r]
    assert [r["step"] for r in during] == [2]  # every 2 steps, not at the end (the evaluation after is)
    gates = during[0]["eval"]["piqa"]["gates"]
    assert set(gates) == {"prefill", "decode"} and len(gates["decode"]["per_layer"]) == 2
    steps = [r for r in log if "task_loss" in r]
    # step 1 runs the adapter at its init, w_g = 0 and b_g = 1.5: g = sigmoid(1.5) on every prompt and answer token
    g0 = 1 / (1 + math.exp(-1.5))
    assert [steps[0][k] for k in ("gate_prompt", "gate_answer", "gate_mean")] == pytest.approx([g0] * 3, rel=1e-6)
    assert (steps[0]["gate_below_0.1"], steps[0]["gate_above_0.9"]) == (0, 0)
    assert steps[-1]["gate_prompt"] != pytest.approx(g0, rel=1e-6)  # then training moves them
    after = m["eval_after"]["piqa"]["gates"]
    assert after["prefill"]["positions"] > 0 and after["decode"]["positions"] > 0
    assert sum(after["decode"]["histogram"]) == after["decode"]["positions"] * 2 * 5  # layers x modules
    page = (out / "after" / "piqa" / "gates.html").read_text()
    assert page.count('"kind": "decode"') > 0 and not (out / "before" / "piqa" / "gates.html").exists()  # no gates


def test_sample_py_streams_the_greedy_continuation_and_seeds_sampling(workdir, monkeypatch, tmp_path, capsys):
    import sample
    model_dir, _, _ = workdir
    run_train(workdir, monkeypatch, tmp_path / "a", "--max-steps", "2", "--lr", "1e-2")
    flags = ["--model", str(model_dir), "--dtype", "float32", "--adapter", str(tmp_path / "a" / "adapter"),
             "--prompt", "How do you keep bread fresh?", "--max-new-tokens", "8", "--visualize", "1"]
    capsys.readouterr()
    got = sample.main([*flags, "--out", str(tmp_path / "p")])
    printed = capsys.readouterr().out
    model, tok = load_pretrained(model_dir), load_tokenizer(model_dir)
    load_adapter(model, tmp_path / "a" / "adapter")
    prompt = tok.encode("How do you keep bread fresh?")
    want = model.generate(torch.tensor([prompt]), 8, eos_id=tok.eos_id)[0, len(prompt):].tolist()
    text = tok.decode(want[:want.index(tok.eos_id)] if tok.eos_id in want else want)
    assert got["generated"] == text and "\nHow do you keep bread fresh?" + text + "\n" in printed
    assert got["gates"]["prefill"]["positions"] == len(prompt) and "decode" in got["gates"]
    assert (tmp_path / "p" / "gates-1.html").exists()
    sample.main([*flags, "--out", str(tmp_path / "p")])  # a second page goes beside the first, never over it
    assert sorted(os.listdir(tmp_path / "p")) == ["gates-1.html", "gates-2.html"]
    sampled = [sample.main([*flags, "--out", str(tmp_path / "s"), "--temperature", "1.5", "--top-k", "50",
                            "--seed", str(seed)])["generated"] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded sampling


def test_export_py_writes_the_peft_adapter_and_the_merged_model_from_the_command_line(workdir, monkeypatch,
                                                                                       tmp_path, capsys):
    import export
    model_dir, _, _ = workdir
    run_train(workdir, monkeypatch, tmp_path / "a", "--max-steps", "3", "--lr", "1e-2", "--method", "lora", "--gate", "static")
    flags = ["--model", str(model_dir), "--adapter", str(tmp_path / "a" / "adapter")]  # exports run in fp32
    got = export.main([*flags, "--peft", str(tmp_path / "peft"), "--merged", str(tmp_path / "merged")])
    assert got == {"peft": str(tmp_path / "peft"), "merged": str(tmp_path / "merged")}
    ours = load_pretrained(model_dir)
    load_adapter(ours, tmp_path / "a" / "adapter")
    ours.eval()  # LoRA's dropout off
    idx = torch.randint(0, 500, (2, 9))
    want = logits(ours, idx)
    imported = load_pretrained(model_dir)
    export.import_peft(imported, tmp_path / "peft")
    torch.testing.assert_close(logits(imported.eval(), idx), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "merged"), idx), want, rtol=1e-5, atol=1e-5)
    run_train(workdir, monkeypatch, tmp_path / "t", "--max-steps", "1")  # a token gate: refused, saying why
    with pytest.raises(ValueError, match="PEFT cannot express"):
        export.main(["--model", str(model_dir), "--adapter", str(tmp_path / "t" / "adapter"),
                     "--peft", str(tmp_path / "p2")])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # no adapter: refused, naming the flag
        export.main(["--model", str(model_dir), "--peft", str(tmp_path / "p3")])
    assert "the following arguments are required: --adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # nothing to write: refused, naming the flags
        export.main(flags)
    assert "give --peft OUT, --merged OUT, or both" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists() and not (tmp_path / "p3").exists()


def test_eval_only_with_the_saved_adapter_reproduces_the_accuracy_after(workdir, monkeypatch, tmp_path):
    m = run_train(workdir, monkeypatch, tmp_path / "a", "--max-steps", "4", "--lr", "1e-2")
    again = run_eval(workdir, monkeypatch, tmp_path / "b", "--adapter", str(tmp_path / "a" / "adapter"))
    assert again["accuracy_after"] == m["accuracy_after"]
    assert again["answer_loss_after"] == pytest.approx(m["answer_loss_after"], rel=1e-6)
    assert (again["method"], again["gate"]) == (m["method"], m["gate"]) == ("hira", "token")


def test_eval_only_without_an_adapter_evaluates_the_pretrained_model_and_says_so(workdir, monkeypatch, tmp_path,
                                                                                capsys):
    model_dir, _, _ = workdir
    run_train(workdir, monkeypatch, tmp_path / "a", "--max-steps", "2", "--lr", "1e-2")  # its "before": the pretrained model
    capsys.readouterr()
    m = run_eval(workdir, monkeypatch, tmp_path / "z")
    printed = capsys.readouterr().out
    assert f"{model_dir}: " in printed and " | no adapter | " in printed
    assert (m["method"], m["gate"]) == (None, None)  # no adapter: no method, no gate
    read = [[json.loads(line) for line in (d / "piqa" / "predictions.jsonl").read_text().splitlines()]
            for d in (tmp_path / "a" / "before", tmp_path / "z" / "eval-1")]
    assert read[0] == read[1]  # the same log-likelihoods as the evaluation before training


def test_generate_eval_runs_greedy_batched_generation(workdir, monkeypatch, tmp_path):
    """Greedy generation of 4 prompts of different lengths, in batches of 3 (left-padded) and one at a
    time, gives the same text. The tiny model's weights are scaled up 6 times so that its greedy
    continuations differ from prompt to prompt (at init scale every prompt continues the same)."""
    sharp = tmp_path / "sharp"
    shutil.copytree(workdir[0], sharp)
    weights = load_file(sharp / "model.safetensors")
    save_file({k: 6 * v if v.dim() == 2 else v for k, v in weights.items()}, sharp / "model.safetensors")
    rows = {}
    for size in (3, 1):  # batched (4 items in batches of 3, left-padded) and one at a time
        m = run_eval(workdir, monkeypatch, tmp_path / f"g{size}", "--format", "label", "--eval",
                     "generate", "--eval-batch-size", str(size), "--model", str(sharp))
        rows[size] = [json.loads(line) for line in
                      (tmp_path / f"g{size}" / "eval-1" / "piqa" / "predictions.jsonl").read_text().splitlines()]
        assert m["eval_mode"] == "generate" and m["accuracy_after"] == sum(r["pred"] == r["gold"] for r in rows[size]) / 4
    assert [r["index"] for r in rows[3]] == [0, 1, 2, 3] and {"generated", "extracted", "pred", "gold"} <= set(rows[3][0])
    assert [r["generated"] for r in rows[3]] == [r["generated"] for r in rows[1]]  # greedy: the batch changes nothing
    assert len({r["generated"] for r in rows[3]}) > 1  # and what it generates depends on the prompt
    for r in rows[3]:
        assert r["extracted"] == data.extract_answer("piqa", r["generated"])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workdir, monkeypatch, tmp_path):
    real_loss = fused.LinearCrossEntropy.apply
    calls = {"n": 0}

    def poisoned(*a, **k):  # 5 calls time the training and count its FLOPs, then 2 a step: the 10th (step 3) is NaN
        calls["n"] += 1
        return real_loss(*a, **k) * (float("nan") if calls["n"] == 10 else 1.0)
    monkeypatch.setattr(fused.LinearCrossEntropy, "apply", poisoned)
    with pytest.raises(UserError, match="not finite"):
        run_train(workdir, monkeypatch, tmp_path / "nan", "--max-steps", "6", "--ckpt-interval", "2")
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["adapter"].values())


@pytest.mark.slow
def test_resume_after_kill_9_ends_with_the_same_adapter_bit_for_bit(workdir, tmp_path):
    script = launcher(workdir, tmp_path)
    common = ["--max-steps", "16", "--ckpt-interval", "3", "--method", "lora", "--dropout", "0.1", "--lr", "1e-2"]
    subprocess.run([sys.executable, script, *args_for(workdir, tmp_path / "full", *common)], check=True,
                   capture_output=True, timeout=TIMEOUT)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, script, *args_for(workdir, out, *common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill -9 once a mid-run checkpoint exists
        if (out / "ckpt.pt").exists() and torch.load(out / "ckpt.pt", weights_only=True)["step"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    killed_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= killed_at < 16, "the run was not killed mid-way"
    r = subprocess.run([sys.executable, script, *args_for(workdir, out, *common, "--resume")], capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'ckpt.pt'} at step {killed_at}" in r.stdout
    a, b = load_file(tmp_path / "full" / "adapter" / "adapter.safetensors"), load_file(out / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_and_two_processes(workdir, tmp_path, *flags):
    """The same training run in one process (tmp_path/one) and under torchrun in two (tmp_path/two);
    returns their adapters' tensors."""
    script = launcher(workdir, tmp_path)
    subprocess.run([sys.executable, script, *args_for(workdir, tmp_path / "one", *flags)], check=True,
                   capture_output=True, timeout=TIMEOUT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        script, *args_for(workdir, tmp_path / "two", *flags)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return [load_file(tmp_path / run / "adapter" / "adapter.safetensors") for run in ("one", "two")]


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process_with_the_same_global_batch(workdir, tmp_path):
    a, b = one_and_two_processes(workdir, tmp_path, "--max-steps", "3", "--lr", "1e-2", "--eval-examples", "1")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if k.endswith("lora_B"))  # it trained


@pytest.mark.slow
def test_two_process_torchrun_with_a_short_last_batch_equals_one_process(workdir, tmp_path):
    """7 examples in batches of 3 cut into 2 micro-batches: the last batch has one example, so one of
    the two ranks has none; it must still join the gradient all-reduce (a stand-in of weight 0)."""
    a, b = one_and_two_processes(workdir, tmp_path, "--max-steps", "3", "--lr", "1e-2", "--eval-examples", "1",
                                 "--train-examples", "7", "--batch-size", "3")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    one, two = ([json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert [r["task_loss"] for r in two] == pytest.approx([r["task_loss"] for r in one], rel=1e-4)


def test_resume_without_a_checkpoint_says_so_and_trains_from_scratch(workdir, monkeypatch, tmp_path, capsys):
    fresh = run_train(workdir, monkeypatch, tmp_path / "fresh", "--max-steps", "2", "--lr", "1e-2")
    capsys.readouterr()
    resumed = run_train(workdir, monkeypatch, tmp_path / "new", "--max-steps", "2", "--lr", "1e-2", "--resume")
    assert f"--resume: no {tmp_path / 'new' / 'ckpt.pt'} yet, starting from scratch" in capsys.readouterr().out
    assert resumed["accuracy_before"] == fresh["accuracy_before"]  # it evaluated before, as a fresh run does
    a, b = (load_file(tmp_path / d / "adapter" / "adapter.safetensors") for d in ("fresh", "new"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_after_a_resume_the_comparison_reads_the_evaluation_before_from_disk(workdir, monkeypatch, tmp_path, capsys):
    """A resumed run does not evaluate before again: it compares the evaluation after with the
    predictions before on disk. Changing one prediction there changes the comparison."""
    out = tmp_path / "r"
    first = run_train(workdir, monkeypatch, out, "--max-steps", "2", "--lr", "1e-2")
    path = out / "before" / "piqa" / "predictions.jsonl"
    before = [json.loads(line) for line in path.read_text().splitlines()]
    before[0]["pred"] = 1 - before[0]["pred"]  # item 0: right <-> wrong before training
    path.write_text("".join(json.dumps(r) + "\n" for r in before))
    capsys.readouterr()
    again = run_train(workdir, monkeypatch, out, "--max-steps", "2", "--lr", "1e-2", "--resume")
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'ckpt.pt'} at step 2" in printed and "before (zero-shot)" in printed
    after = [json.loads(line) for line in (out / "after" / "piqa" / "predictions.jsonl").read_text().splitlines()]
    right = [(p["pred"] == p["gold"], q["pred"] == q["gold"]) for p, q in zip(before, after)]
    b, c = sum(x and not y for x, y in right), sum(y and not x for x, y in right)
    assert (again["mcnemar"]["piqa"]["acc"]["only_before_right"], again["mcnemar"]["piqa"]["acc"]["only_after_right"]) == (b, c)
    old = first["mcnemar"]["piqa"]["acc"]
    assert (b, c) != (old["only_before_right"], old["only_after_right"])  # the edit on disk is what it compared


def test_the_learning_rate_warms_up_linearly_then_decays_linearly_to_zero():
    args = SimpleNamespace(lr=1e-2, warmup=4)
    total = 20
    want = [1e-2 * (s + 1) / 4 for s in range(4)] + [1e-2 * (total - s) / (total - 4) for s in range(4, total + 1)]
    assert [train.lr_at(s, args, total) for s in range(total + 1)] == pytest.approx(want, rel=1e-12, abs=0)
    assert train.lr_at(3, args, total) == train.lr_at(4, args, total) == 1e-2 and train.lr_at(total, args, total) == 0


def test_the_default_warmup_is_a_tenth_of_the_run_at_most_100_steps_so_a_short_run_decays_too():
    args = SimpleNamespace(lr=1e-2, warmup=None)  # no --warmup
    for total, w in ((72, 7), (435, 43), (1000, 100), (5000, 100), (5, 1)):
        want = [1e-2 * (s + 1) / w for s in range(w)] + [1e-2 * (total - s) / (total - w) for s in range(w, total + 1)]
        assert [train.lr_at(s, args, total) for s in range(total + 1)] == pytest.approx(want, rel=1e-12, abs=0)


def test_the_timing_model_extrapolates_two_timed_micro_batches_to_every_step(monkeypatch):
    """budget.timing_model times a forward and backward of a micro-batch of median-length examples and of
    its first half. With a clock where one takes exactly 0.5 s + 0.01 s per padded token, the model is
    (0.5, 0.01), and step_seconds prices each step as the sum over its micro-batches of the first process."""
    clock, seen = [100.0], []
    monkeypatch.setattr(budget.time, "time", lambda: clock[0])

    def run(batch, n_targets, n_real):  # "takes" 0.5 s + 0.01 s a token
        seen.append(tuple(batch[0].shape))                              # (B, T) padded
        clock[0] += 0.5 + 0.01 * batch[0].numel()
    lengths = [3 * n + n % 4 for n in range(20)]                      # increasing, 3 to 60 tokens
    encoded = [(list(range(n)), [-100] * (n - 2) + [1, 2]) for n in lengths]
    args = SimpleNamespace(batch_size=4, grad_accum=2, micro_batch_tokens=10**6, seed=0)  # parts of 2
    assert budget.timing_model(run, encoded, 0, torch.device("cpu"), args) == pytest.approx((0.5, 0.01, 0), rel=1e-9)
    assert seen == [(2, lengths[11])] * 3 + [(1, lengths[10])] * 2  # examples 10, 11 (then their FLOPs), 10
    for world in (1, 2):
        costs = budget.step_seconds(encoded, args, world, 7, budget.Timing(0.5, 0.01, 0, 1))  # 7 steps: an epoch of 5, then 2 more
        for s, cost in enumerate(costs):
            batch = data.length_grouped_batches(lengths, 4, s // 5)[s % 5]
            mine = [batch[i:i + 2] for i in (0, 2)][::world]               # the first process's parts
            assert cost == pytest.approx(sum(0.5 + 0.01 * 2 * max(lengths[i] for i in mb) for mb in mine), rel=1e-9)


def test_the_eta_scales_the_cost_of_the_steps_left_by_what_the_steps_so_far_took():
    costs = [1.0, 1.0, 4.0, 4.0, 2.0]
    assert budget.eta(costs, 0, 2, 3.0) == pytest.approx(3.0 * 10.0 / 2.0)  # 1.5 x slower than modelled
    assert budget.eta(costs, 1, 3, 10.0) == pytest.approx(10.0 * 6.0 / 5.0)  # resumed at step 1
    assert budget.eta(costs, 0, 5, 7.0) == 0


def test_a_time_budget_takes_as_many_examples_as_fit_and_refuses_one_too_short_for_a_step():
    lengths = [10] * 40                                                  # 40 examples of 10 tokens: 10 batches of 4
    encoded = [([0] * n, [-100] * (n - 1) + [1]) for n in lengths]
    args = SimpleNamespace(batch_size=4, grad_accum=1, micro_batch_tokens=10**6, seed=0, epochs=2, time_budget=600)
    n, per_example = budget.fit_examples(args, encoded, 1, budget.Timing(1.0, 0.05, 0, 1), 30.0)  # a step: 1 s + 0.05 s x 40 tokens
    assert per_example == pytest.approx(3.0 / 4) and n == int(30.0 / (2 * 0.75)) == 20
    assert budget.fit_examples(args, encoded, 1, budget.Timing(1.0, 0.05, 0, 1), 1000.0)[0] == 40  # never more than there are
    with pytest.raises(UserError, match="--time-budget 00:10:00 leaves 00:00:05 for training.*less than one step"):
        budget.fit_examples(args, encoded, 1, budget.Timing(1.0, 0.05, 0, 1), 5.0)


def test_a_long_batch_is_cut_into_micro_batches_of_at_most_the_token_budget():
    """micro_batches: parts of equal size, at least --grad-accum of them, none holding more than
    --micro-batch-tokens padded tokens (examples x the longest) unless one example alone is longer;
    every example exactly once, in order; every process gets as many parts."""
    lengths = [36] * 16 + list(range(196, 260, 4)) + [300]                # a short batch, a long one (to 256), one
    encoded = [([0] * n, [-100] * (n - 1) + [1]) for n in lengths]
    short, long, alone = list(range(16)), list(range(16, 32)), [32]
    for idx, grad_accum, max_tokens, want in [(short, 1, 1024, [16]), (short, 2, 1024, [8, 8]), (long, 1, 1024, [4] * 4),
                                          (long, 1, 512, [2] * 8), (long, 1, 255, [1] * 16), (long, 3, 10**6, [6, 6, 4]),
                                          (alone, 1, 64, [1])]:
        parts = data.micro_batches(idx, encoded, grad_accum, max_tokens, 0, 1)[0]
        assert [len(p) for p in parts] == want and sum(parts, []) == idx
        assert all(len(p) * max(lengths[i] for i in p) <= max_tokens for p in parts if len(p) > 1)
    for world in (2, 3):  # the parts of the long batch dealt out: the same count for every process
        dealt = [data.micro_batches(long, encoded, 1, 1024, rank, world)[0] for rank in range(world)]
        assert len({len(d) for d in dealt}) == 1 and sorted(sum(sum(dealt, []), [])) == long
    assert data.micro_batches(long, encoded, 1, 1024, 0, 1)[1:3] == (16, sum(lengths[16:32]))  # the whole batch's counts


def test_resume_refuses_other_settings(workdir, monkeypatch, tmp_path):
    run_train(workdir, monkeypatch, tmp_path / "r", "--max-steps", "2")
    with pytest.raises(UserError, match="other settings"):
        run_train(workdir, monkeypatch, tmp_path / "r", "--max-steps", "2", "--lr", "5e-3", "--resume")


# =============================================================================
# train.py: the CPU budget, the batch cut into micro-batches

def test_a_cpu_run_with_no_budget_flag_takes_the_cpu_time_budget_and_says_so(workdir, monkeypatch, tmp_path, capsys):
    """No budget flag: the whole command in 30 minutes, as many examples as fit (all 8 of the tiny set);
    a flag that says how much to train (--max-steps) leaves the time budget out of the preset."""
    m = run_train(workdir, monkeypatch, tmp_path / "preset", "--device", "cpu", "--dtype", "auto")
    out = capsys.readouterr().out
    assert "budget (cpu preset for --time-budget, --epochs, --eval-examples): 8 of 8 train examples" in out
    assert "to end within 00:30:00" in out and "questions timed" in out
    assert m["n_train"] == 8 and m["args"]["train_examples"] == 8 and m["args"]["time_budget"] == 1800
    assert out.splitlines()[0].startswith("cpu: frozen base in ")  # the first line: the dtype, and why
    m = run_train(workdir, monkeypatch, tmp_path / "steps", "--max-steps", "1")
    assert "budget (cpu preset for --epochs, --eval-examples): 8 of 8" in capsys.readouterr().out
    m = run_train(workdir, monkeypatch, tmp_path / "flags", "--max-steps", "1", "--train-examples", "0",
                  "--epochs", "1", "--eval-examples", "0")
    assert "budget (" not in capsys.readouterr().out and m["n_train"] == 8


def test_a_time_budget_chooses_the_examples_and_a_resumed_run_keeps_them(workdir, monkeypatch, tmp_path, capsys):
    """--time-budget on a slow machine (a timing model of 100 s a micro-batch, two a step: 50 s an
    example; the evaluation after 10 s): 4 minutes leave about 230 s, 4 examples; said. --resume of that
    run keeps them; a budget too short for one step is refused."""
    monkeypatch.setattr(train, "timing_model", lambda *a: (100.0, 0.0, 1e9))  # s, s a token, FLOPs a token
    monkeypatch.setattr(train, "evaluation_seconds", lambda *a, **k: (10.0, 4))
    m = run_train(workdir, monkeypatch, tmp_path / "b", "--time-budget", "4m", "--skip-eval-before")
    out = capsys.readouterr().out
    assert m["n_train"] == 4 and "4 of 8 train examples x 1 epoch(s) = 1 steps of 4" in out
    assert "to end within 00:04:00" in out and "the evaluation after about 00:00:10 (4 questions timed)" in out
    m = run_train(workdir, monkeypatch, tmp_path / "b", "--time-budget", "4m", "--skip-eval-before", "--resume")
    assert m["n_train"] == 4 and m["args"]["train_examples"] == 4
    with pytest.raises(UserError, match="less than one step"):
        run_train(workdir, monkeypatch, tmp_path / "c", "--time-budget", "200s", "--skip-eval-before")


def test_cutting_a_batch_into_micro_batches_gives_the_same_gradients(workdir, monkeypatch, tmp_path):
    """The loss of every micro-batch is divided by the whole batch's token counts, so one micro-batch
    of 8 and four of 2 (of different lengths, padded differently) give the same gradients (as the
    optimizer receives them, after clipping) for the task loss and the entropy term alike."""
    grads, adamw_step = [], torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return adamw_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    common = ["--max-steps", "2", "--lr", "1e-2", "--batch-size", "8", "--skip-eval-before", "--entropy-weight", "0.5"]
    run_train(workdir, monkeypatch, tmp_path / "one", *common, "--grad-accum", "1")
    run_train(workdir, monkeypatch, tmp_path / "four", *common, "--grad-accum", "4")
    assert len(grads) == 4
    for one, four in zip(grads[:2], grads[2:]):
        for a, b in zip(one, four):  # fp32 sums in another order: equal to 1e-3 of the norm (measured 1e-4)
            assert (a - b).norm() <= 1e-3 * a.norm()
