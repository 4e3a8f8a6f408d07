"""Bad input of every kind ends in one UserError that says what is wrong, where, and what to do (issue 19)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bench
import cli
import export
import sample
import train
from checkpoints import (check_adapter, load_adapter, load_pretrained, read_checkpoint, save_adapter,
                         write_checkpoint)
from cli import UserError
from evaluate import comparison, read_predictions, write_predictions
from tokenizer import load_tokenizer
from tests.conftest import FIXTURES, ROOT, adapted_tiny, write_model_gguf
from tests.test_train import args_for, run_eval, run_train


# =============================================================================
# flags and folders: every refusal comes before the model loads, and no run destroys another's work


TIMEOUT = 120  # seconds: a subprocess that hangs fails its test


def no_model(monkeypatch):
    """Loading a model fails the test: a refusal must come before it."""
    for command in (train, sample, export):
        monkeypatch.setattr(command, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))


def files_of(folder):
    """{path under folder: bytes} of every file in it."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def step_of(ckpt):
    return torch.load(ckpt, weights_only=True)["step"]


@pytest.fixture(scope="module")
def finished_run(workdir, tmp_path_factory):
    """A finished tiny run of 2 steps with a gate page: every file a run writes."""
    out = tmp_path_factory.mktemp("finished") / "X"
    with pytest.MonkeyPatch.context() as mp:
        run_train(workdir, mp, out, "--max-steps", "2", "--lr", "1e-2", "--visualize", "2")
    return out


@pytest.fixture
def x(finished_run, tmp_path):
    """This test's own copy of the finished run, X."""
    shutil.copytree(finished_run, tmp_path / "X")
    return tmp_path / "X"


# --- the five ways a run destroyed another's work (issue 19): each first sets up the old failure

def test_the_same_command_again_is_refused_before_the_model_loads_and_the_run_kept(workdir, monkeypatch, x):
    kept, step = files_of(x), step_of(x / "ckpt.pt")
    assert step == 2 and {"ckpt.pt", "metrics.json", "log.jsonl", "adapter/adapter.safetensors",
                          "after/piqa/gates.html"} <= set(kept)
    no_model(monkeypatch)
    with pytest.raises(UserError, match=rf"--out {named(x)} holds a run \(ckpt.pt, metrics.json, log.jsonl, adapter, "
                                        r"before, after\): continue it with --resume, start over with --overwrite"):
        run_train(workdir, monkeypatch, x, "--max-steps", "2", "--lr", "1e-2", "--visualize", "2")
    assert files_of(x) == kept and step_of(x / "ckpt.pt") == 2


def test_adapter_without_eval_only_is_refused_and_the_adapter_kept(workdir, monkeypatch, x):
    kept = files_of(x)
    no_model(monkeypatch)
    for out in (x, x.parent / "new"):  # into the run it names, or anywhere: --adapter alone means nothing
        with pytest.raises(UserError, match=rf"--adapter {named(x / 'adapter')} names the adapter that --eval-only "
                                            "evaluates: add --eval-only"):
            run_train(workdir, monkeypatch, out, "--adapter", str(x / "adapter"))
    assert files_of(x) == kept and not (x.parent / "new").exists()


def test_eval_only_into_the_run_writes_eval_1_beside_it_and_keeps_the_training_record(workdir, monkeypatch, x,
                                                                                     capsys):
    kept, record = files_of(x), json.loads((x / "metrics.json").read_text())
    capsys.readouterr()
    m = run_eval(workdir, monkeypatch, x, "--adapter", str(x / "adapter"), "--visualize", "2")
    assert f"--eval-only: writing to {x / 'eval-1'}" in capsys.readouterr().out.splitlines()[1]  # said at once
    assert {k: v for k, v in files_of(x).items() if not k.startswith("eval-1/")} == kept  # metrics.json, after/, ...
    assert sorted(files_of(x / "eval-1")) == ["metrics.json", "piqa/gates.html", "piqa/predictions.jsonl"]
    assert json.loads((x / "eval-1" / "metrics.json").read_text()) == json.loads(json.dumps(m))
    assert m["accuracy_after"] == record["accuracy_after"] and "steps" in record  # the same adapter, scored again
    run_eval(workdir, monkeypatch, x, "--adapter", str(x / "adapter"))  # again: the next free number
    assert (x / "eval-2" / "metrics.json").exists() and files_of(x)["metrics.json"] == kept["metrics.json"]


def test_a_bare_eval_only_does_not_replace_after_with_zero_shot_predictions(workdir, monkeypatch, x):
    kept = files_of(x)
    run_eval(workdir, monkeypatch, x)
    assert {k: v for k, v in files_of(x).items() if not k.startswith("eval-1/")} == kept
    assert (x / "eval-1" / "piqa" / "predictions.jsonl").read_bytes() == kept["before/piqa/predictions.jsonl"]


def test_a_rerun_with_other_settings_is_refused_and_resume_refuses_them_too(workdir, monkeypatch, x):
    kept = files_of(x)
    no_model(monkeypatch)
    with pytest.raises(UserError, match=rf"--out {named(x)} holds a run"):
        run_train(workdir, monkeypatch, x, "--max-steps", "2", "--lr", "1e-2", "--rank", "8")
    with pytest.raises(UserError, match=r"was made with other settings \{'rank': \(4, 8\)\}"):
        run_train(workdir, monkeypatch, x, "--max-steps", "2", "--lr", "1e-2", "--rank", "8", "--visualize", "2",
                  "--resume")
    assert files_of(x) == kept


# --- the ways out: --overwrite, --resume; folders that cannot be written

def test_overwrite_deletes_exactly_the_run_files_then_trains_anew(workdir, monkeypatch, x, capsys):
    (x / "notes.txt").write_text("mine")
    shutil.copytree(x / "after", x / "eval-1")
    capsys.readouterr()
    m = run_train(workdir, monkeypatch, x, "--max-steps", "3", "--lr", "1e-2", "--overwrite")
    assert f"--overwrite: deleted ckpt.pt, metrics.json, log.jsonl, adapter, before, after in {x}" in \
        capsys.readouterr().out
    assert (x / "notes.txt").read_text() == "mine" and (x / "eval-1" / "piqa" / "gates.html").exists()
    assert step_of(x / "ckpt.pt") == m["steps"] == 3 and not (x / "after" / "piqa" / "gates.html").exists()
    run_train(workdir, monkeypatch, x, "--max-steps", "3", "--lr", "1e-2", "--resume")  # not "other settings"
    assert f"resumed from {x / 'ckpt.pt'} at step 3/3" in capsys.readouterr().out


def test_resume_and_overwrite_together_are_refused(workdir, monkeypatch, x):
    no_model(monkeypatch)
    with pytest.raises(UserError, match="--resume continues the run in --out and --overwrite deletes it"):
        run_train(workdir, monkeypatch, x, "--resume", "--overwrite")


def test_resume_of_a_run_without_its_checkpoint_is_refused_not_started_over(workdir, monkeypatch, x):
    (x / "ckpt.pt").unlink()  # e.g. deleted to save space: --resume would have trained from scratch over the run
    kept = files_of(x)
    no_model(monkeypatch)
    with pytest.raises(UserError, match=rf"--resume: {named(x)} holds a run \(metrics.json, log.jsonl, adapter, before, "
                                        r"after\) but no ckpt.pt to continue it from: start over with --overwrite"):
        run_train(workdir, monkeypatch, x, "--max-steps", "2", "--resume")
    assert files_of(x) == kept


@pytest.mark.parametrize("eval_only", [False, True])
def test_an_out_that_is_a_file_or_cannot_be_written_is_refused_before_the_model_loads(workdir, monkeypatch, tmp_path,
                                                                                   eval_only):
    run = run_eval if eval_only else run_train
    no_model(monkeypatch)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=rf"--out {named(tmp_path / 'file')} is a file, not a folder"):
        run(workdir, monkeypatch, tmp_path / "file")
    with pytest.raises(UserError, match=rf"--out {named(tmp_path / 'file' / 'sub')}: {named(tmp_path / 'file')} is a "
                                        "file, so no folder can be made there"):
        run(workdir, monkeypatch, tmp_path / "file" / "sub")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: a folder of /proc then, which nobody can write in
        locked = Path("/proc/self/gatera-out")
        if sys.platform != "linux":
            pytest.skip("no folder here that this user cannot write in")
    with pytest.raises(UserError, match=rf"--out {named(locked / 'run')}: cannot write in .*: give a folder you may"):
        run(workdir, monkeypatch, locked / "run")


# --- every number checked where it is parsed; flags that mean nothing alone

BAD_NUMBERS = [  # (command, flag, value): the cases first, then every other numeric flag
    ("train", "--eval-examples", "-5"), ("train", "--epochs", "-1"), ("train", "--max-steps", "-1"),
    ("train", "--entropy-weight", "-1"), ("train", "--cutoff", "1"), ("train", "--visualize", "-1"),
    ("train", "--batch-size", "0"), ("train", "--grad-accum", "0"), ("train", "--epochs", "0"),
    ("train", "--ckpt-interval", "0"), ("train", "--eval-batch-size", "0"), ("train", "--gate-init-std", "nan"),
    ("train", "--lr", "0"), ("train", "--lr", "-0.001"), ("train", "--weight-decay", "-0.1"), ("train", "--grad-clip", "-1"),
    ("train", "--warmup", "-1"), ("train", "--log-interval", "0"), ("train", "--eval-interval", "-2"),
    ("train", "--train-examples", "-1"), ("train", "--seed", "-1"), ("train", "--rank", "0"), ("train", "--rank", "2.5"),
    ("train", "--dropout", "1"), ("train", "--dropout", "-0.1"), ("train", "--alpha", "inf"),
    ("train", "--gate-init-bias", "nan"), ("train", "--gate-init-std", "-1"), ("train", "--batch-size", "many"),
    ("train", "--time-budget", "0"), ("train", "--time-budget", "1d"),
    ("sample", "--temperature", "-1"), ("sample", "--top-k", "0"), ("sample", "--prompt", ""),
    ("sample", "--max-new-tokens", "0"), ("sample", "--visualize", "-1"), ("sample", "--seed", "x"),
    ("bench", "--batch", "0"), ("bench", "--seq", "0"), ("bench", "--layers", "0"), ("bench", "--rank", "0"),
    ("bench", "--steps", "0"), ("bench", "--warmup", "0"), ("bench", "--prompt", "0"), ("bench", "--new", "0"),
    ("bench", "--peak-tflops", "0"), ("export", "--adapter", " ")]


def command(name):
    """The command's main, taking the flags after the ones it requires."""
    return {"train": train.main, "sample": lambda argv: sample.main(["--prompt", "x", *argv]),
            "bench": bench.parse_args, "export": lambda argv: export.main(["--peft", "p", *argv])}[name]


@pytest.mark.parametrize("name, flag, value", BAD_NUMBERS)
def test_a_bad_value_is_refused_as_it_is_parsed_naming_the_flag_and_the_range(name, flag, value, monkeypatch,
                                                                             tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    no_model(monkeypatch)
    with pytest.raises(SystemExit) as e:
        command(name)([flag, value])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and re.search(rf"error: argument {flag}: must (not )?be ", err), err
    assert "must not be empty" in err if not value.strip() else f"got {value!r}" in err


TOGETHER = [  # (command, flags, the refusal)
    ("train", ["--adapter", "a"], r"--adapter a names the adapter that --eval-only evaluates"),
    ("train", ["--eval-only", "--rank", "8", "--lr", "1e-3", "--skip-eval-before"],
     r"--eval-only trains nothing, so --lr, --rank, --skip-eval-before would be ignored: leave them out"),
    ("train", ["--eval-only", "--method", "hira"], r"--eval-only trains nothing, so --method would be"),  # a default too
    ("train", ["--resume", "--overwrite"], r"give one of them"),
    ("train", ["--train-examples", "3", "--batch-size", "4"],
     r"--train-examples 3 is less than one batch \(--batch-size 4\): take at least 4, or 0 for all"),
    ("train", ["--time-budget", "10m", "--train-examples", "0"],
     r"--time-budget chooses how many examples to train on, and --train-examples says it too"),
    ("train", ["--time-budget", "1h", "--max-steps", "5", "--train-examples", "100"], r"--train-examples and --max-steps say it"),
    ("train", ["--grad-accum", "8", "--batch-size", "4"], r"--grad-accum 8 cuts each batch of --batch-size 4 into more"),
    ("train", ["--eval", "generate"], r"--eval generate is for --format label"),
    ("train", ["--gate", "none", "--visualize", "2"], r"--visualize shows the gates, but an adapter with gate none has"),
    ("train", ["--eval-only", "--visualize", "2"], r"--visualize shows the gates, but the bare model has none"),
    ("train", ["--method", "hira", "--dropout", "0.1"], r"HiRA uses no dropout .*\(--dropout 0\)"),
    ("train", ["--target-modules", ","], r"target_modules is empty"),
    ("sample", ["--top-k", "5"], r"--top-k 5 picks among the likeliest tokens when sampling, and --temperature 0 is"),
    ("sample", ["--visualize", "1"], r"--visualize shows the gates, but the bare model has none")]


@pytest.mark.parametrize("name, flags, message", TOGETHER)
def test_flags_that_mean_nothing_in_their_combination_are_refused_before_the_model_loads(name, flags, message,
                                                                                       monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    no_model(monkeypatch)
    with pytest.raises(UserError, match=message):
        command(name)(flags)


def test_given_tells_flags_on_the_command_line_from_defaults():
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--on", action="store_true")
    parser.add_argument("--name", default="a")
    assert cli.given(parser, ["--n", "3", "--on"]) == {"n", "on"}  # given, even at the default value
    assert cli.given(parser, []) == set() and parser.parse_args([]).n == 3  # and the defaults are back


@pytest.mark.parametrize("name", ["train", "sample", "bench"])
def test_a_device_this_machine_lacks_is_refused_first_naming_it_and_what_to_use(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    no_model(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"--device cuda: CUDA is not available here \(.*\); use --device cpu \(or auto\)"):
        command(name)(["--device", "cuda"])
    with pytest.raises(UserError, match=r"--device mps: Apple's MPS is not available here; use --device cpu"):
        command(name)(["--device", "mps"])
    with pytest.raises(UserError, match=r"--device gpu0: not a device; use auto, cpu, cuda, cuda:N or mps"):
        command(name)(["--device", "gpu0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"--device cuda:3: this machine has 1 GPU\(s\), cuda:0 to cuda:0"):
        command(name)(["--device", "cuda:3"])


def test_bench_refuses_unknown_rows_and_an_out_that_is_a_folder_before_running_any(tmp_path):
    with pytest.raises(UserError, match=r"--rows / --profile: unknown row\(s\) \['lora/gated'\]; choose from base, "):
        bench.parse_args(["--rows", "base,lora/gated"])
    with pytest.raises(UserError, match=r"unknown row\(s\) \['hira'\]"):
        bench.parse_args(["--profile", "hira"])
    with pytest.raises(UserError, match=rf"--out {named(tmp_path)} is a folder: give the JSON file to write"):
        bench.parse_args(["--out", str(tmp_path)])
    with pytest.raises(UserError, match=r"--seq 2048 and --prompt \+ --new \(192\) must each fit GPT-2's 1024 positions"):
        bench.parse_args(["--seq", "2048", "--out", str(tmp_path / "b.json")])


def test_export_refuses_to_write_into_the_adapter_or_the_model_it_reads(workdir, monkeypatch, x):
    no_model(monkeypatch)
    for flag in ("--peft", "--merged"):
        with pytest.raises(UserError, match=rf"{flag} {named(x / 'adapter')} is the --adapter folder, whose files it "
                                            "would replace"):
            export.main(["--adapter", str(x / "adapter"), "--model", str(workdir[0]), flag, str(x / "adapter")])
        with pytest.raises(UserError, match=rf"{flag} {named(workdir[0])} is the --model folder"):
            export.main(["--adapter", str(x / "adapter"), "--model", str(workdir[0]), flag, str(workdir[0])])


# --- what only the data or the run shows: the cutoff, the warmup, --grad-clip 0

def test_a_cutoff_that_leaves_no_answer_token_is_refused_before_the_evaluation(workdir, monkeypatch, tmp_path):
    monkeypatch.setattr(train, "evaluate_tasks", lambda *a, **k: pytest.fail("it evaluated"))
    with pytest.raises(UserError, match=r"--cutoff 2: no training example keeps a token of its answer"):
        run_train(workdir, monkeypatch, tmp_path / "c", "--cutoff", "2")


def test_a_run_no_longer_than_its_warmup_says_so_in_one_notice(workdir, monkeypatch, tmp_path, capsys):
    notices = {}
    for warmup in (5, 2, 1):
        run_train(workdir, monkeypatch, tmp_path / f"w{warmup}", "--max-steps", "2", "--warmup", str(warmup),
                  "--skip-eval-before", "--eval-examples", "1")
        notices[warmup] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice:")]
    assert notices[5] == ["notice: --warmup 5 is not shorter than the run's 2 steps: the learning rate never reaches "
                          "the peak --lr 0.001 (at most 0.0004) and never decays; a smaller --warmup gives warmup, "
                          "then decay"]
    assert len(notices[2]) == 1 and "reaches the peak --lr 0.001 only at the last step" in notices[2][0]
    assert notices[1] == []


def test_a_target_module_the_model_lacks_is_one_line_naming_the_flag_before_the_evaluation(workdir, monkeypatch,
                                                                                           tmp_path):
    monkeypatch.setattr(train, "evaluate_tasks", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(UserError, match=r"target module\(s\) \['c_attn'\] match no nn.Linear in the model "
                                        r"\(--target-modules\); its linear layers are named \["):
        run_train(workdir, monkeypatch, tmp_path / "t", "--target-modules", "q_proj,c_attn")


def test_grad_clip_0_clips_nothing(workdir, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a))
    for clip in ("0", "1"):
        run_train(workdir, monkeypatch, tmp_path / f"c{clip}", "--max-steps", "2", "--grad-clip", clip,
                  "--skip-eval-before", "--eval-examples", "1")
    assert len(calls) == 2 and all(a[1] == 1.0 for a in calls)  # only the run with --grad-clip 1


# --- Ctrl-C, and the one place user errors become one line

def test_ctrl_c_during_training_ends_in_one_line_with_exit_130_and_a_whole_checkpoint(workdir, tmp_path):
    script = tmp_path / "launch.py"  # train.py as a command, with the hand-written data files' hashes
    # Ctrl-C as in a terminal: a test run started in the background (`nohup ... &`) inherits SIGINT ignored
    script.write_text(f"import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                      f"sys.path.insert(0, {str(ROOT)!r})\nimport cli, data, train\n"
                      f"data.BLOBS.update({workdir[2]!r})\ncli.run(lambda: train.main(sys.argv[1:]))\n")
    out, stdout = tmp_path / "run", tmp_path / "stdout.txt"
    with open(stdout, "w") as f:
        proc = subprocess.Popen([sys.executable, script, *args_for(workdir, out, "--max-steps", "100000",
                                                                     "--ckpt-interval", "2", "--skip-eval-before")],
                                stdout=f, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + TIMEOUT
        while proc.poll() is None and time.time() < deadline and "step 3/100000" not in stdout.read_text():
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    line = re.fullmatch(rf"interrupted at step (\d+); the checkpoint of step (\d+) is in {named(out / 'ckpt.pt')}; "
                        r"continue with --resume", err.strip().splitlines()[-1])
    assert line, err
    at, kept = map(int, line.groups())
    assert 3 <= at and kept % 2 == 0 and at - 2 <= kept <= at  # one of the last (each 2 steps; maybe mid-write)
    assert read_checkpoint(out / "ckpt.pt")["step"] == kept and not [p for p in os.listdir(out) if ".tmp-" in p]


def test_run_turns_a_user_error_into_one_line_and_exit_2_and_keeps_a_bug_s_traceback(capsys):
    def bad_input():
        raise UserError("--x 3: too many")

    with pytest.raises(SystemExit) as e:
        cli.run(bad_input)
    assert e.value.code == 2 and capsys.readouterr().err == "error: --x 3: too many\n"
    with pytest.raises(KeyError):  # a bug is not the user's error: its traceback stays
        cli.run(lambda: {}["x"])

    def ctrl_c():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run(ctrl_c)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_every_command_ends_in_cli_run_and_a_user_error_is_one_line(tmp_path):
    for name in ("train", "sample", "export", "evaluate", "bench"):
        source = (ROOT / f"{name}.py").read_text()
        assert source.endswith('\n\nif __name__ == "__main__":\n    run(main)\n') and source.count("__main__") == 1, name
        assert "sys.exit(" not in source and "except (FileNotFoundError, ValueError" not in source, name
    r = subprocess.run([sys.executable, ROOT / "evaluate.py", tmp_path / "a.jsonl"], capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 2 and r.stderr.startswith("error: give two or more predictions.jsonl files to compare")
    assert len(r.stderr.splitlines()) == 1


# =============================================================================
# damaged files: each is a file the code wrote, damaged, and the error names it

def named(path):
    """path as a regular expression that matches it literally."""
    return re.escape(str(path))


def cut(path, keep=0.5):
    """Truncate the file at path to a fraction keep of its bytes (or to keep bytes, an int), as an
    interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    return path


def checkpoint_folder(tmp_path, config=None):
    """A copy of the tiny Llama checkpoint folder, with its config.json dict changed by config."""
    folder = tmp_path / "tiny"
    shutil.copytree(FIXTURES / "tiny_llama", folder)
    if config:
        (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **config}))
    return folder


def saved_adapter(tmp_path, **kw):
    """An adapter folder as train.py writes it: trained on the tiny Llama (named "tiny_llama"), rank 4."""
    save_adapter(adapted_tiny("tiny_llama", method="lora", gate="token", **kw), tmp_path / "adapter", "tiny_llama")
    return tmp_path / "adapter"


def test_a_cut_short_ckpt_pt_names_itself_and_says_what_to_do(tmp_path):
    model = adapted_tiny("tiny_llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    write_checkpoint(Namespace(out=str(tmp_path), lr=1e-3), 0, model, optimizer, [], {}, torch.device("cpu"))
    assert read_checkpoint(tmp_path / "ckpt.pt")["step"] == 0
    with pytest.raises(UserError, match=rf"{named(tmp_path / 'ckpt.pt')} is damaged or cut short .*delete it to start"):
        read_checkpoint(cut(tmp_path / "ckpt.pt"))


def test_a_ckpt_pt_that_train_py_did_not_write_is_refused_by_name(tmp_path):
    torch.save({"step": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match=rf"{named(tmp_path / 'ckpt.pt')} is not a checkpoint of train.py .*no adapter"):
        read_checkpoint(tmp_path / "ckpt.pt")


def test_a_cut_short_adapter_safetensors_names_itself_before_a_model_is_needed(tmp_path):
    adapter = saved_adapter(tmp_path)
    cut(adapter / "adapter.safetensors")
    with pytest.raises(UserError, match=rf"{named(adapter / 'adapter.safetensors')} is damaged or cut short"):
        check_adapter(adapter)
    with pytest.raises(UserError, match=rf"{named(adapter / 'adapter.safetensors')} is damaged or cut short"):
        load_adapter(load_pretrained(FIXTURES / "tiny_llama"), adapter)


def test_a_damaged_adapter_config_json_names_itself(tmp_path):
    adapter = saved_adapter(tmp_path)
    cut(adapter / "adapter_config.json")
    with pytest.raises(UserError, match=rf"{named(adapter / 'adapter_config.json')} is damaged or cut short, not valid"):
        check_adapter(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"method": "lora", "rank": "three"}))
    with pytest.raises(UserError, match=rf"{named(adapter / 'adapter_config.json')}: rank is 'three', not int"):
        check_adapter(adapter)


def test_a_rank_that_does_not_match_the_tensors_says_so_not_another_base(tmp_path):
    adapter = saved_adapter(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "rank": 8}))
    with pytest.raises(UserError, match=r"says rank 8, but .*adapter\.safetensors holds rank 4 tensors") as e:
        check_adapter(adapter)
    assert "base model" not in str(e.value)


def test_an_adapter_records_its_base_and_refuses_another_base_of_the_same_shapes(tmp_path):
    adapter = saved_adapter(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model"] == "tiny_llama" and len(config["base_fingerprint"]) == 16
    load_adapter(load_pretrained(FIXTURES / "tiny_llama", dtype=torch.bfloat16), adapter)  # the same base in bf16
    other = checkpoint_folder(tmp_path)
    state = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}, other / "model.safetensors")
    with pytest.raises(UserError, match=rf"{named(adapter)} was trained on tiny_llama; this model's weights differ "
                                        r"\(fingerprint \w+ != \w+\): load the base it was trained on with --model"):
        load_adapter(load_pretrained(other), adapter)
    del config["base_model"], config["base_fingerprint"]  # an adapter saved before bases were recorded: no check
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    load_adapter(load_pretrained(other), adapter)


def test_a_cut_short_gguf_names_the_file_and_the_tensor_it_lacks(tmp_path):
    write_model_gguf("tiny_llama", tmp_path / "tiny.gguf")
    cut(tmp_path / "tiny.gguf", keep=0.9)
    with pytest.raises(UserError, match=rf"{named(tmp_path / 'tiny.gguf')} is not a whole GGUF file \([\d,]+ bytes\): "
                                        r"its tensors need [\d,]+ bytes, and [\w.]+ is the first one cut short; the "
                                        r"download may be incomplete"):
        load_pretrained(tmp_path / "tiny.gguf")
    cut(tmp_path / "tiny.gguf", keep=100)  # the header itself cut short
    with pytest.raises(UserError, match=rf"{named(tmp_path / 'tiny.gguf')} is not a whole GGUF file .*header is"):
        load_pretrained(tmp_path / "tiny.gguf")


def test_a_cut_short_config_json_names_itself(tmp_path):
    folder = checkpoint_folder(tmp_path)
    cut(folder / "config.json")
    with pytest.raises(UserError, match=rf"{named(folder / 'config.json')} is damaged or cut short, not valid JSON "
                                        r"\(line \d+, column \d+"):
        load_pretrained(folder)


def test_a_cut_short_model_safetensors_names_itself(tmp_path):
    folder = checkpoint_folder(tmp_path)
    cut(folder / "model.safetensors")
    with pytest.raises(UserError, match=rf"{named(folder / 'model.safetensors')} is damaged or cut short"):
        load_pretrained(folder)


@pytest.mark.parametrize("values, message", [
    ({"num_attention_heads": 0}, r"n_head must be a positive integer, got 0 \(n_head is its 'num_attention_heads'\)"),
    ({"num_hidden_layers": "three"}, r"n_layer must be an integer >= 0, got 'three'"),
    ({"num_attention_heads": 6, "head_dim": None}, r"n_embd 32 is not divisible by n_head 6"),
    ({"rms_norm_eps": -1}, r"norm_eps must be a number > 0")])
def test_impossible_values_in_config_json_name_the_file_and_the_key(tmp_path, values, message):
    folder = checkpoint_folder(tmp_path, values)
    with pytest.raises(UserError, match=rf"{named(folder / 'config.json')}: GPTConfig\.{message}"):
        load_pretrained(folder)


def test_a_gpt2_config_json_with_n_head_0_names_the_file(tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(FIXTURES / "tiny_gpt2", folder)
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), "n_head": 0}))
    with pytest.raises(UserError, match=rf"{named(folder / 'config.json')}: GPTConfig\.n_head must be a positive"):
        load_pretrained(folder)


def test_a_cut_short_tokenizer_json_names_itself(tmp_path):
    shutil.copytree(FIXTURES / "tokenizers" / "smollm_tiny", tmp_path / "tok")
    cut(tmp_path / "tok" / "tokenizer.json")
    with pytest.raises(UserError, match=rf"{named(tmp_path / 'tok' / 'tokenizer.json')} is damaged or cut short"):
        load_tokenizer(tmp_path / "tok")


def test_a_cut_short_merges_txt_names_the_line(tmp_path):
    shutil.copytree(FIXTURES / "tokenizers" / "gpt2_tiny", tmp_path / "tok")
    lines = (tmp_path / "tok" / "merges.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "tok" / "merges.txt").write_text("\n".join(lines[:5] + [lines[5].split(" ")[0]]), encoding="utf-8")
    with pytest.raises(UserError, match=rf"{named(tmp_path / 'tok' / 'merges.txt')}: line 6 is not a merge rule"):
        load_tokenizer(tmp_path / "tok")


def predictions_file(path, n=4):
    write_predictions(path, [{"index": i, "pred": i % 2, "gold": 0} for i in range(n)])
    return path


def test_comparing_an_empty_predictions_file_says_it_is_empty(tmp_path):
    cut(predictions_file(tmp_path / "predictions.jsonl"), keep=0)
    with pytest.raises(UserError, match=rf"{named(tmp_path / 'predictions.jsonl')} holds no predictions \(it is empty"):
        read_predictions(tmp_path / "predictions.jsonl")


def test_a_broken_line_3_of_a_predictions_file_is_named_line_3(tmp_path):
    path = predictions_file(tmp_path / "predictions.jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [lines[2][:7]] + lines[3:]) + "\n")
    with pytest.raises(UserError, match=rf"{named(path)}: not a predictions.jsonl file \(line 3: "):
        read_predictions(path)
    path.write_text("\n".join(lines[:2] + ['{"index": 2}'] + lines[3:]) + "\n")
    with pytest.raises(UserError, match=rf"{named(path)}: line 3 is not a prediction \(it lacks pred, gold\)"):
        read_predictions(path)


def test_comparing_predictions_on_different_items_names_both_files(tmp_path):
    a, b = predictions_file(tmp_path / "a.jsonl"), predictions_file(tmp_path / "b.jsonl", n=3)
    with pytest.raises(UserError, match=rf"{named(b)} and {named(a)} hold predictions on different test items"):
        comparison([(str(p), read_predictions(p)) for p in (a, b)])


@pytest.mark.parametrize("command,argv", [(train, ["--batch-size", "0"]), (sample, ["--prompt", "x", "--top-k", "0"]),
                                          (export, ["--adapter", " "]), (bench, ["--steps", "0"])])
def test_a_bad_flag_value_is_one_line_naming_the_flag_not_the_whole_usage(command, argv, capsys):
    with pytest.raises(SystemExit) as e:
        command.parser.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "usage:" not in err, err
    assert f"argument {argv[-2]}: must " in err and err.endswith("(see --help)\n")


def test_export_refuses_an_output_folder_that_holds_files_unless_overwrite(tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "mine.txt").write_text("mine")
    adapter = tmp_path / "adapter"
    save_adapter(adapted_tiny(gate="none"), adapter)
    args = export.parser.parse_args(["--adapter", str(adapter), "--peft", str(tmp_path / "peft")])
    with pytest.raises(UserError, match=r"--peft .*peft already holds mine.txt: give another folder, or --overwrite"):
        export.check(args)
    assert (tmp_path / "peft" / "mine.txt").read_text() == "mine"
    export.check(export.parser.parse_args(["--adapter", str(adapter), "--peft", str(tmp_path / "peft"), "--overwrite"]))
