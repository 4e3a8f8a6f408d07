import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import train
from data import git_blob
from model import GPT, config_from_hf

HERE = Path(__file__).parent

# -----------------------------------------------------------------------------
# train.py end to end, on a tiny random Llama with a tiny real-format tokenizer and hand-written PIQA

PIQA = [("How do you keep bread fresh longer?", "Store it in a sealed bag.", "Store it in a hot oven.", 1),
        ("To dry wet shoes quickly,", "stuff them with newspaper.", "fill them with water.", 1),
        ("How can you open a stuck jar lid?", "Run the lid under hot water.", "Put the jar in the freezer.", 1),
        ("To cut a tomato cleanly,", "use a sharp serrated knife.", "use a wooden spoon.", 1),
        ("How do you cool soup faster?", "Put it in the sun.", "Split it into shallow bowls.", 2),
        ("To keep a candle from dripping,", "freeze it before lighting.", "paint it red.", 1),
        ("How do you remove a splinter?", "Use clean tweezers.", "Use a hammer.", 1),
        ("To unclog a drain,", "pour in more hair.", "use baking soda and vinegar.", 2)]


def piqa_example(goal, s1, s2, answer):
    instruction = (f"Please choose the correct solution to the question: {goal}\n\nSolution1: {s1}\n\n"
                   f"Solution2: {s2}\n\nAnswer format: solution1/solution2")
    return {"instruction": instruction, "input": "", "output": f"the correct answer is solution{answer}",
            "answer": f"solution{answer}"}


LLAMA_RENAMES = [("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
                 ("transformer.ln_f.", "model.norm."), (".attn.", ".self_attn."),
                 (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm.")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama checkpoint folder (Hugging Face layout, with the tiny SmolLM-style tokenizer) and a
    --data-dir holding hand-written PIQA train/test files; returns (model_dir, data_dir, blobs)."""
    root = tmp_path_factory.mktemp("train")
    model_dir, data_dir = root / "tiny", root / "data"
    model_dir.mkdir()
    cfg = {"model_type": "llama", "vocab_size": 558, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
    torch.manual_seed(0)
    model = GPT(config_from_hf(cfg, "tiny"))
    tensors = {}
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":
            for ours, hf in LLAMA_RENAMES:
                name = name.replace(ours, hf)
            tensors[name] = t.clone()
    save_file(tensors, model_dir / "model.safetensors")
    (model_dir / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(HERE / "fixtures" / "tokenizers" / "smollm_tiny" / f, model_dir / f)
    blobs = {}
    for split, rows in (("train", PIQA), ("test", PIQA[:4])):
        path = data_dir / "dataset" / "piqa" / f"{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([piqa_example(*r) for r in rows], indent=2))
        blobs[f"dataset/piqa/{split}.json"] = git_blob(path.read_bytes())
    return model_dir, data_dir, blobs


def args_for(workdir, out, *extra):
    model_dir, data_dir, _ = workdir
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--task", "piqa", "--out", str(out),
            "--rank", "4", "--batch-size", "2", "--grad-accum", "2", "--warmup", "2", "--log-interval", "1",
            "--cutoff", "400", *extra]


def run_train(workdir, monkeypatch, out, *extra):
    monkeypatch.setattr(data, "BLOBS", {**data.BLOBS, **workdir[2]})  # the hand-written files' hashes
    return train.main(args_for(workdir, out, *extra))


def launcher(workdir, tmp_path):
    """A script that runs train.main in a fresh process with the hand-written files' hashes."""
    script = tmp_path / "launch.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(HERE)!r})\nimport data, train\n"
                      f"data.BLOBS.update({workdir[2]!r})\ntrain.main(sys.argv[1:])\n")
    return script


def test_training_lowers_the_loss_and_writes_every_output(workdir, monkeypatch, tmp_path):
    m = run_train(workdir, monkeypatch, tmp_path / "out", "--method", "lora", "--lr", "3e-2", "--max-steps", "30",
                  "--entropy-weight", "0.1")
    assert m["train_loss_last"] < m["train_loss_first"] - 0.25  # nats; about 0.46 was measured
    for key in ("task", "model", "method", "gate", "entropy_weight", "n_train", "n_eval", "eval_mode",
                "accuracy_before", "accuracy_after", "train_loss_first", "train_loss_last", "tokens_per_s", "wall_s"):
        assert m[key] is not None, key
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["accuracy_after"] == m["accuracy_after"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert {"loss", "task_loss", "entropy", "gate_mean", "gate_below_0.1", "gate_above_0.9", "lr", "tokens_per_s"} <= set(log[0])
    assert sorted(os.listdir(out / "adapter")) == ["adapter.safetensors", "adapter_config.json"]
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # atomic writes leave no temporary files


def test_eval_only_with_the_saved_adapter_reproduces_the_accuracy_after(workdir, monkeypatch, tmp_path):
    m = run_train(workdir, monkeypatch, tmp_path / "a", "--max-steps", "4", "--lr", "1e-2")
    again = run_train(workdir, monkeypatch, tmp_path / "b", "--eval-only", "--adapter", str(tmp_path / "a" / "adapter"))
    assert again["accuracy_after"] == m["accuracy_after"]
    assert again["answer_loss_after"] == pytest.approx(m["answer_loss_after"], rel=1e-6)


def test_generate_eval_runs_greedy_batched_generation(workdir, monkeypatch, tmp_path):
    m = run_train(workdir, monkeypatch, tmp_path / "g", "--eval-only", "--eval", "generate", "--eval-batch-size", "3")
    assert m["eval_mode"] == "generate" and 0.0 <= m["accuracy_after"] <= 1.0


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workdir, monkeypatch, tmp_path):
    real_ce = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):  # the 5th micro-batch (step 3) returns NaN
        calls["n"] += 1
        return real_ce(*a, **k) * (float("nan") if calls["n"] == 5 else 1.0)
    monkeypatch.setattr(train.F, "cross_entropy", poisoned)
    with pytest.raises(SystemExit, match="not finite"):
        run_train(workdir, monkeypatch, tmp_path / "nan", "--max-steps", "6", "--ckpt-interval", "2")
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["adapter"].values())


def test_resume_after_kill_9_ends_with_the_same_adapter_bit_for_bit(workdir, tmp_path):
    script = launcher(workdir, tmp_path)
    common = ["--max-steps", "16", "--ckpt-interval", "3", "--method", "lora", "--dropout", "0.1", "--lr", "1e-2"]
    subprocess.run([sys.executable, script, *args_for(workdir, tmp_path / "full", *common)], check=True,
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, script, *args_for(workdir, out, *common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a mid-run checkpoint exists
        if (out / "ckpt.pt").exists() and torch.load(out / "ckpt.pt", weights_only=True)["step"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= killed_at < 16, "the run was not killed mid-way"
    r = subprocess.run([sys.executable, script, *args_for(workdir, out, *common, "--resume")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'ckpt.pt'} at step {killed_at}" in r.stdout
    a, b = load_file(tmp_path / "full" / "adapter" / "adapter.safetensors"), load_file(out / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_torchrun_equals_one_process_with_the_same_global_batch(workdir, tmp_path):
    script = launcher(workdir, tmp_path)
    common = ["--max-steps", "3", "--lr", "1e-2", "--eval-examples", "1"]
    subprocess.run([sys.executable, script, *args_for(workdir, tmp_path / "one", *common)], check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        script, *args_for(workdir, tmp_path / "two", *common)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if k.endswith("lora_B"))  # it trained


def test_resume_refuses_other_settings(workdir, monkeypatch, tmp_path):
    run_train(workdir, monkeypatch, tmp_path / "r", "--max-steps", "2")
    with pytest.raises(SystemExit, match="other settings"):
        run_train(workdir, monkeypatch, tmp_path / "r", "--max-steps", "2", "--lr", "5e-3", "--resume")


def test_cached_label_scoring_equals_scoring_each_full_sequence(workdir):
    """score_batch runs the shared prompt once and forks its KV cache per label; the plain way scores
    every prompt + label sequence on its own. Same scores, same answers."""
    from contextlib import nullcontext
    model_dir, data_dir, _ = workdir
    tok, model = data.load_tokenizer(model_dir), GPT.from_pretrained(model_dir).eval()
    batch = [piqa_example(*r) for r in PIQA[:5]]
    for ex, label in zip(batch[:3], ("solution1", "solution2", "solution2")):
        ex["answer"] = label  # vary which label is the correct one
    sums = {"prompt": [0.0, 0], "answer": [0.0, 0]}
    correct, nll, n = train.score_batch(model, tok, "piqa", batch, "cpu", nullcontext(), sums)
    plain_correct, plain_nll, plain_n = 0, 0.0, 0
    with torch.no_grad():
        for ex in batch:
            scores = {}
            for label, text in data.label_choices("piqa", ex["instruction"]).items():
                ids, labels = data.encode_example(tok, {"instruction": ex["instruction"], "output": text}, cutoff=10**9)
                ids, labels = ids[:-1], labels[:-1]  # not EOS
                logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], -1)  # (T-1, V)
                picked = [logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100]
                scores[label] = sum(picked)
                if label == ex["answer"]:
                    plain_nll, plain_n = plain_nll - sum(picked), plain_n + len(picked)
            plain_correct += max(scores, key=scores.get) == ex["answer"]
    assert (correct, n) == (plain_correct, plain_n)
    assert nll == pytest.approx(plain_nll, rel=1e-5)
