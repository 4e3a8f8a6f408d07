"""data.py: pinned verified task files, exact prompts, masks, answer extraction, downloads, cloze requests."""

import argparse
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
import evaluate
from checkpoints import load_pretrained
from cli import UserError
from tokenizer import load_tokenizer
from tests.conftest import ByteTok, CLOZE, FIXTURES, ROOT


# =============================================================================
# data.py, tasks: pinned verified files, exact prompts, masks, extraction

# LLM-Adapters' files in their upstream layout (what --data-dir takes; `python data.py` downloads them
# all into such a folder, ~/.cache/gatera/llm_adapters/<commit>)
DATA_DIR = Path(os.environ["GATERA_DATA_DIR"]) if os.environ.get("GATERA_DATA_DIR") else None
FIXTURE = ROOT / "fixtures" / "data" / "dataset" / "boolq" / "test.json"  # 3 hand-written boolq examples
FIXTURE_BLOB = "489ebe938ec595c94c68a727d6ea745eb7326515"  # `git hash-object fixtures/data/dataset/boolq/test.json`
BOOLQ_TEST = "dataset/boolq/test.json"

# LLM-Adapters' prompt (Hu et al. 2023, its finetune.py and commonsense_evaluate.py), copied character for
# character (16 spaces; one trailing space after "request.")
EVAL_TEMPLATE = "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n                ### Instruction:\n                {instruction}\n\n                ### Response:\n                "
# LLM-Adapters finetune.py: TWO spaces after "request.", 16 spaces on the blank line after the instruction
TRAIN_REFERENCE_TEMPLATE = "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n                ### Instruction:\n                {instruction}\n                \n                ### Response:\n                {output}"

INSTRUCTION = "Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false"
OUTPUT = "the correct answer is true"


def blob(b):  # git's object hash, written out here independently of data.git_blob
    return hashlib.sha1(b"blob " + str(len(b)).encode() + b"\x00" + b).hexdigest()


def example(answer="true", **kw):
    return {"instruction": INSTRUCTION, "input": "", "output": f"the correct answer is {answer}", "answer": answer, **kw}


# -----------------------------------------------------------------------------
# prompts, extraction, label choices

def test_eval_prompt_bytes():
    assert data.eval_prompt(INSTRUCTION) == EVAL_TEMPLATE.replace("{instruction}", INSTRUCTION)
    i = " " * 16  # the same, line by line
    assert data.eval_prompt("x").split("\n") == [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. ",
        "", i + "### Instruction:", i + "x", "", i + "### Response:", i]


def test_train_prompt_variants():
    assert data.train_prompt(INSTRUCTION, OUTPUT) == EVAL_TEMPLATE.replace("{instruction}", INSTRUCTION) + OUTPUT
    assert data.train_prompt(INSTRUCTION, OUTPUT, variant="reference") == \
        TRAIN_REFERENCE_TEMPLATE.replace("{instruction}", INSTRUCTION).replace("{output}", OUTPUT)
    with pytest.raises(ValueError, match="unknown training prompt variant 'alpaca'"):
        data.train_prompt(INSTRUCTION, OUTPUT, variant="alpaca")


@pytest.mark.parametrize("task, text, want", [
    ("boolq", data.eval_prompt(INSTRUCTION) + "the correct answer is false", "false"),  # not the "true/false" of the prompt
    ("boolq", "the correct answer is true", "true"),                                    # bare generation
    ("boolq", "  ### Response:\n false, not true", "false"),                            # FIRST match
    ("boolq", "### Response: True", ""),                                                # case-sensitive
    ("boolq", "### Response: no idea ### Response: true", ""),                          # up to a 2nd "### Response:"
    ("piqa", "### Response: solution2", "solution2"),
    ("social_i_qa", "### Response: answer3 answer1", "answer3"),
    ("ARC-Challenge", "### Response: the correct answer is answer5", "answer5"),
    ("hellaswag", "### Response: ending4", "ending4"),
    ("winogrande", "### Response: Option1", ""),
    ("winogrande", "### Response: option1", "option1"),
    ("piqa", "### Response: answer1", ""),                                              # not a piqa label
    ("commonsense_170k", "### Response: ending2 or true", "ending2"),                   # mixes: the union of labels
])
def test_extract_answer(task, text, want):
    assert data.extract_answer(task, text) == want


def test_label_choices():
    assert data.label_choices("boolq", INSTRUCTION) == {"true": "the correct answer is true",
                                                        "false": "the correct answer is false"}
    arc = "Please choose the correct answer to the question: Q?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3"
    assert list(data.label_choices("ARC-Easy", arc)) == ["answer1", "answer2", "answer3"]
    assert list(data.label_choices("openbookqa", "no format line")) == list(data.ANSWERS)  # all the task's labels
    piqa = "Q\n\nSolution1: a\n\nSolution2: b\n\nAnswer format: solution1/solution2"
    assert list(data.label_choices("commonsense_15k", piqa)) == ["solution1", "solution2"]


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="unknown task 'bool_q'"):
        data.load_task("bool_q", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.load_task("boolq", "dev")
    with pytest.raises(ValueError, match="commonsense_170k is a training mix"):
        data.load_task("commonsense_170k", "test")


# -----------------------------------------------------------------------------
# tokenized examples, masks, batches

def test_encode_example_masks():
    tok, ex = ByteTok(), example()
    prompt = list(data.eval_prompt(INSTRUCTION).encode())
    ids, labels = data.encode_example(tok, ex, cutoff=1000)  # default: loss on the response (and EOS) only
    assert ids == [256] + prompt + list(OUTPUT.encode()) + [257]
    assert labels == [-100] * (1 + len(prompt)) + list(OUTPUT.encode()) + [257]
    ids2, labels2 = data.encode_example(tok, ex, cutoff=1000, train_on_inputs=True)
    assert ids2 == ids and labels2 == ids
    ids3, labels3 = data.encode_example(tok, ex, cutoff=1000, variant="reference", bos=False)
    ref = TRAIN_REFERENCE_TEMPLATE.replace("{instruction}", INSTRUCTION).replace("{output}", "")
    assert ids3 == list(ref.encode()) + list(OUTPUT.encode()) + [257]
    assert labels3 == [-100] * len(ref.encode()) + list(OUTPUT.encode()) + [257]


def test_encode_example_cutoff(capsys):
    tok, ex = ByteTok(), example()
    n_prompt, n_full = 1 + len(data.eval_prompt(INSTRUCTION).encode()), 1 + len(data.train_prompt(INSTRUCTION, OUTPUT).encode())
    ids, labels = data.encode_example(tok, ex, cutoff=n_prompt + 5)  # truncated: no EOS, like the reference
    assert len(ids) == n_prompt + 5 and 257 not in ids and labels[-5:] == list(b"the c")
    ids, _ = data.encode_example(tok, ex, cutoff=n_full)  # exactly full: still no room for EOS
    assert len(ids) == n_full and ids[-1] != 257
    ids, _ = data.encode_example(tok, ex, cutoff=n_full + 1)
    assert ids[-1] == 257
    _, labels = data.encode_example(tok, ex, cutoff=n_prompt - 3)  # the prompt alone overflows
    assert labels == [-100] * (n_prompt - 3)
    out = data.encode_examples(tok, "boolq", [ex, ex, example("false")], name="boolq", cutoff=n_prompt - 3)
    assert len(out) == 3 and "boolq: 3 of 3 examples reach the cutoff" in capsys.readouterr().err


def test_collate_right_padding():
    ids, labels, mask = data.collate([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert labels.tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]] and ids.dtype == labels.dtype == torch.long


def test_collate_prompts_left_padding():
    tok = ByteTok()
    ids, mask = data.collate_prompts(tok, ["a", "abc"])
    p = [256] + list(data.eval_prompt("a").encode())
    assert ids.shape == (2, len(p) + 2) and mask.shape == ids.shape
    assert ids[0].tolist() == [258, 258] + p and mask[0].tolist() == [0, 0] + [1] * len(p)
    assert ids[1].tolist() == [256] + list(data.eval_prompt("abc").encode()) and mask[1].all()


# -----------------------------------------------------------------------------
# loading and validating files

def test_git_blob():  # values printed by `git hash-object`
    assert data.git_blob(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert data.git_blob(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert data.git_blob(FIXTURE.read_bytes()) == FIXTURE_BLOB


def test_data_dir_files_that_are_not_the_pinned_ones_are_warned_about_and_validated(tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match=str(tmp_path / BOOLQ_TEST)):
        data.load_task("boolq", "test", data_dir=tmp_path)
    (tmp_path / BOOLQ_TEST).parent.mkdir(parents=True)
    (tmp_path / BOOLQ_TEST).write_bytes(FIXTURE.read_bytes())
    capsys.readouterr()
    for _ in range(2):  # not the pinned file: the user's own data, warned about once, then loaded
        assert data.load_task("boolq", "test", data_dir=tmp_path) == json.loads(FIXTURE.read_text())
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert f"{tmp_path / BOOLQ_TEST} is not the pinned {BOOLQ_TEST}" in err and "not comparable" in err
    monkeypatch.setitem(data.BLOBS, BOOLQ_TEST, FIXTURE_BLOB)
    data.WARNED.clear()
    assert data.load_task("boolq", "test", data_dir=tmp_path) == json.loads(FIXTURE.read_text())
    assert capsys.readouterr().err == ""  # the pinned file: no warning


GOOD = json.dumps(example())
BAD_FILES = [
    (b"", "file is empty"),
    (b"  \n", "file is empty"),
    (b'[{"instruction": "x",\n "answer": }]', "invalid JSON at line 2, column 12"),
    (f'[{GOOD}, {GOOD[:30]}'.encode(), r"invalid JSON at line 1, column \d+: Unterminated string"),  # truncated
    (b"\xff\xfe[]", "not UTF-8 text"),
    (b'{"instruction": "x"}', "expected a JSON list of examples, got a JSON dict"),
    (b"[]", "the list holds no examples"),
    (f'[{GOOD}, "text"]'.encode(), "example 1 is a JSON str"),
    (f'[{GOOD}, {{"instruction": "x", "output": "y"}}]'.encode(), r"example 1 lacks the string field\(s\) \['answer'\]"),
    (f'[{GOOD}, {GOOD}, {json.dumps(example(answer="maybe"))}]'.encode(),
     "example 2: answer 'maybe' is not one of boolq's labels true|false"),
    (f'[{json.dumps(example(answer=1))}]'.encode(), "example 0 lacks the string field"),
    (f'[{json.dumps(example(input="context"))}]'.encode(), "example 0 has a non-empty 'input'"),
]


@pytest.mark.parametrize("content, error", BAD_FILES)
def test_bad_files(tmp_path, monkeypatch, content, error):
    file = tmp_path / BOOLQ_TEST
    file.parent.mkdir(parents=True)
    file.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{file}: .*{error}"):  # not the pinned file: validated
        data.load_task("boolq", "test", data_dir=tmp_path)


def test_mix_takes_every_task_label(tmp_path, monkeypatch):
    rel = "ft-training_set/commonsense_15k.json"
    rows = [example(answer=a) for a in ("true", "solution2", "answer5", "ending4", "option1")]
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text(json.dumps(rows))
    monkeypatch.setitem(data.BLOBS, rel, blob((tmp_path / rel).read_bytes()))
    assert [ex["answer"] for ex in data.load_task("commonsense_15k", "train", data_dir=tmp_path)] == [r["answer"] for r in rows]
    (tmp_path / rel).write_text(json.dumps(rows + [example(answer="ending5")]))
    monkeypatch.setitem(data.BLOBS, rel, blob((tmp_path / rel).read_bytes()))
    with pytest.raises(ValueError, match="example 5: answer 'ending5' is not one of commonsense_15k's labels"):
        data.load_task("commonsense_15k", "train", data_dir=tmp_path)


# -----------------------------------------------------------------------------
# several tasks: --task boolq,piqa

def test_task_list_takes_known_tasks_each_once_and_a_mix_alone():
    assert data.task_list("boolq, piqa") == "boolq,piqa"
    assert data.train_and_test_tasks("boolq,piqa") == (["boolq", "piqa"], ["boolq", "piqa"])
    assert data.train_and_test_tasks("piqa") == (["piqa"], ["piqa"])
    assert data.train_and_test_tasks("commonsense_15k") == (["commonsense_15k"], list(data.LABELS))
    for bad, said in (("boolq,piqaa", "unknown task 'piqaa'"), ("piqa,piqa", "each task once"),
                      ("piqa,commonsense_15k", "a mix (commonsense_170k / commonsense_15k) alone")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(said)):
            data.task_list(bad)


def test_several_tasks_train_on_their_union_each_with_its_labels_and_evaluate_each(tmp_path, monkeypatch):
    files = {("boolq", split): [example(answer=a) for a in ("true", "false") * n] for split, n in (("train", 6), ("test", 3))}
    piqa = ("Please choose the correct solution to the question: Q\n\nSolution1: a\n\nSolution2: b\n\n"
            "Answer format: solution1/solution2")
    files.update({("piqa", split): [example(answer=a, instruction=piqa) for a in ("solution1", "solution2") * n]
                  for split, n in (("train", 18), ("test", 4))})
    for (task, split), rows in files.items():
        (tmp_path / f"dataset/{task}").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"dataset/{task}/{split}.json").write_text(json.dumps(rows))
        monkeypatch.setitem(data.BLOBS, f"dataset/{task}/{split}.json", blob((tmp_path / f"dataset/{task}/{split}.json").read_bytes()))
    args = SimpleNamespace(task="boolq,piqa", data_dir=tmp_path, seed=3, format="cloze", cutoff=1000,
                           train_on_inputs=False, train_prompt="eval", eval_examples=2, train_examples=0)
    targets = lambda encoded: sorted(bytes(t for t in labels if 0 <= t < 256).decode() for _, labels in encoded)
    cloze = {"true": " yes", "false": " no", "solution1": " a", "solution2": " b"}  # lm-eval's continuations
    union = [cloze[r["answer"]] for task in ("boolq", "piqa") for r in files[(task, "train")]]
    sizes, encoded = data.load_training(args, ByteTok())  # each task's template: another task's fails to parse
    assert sizes == {"boolq": 12, "piqa": 36} and targets(encoded) == sorted(union)
    args.train_examples = 16  # a seeded draw from the union: the same as a draw of 16 of its 48 rows
    assert targets(data.load_training(args, ByteTok())[1]) == sorted(union[i] for i in data.subset(48, 16, 3))
    assert data.union_note(sizes) == " (the union of boolq 12, piqa 36: each task in proportion to its size)"
    assert data.union_note({"piqa": 36}) == ""
    tests = data.load_tests(args)  # --eval-examples 2: two of each task's test items, whatever the --seed
    assert data.load_tests(SimpleNamespace(**{**vars(args), "seed": 4})) == tests
    assert {t: len(items) for t, items in tests.items()} == {"boolq": 2, "piqa": 2}
    assert tests["piqa"][0][1]["answer"].startswith("solution") and tests["boolq"][0][1]["answer"] in ("true", "false")


# the real files of LLM-Adapters (outside the repository but for PIQA), their example counts
REAL = [("boolq", "train", 9427), ("boolq", "test", 3270), ("piqa", "train", 16113), ("piqa", "test", 1838),
        ("social_i_qa", "train", 33410), ("social_i_qa", "test", 1954), ("winogrande", "test", 1267),
        ("ARC-Easy", "train", 2251), ("openbookqa", "train", 4957)]


@pytest.mark.parametrize("task, split, count", REAL)
def test_real_files(task, split, count):
    if DATA_DIR is None or not (DATA_DIR / data.task_path(task, split)).is_file():
        pytest.skip(f"needs LLM-Adapters' {data.task_path(task, split)}: set GATERA_DATA_DIR to a folder with "
                    f"its files in their upstream layout (`python data.py` downloads them all into "
                    f"{data.cache_dir()})")
    examples = data.load_task(task, split, data_dir=DATA_DIR)  # passes the pinned git blob check
    assert len(examples) == count
    for ex in examples:  # the reference's own outputs extract to the answer, and the instruction offers it
        assert data.extract_answer(task, data.eval_prompt(ex["instruction"]) + ex["output"]) == ex["answer"]
        assert data.label_choices(task, ex["instruction"])[ex["answer"]] == ex["output"]


def cached(tmp_path):
    return tmp_path / "llm_adapters" / data.COMMIT / BOOLQ_TEST


def files(tmp_path):
    return sorted(p.name for p in tmp_path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_download_cached_and_reverified(server, tmp_path, monkeypatch, capsys):
    routes, hits = server
    good = FIXTURE.read_bytes()
    routes["/repo/" + BOOLQ_TEST] = (good, len(good))
    monkeypatch.setitem(data.BLOBS, BOOLQ_TEST, FIXTURE_BLOB)
    want = json.loads(good)
    assert data.load_task("boolq", "test") == want
    assert cached(tmp_path).read_bytes() == good and files(tmp_path) == ["test.json"]  # no .part left behind
    assert "downloading http://127.0.0.1" in capsys.readouterr().err and len(hits) == 1
    assert data.load_task("boolq", "test") == want and len(hits) == 1  # from the cache
    cached(tmp_path).write_bytes(good[:-10])  # a corrupt cache is caught and fetched again
    assert data.load_task("boolq", "test") == want and len(hits) == 2
    assert cached(tmp_path).read_bytes() == good and "fails its hash check" in capsys.readouterr().err


@pytest.mark.slow
def test_download_wrong_hash_not_cached(server, tmp_path):
    routes, _ = server
    routes["/repo/" + BOOLQ_TEST] = (FIXTURE.read_bytes(), len(FIXTURE.read_bytes()))  # not the pinned boolq test
    with pytest.raises(ValueError, match=f"git blob {FIXTURE_BLOB} .*{data.BLOBS[BOOLQ_TEST]}.*nothing was cached"):
        data.load_task("boolq", "test")
    assert files(tmp_path) == []


@pytest.mark.slow
def test_download_truncated_not_cached(server, tmp_path, monkeypatch):
    routes, _ = server
    good = FIXTURE.read_bytes()
    routes["/repo/" + BOOLQ_TEST] = (good[:200], len(good))  # the connection closes early
    monkeypatch.setitem(data.BLOBS, BOOLQ_TEST, FIXTURE_BLOB)
    with pytest.raises(ValueError, match=f"download truncated, 200 of {len(good)} bytes; nothing was cached"):
        data.load_task("boolq", "test")
    assert files(tmp_path) == []


@pytest.mark.slow
def test_download_unavailable_says_where_to_put_the_file(server, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="HTTP Error 404") as e:  # the server lacks the file
        data.load_task("boolq", "test")
    with socket.socket() as s:  # a port nobody listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GATERA_DATA_URL", f"http://127.0.0.1:{port}/repo")
    with pytest.raises(UserError) as e:
        data.load_task("boolq", "test")
    msg = str(e.value)
    assert f"could not download http://127.0.0.1:{port}/repo/{BOOLQ_TEST}" in msg
    assert f"put that file at {cached(tmp_path)}" in msg and f"at DIR/{BOOLQ_TEST}" in msg and "--data-dir" in msg
    assert files(tmp_path) == []


def lm_eval_order(row):
    """lm-eval's requests in the order of the instruction's labels (its BoolQ choices are no, yes)."""
    requests = [tuple(r) for r in row["lm_eval_requests"]]
    return requests[::-1] if row["task"] == "boolq" else requests


@pytest.mark.parametrize("row", CLOZE["templates"], ids=lambda r: r["task"])
def test_cloze_requests_equal_lm_eval_harness_task_definitions(row):
    """fixtures/make_cloze_fixtures.py wrote each document as LLM-Adapters' files do and let
    lm-eval-harness's own task definition turn it into (context, continuation) requests: parsing the
    instruction back gives the same requests and the same gold choice."""
    assert data.cloze_choices(row["task"], row["instruction"]) == lm_eval_order(row)
    gold = data.gold_index(row["task"], row)
    assert gold == (1 - row["lm_eval_gold"] if row["task"] == "boolq" else row["lm_eval_gold"])


@pytest.mark.parametrize("row", CLOZE["real"], ids=lambda r: f"{r['task']}-{r['index']}")
def test_cloze_requests_of_real_test_items_equal_lm_eval_harness(row):
    """Real test items of LLM-Adapters' files (the first two of each task, then those whose fields have a
    leading, trailing or double space, digits or non-ASCII text, and PIQA's items 489 "... smaller than
    soil " and 1442 "can store footballs  "), turned back into documents by fixtures/make_cloze_fixtures.py
    and given to lm-eval-harness's own task definitions: we score the same requests and the same gold."""
    assert data.cloze_choices(row["task"], row["instruction"]) == lm_eval_order(row)
    gold = data.gold_index(row["task"], row)
    assert gold == (1 - row["lm_eval_gold"] if row["task"] == "boolq" else row["lm_eval_gold"])


def test_cloze_continuations_keep_each_piqa_solution_as_it_is():
    """lm-eval scores " " + the solution as the dataset has it. The shipped PIQA test file cut at its
    exact separators (not by data.parse_instruction): every continuation is " " + that solution, and
    118 of the 1,838 items have a solution that ends in whitespace (item 1442: "can store footballs  ")."""
    prefix = "Please choose the correct solution to the question: "
    answer_format = "\n\nAnswer format: solution1/solution2"
    ending_in_space = 0
    for i, ex in enumerate(data.load_task("piqa", "test")):
        goal, solutions = ex["instruction"].removeprefix(prefix).removesuffix(answer_format).split("\n\nSolution1: ")
        sol1, sol2 = solutions.split("\n\nSolution2: ")
        context = f"Question: {goal}\nAnswer:"
        assert data.cloze_choices("piqa", ex["instruction"]) == [(context, " " + sol1), (context, " " + sol2)], i
        ending_in_space += sol1 != sol1.rstrip() or sol2 != sol2.rstrip()
    assert ending_in_space == 118


def test_cloze_parses_every_real_instruction():
    """Every PIQA instruction the repository ships, and every file in GATERA_DATA_DIR (if set), parses
    into as many choices as its instruction offers labels."""
    present = [(t, s) for t, s, _ in REAL if t != "piqa" and DATA_DIR and (DATA_DIR / data.task_path(t, s)).is_file()]
    files = [("piqa", "train", None), ("piqa", "test", None)] + [(t, s, DATA_DIR) for t, s in present]
    for task, split, where in files:
        for i, ex in enumerate(data.load_task(task, split, where)):
            choices = data.cloze_choices(task, ex["instruction"])
            assert len(choices) == len(data.label_choices(task, ex["instruction"])), (task, split, i)
            assert all(ctx and cont.startswith(" ") for ctx, cont in choices), (task, split, i)


def test_a_malformed_instruction_is_named():
    with pytest.raises(ValueError, match="not a piqa instruction of LLM-Adapters"):
        data.cloze_choices("piqa", "Please choose the correct solution to the question: x\n\nAnswer format: solution1/solution2")
    with pytest.raises(ValueError, match="one blank"):
        data.cloze_choices("winogrande", "Please choose the correct answer to fill in the blank to complete the given "
                                         "sentence: no blank here\n\nOption1: a Option2: b Answer format: option1/option2")


def cloze_items(rows):
    return [(i, {"instruction": r["instruction"], "answer": r["answer"]}) for i, r in enumerate(rows)]


def check_cloze_against_lm_eval(model, tok, name, rtol):
    """Our token split and log-likelihoods against lm-eval's (CLOZE[name]), request by request, and our
    pred / pred_norm against the choices lm-eval's own process_results picked for acc / acc_norm
    (lm_eval_picks; none for acc_norm on WinoGrande, which lm-eval does not define)."""
    rows, reference = CLOZE["templates"], CLOZE[name]
    by_request = {}
    for row in rows:
        for ctx, cont in lm_eval_order(row):
            by_request[ctx, cont] = next(r for r in reference if (r["context"], r["continuation"]) == (ctx, cont))
    for r in reference:
        assert data.encode_pair(tok, r["context"], r["continuation"]) == (r["context_ids"], r["continuation_ids"])
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        predictions = evaluate.score_cloze(model, tok, task, cloze_items(task_rows), 3, "cpu", {"answer": [0.0, 0]})
        for row, p in zip(task_rows, predictions):
            want = [by_request[r]["loglikelihood"] for r in lm_eval_order(row)]
            torch.testing.assert_close(torch.tensor(p["loglikelihoods"]), torch.tensor(want), rtol=rtol, atol=1e-4)
            assert p["lengths"] == [len(cont) - 1 for _, cont in lm_eval_order(row)]
            picks = row["lm_eval_picks"][name]  # indices in lm-eval's order (BoolQ: no, yes)
            ours = {k: 1 - i if row["task"] == "boolq" and i is not None else i for k, i in picks.items()}
            assert p["pred"] == ours["acc"], (task, row["doc"])
            assert ours["acc_norm"] is None or p["pred_norm"] == ours["acc_norm"], (task, row["doc"])


def test_cloze_loglikelihoods_equal_lm_eval_harness_on_a_tiny_model():
    """fixtures/tiny_cloze, a random Llama with the tiny SmolLM-style tokenizer: lm-eval's HFLM on
    transformers (fp32) and our scoring give the same token ids and log-likelihoods (to 1e-5 relative)."""
    check_cloze_against_lm_eval(load_pretrained(FIXTURES / "tiny_cloze").eval(),
                                load_tokenizer(FIXTURES / "tiny_cloze"), "tiny", rtol=1e-5)


@pytest.mark.slow
def test_cloze_loglikelihoods_equal_lm_eval_harness_on_smollm2(smollm2):
    model, _ = smollm2
    check_cloze_against_lm_eval(model, load_tokenizer("smollm2"), "smollm2", rtol=1e-5)


def test_cloze_training_puts_the_loss_on_the_continuation_only():
    tok = load_tokenizer(FIXTURES / "tiny_cloze")
    ctx, cont = data.encode_pair(tok, "Question: How?\nAnswer:", " Slowly and with care.")
    ids, labels = data.encode_cloze(tok, "Question: How?\nAnswer:", " Slowly and with care.")
    assert ids == ctx + cont and labels == [-100] * len(ctx) + cont      # no EOS: a continuation is a fragment
    assert data.encode_cloze(tok, "Question: How?\nAnswer:", " Slowly and with care.", train_on_inputs=True)[1] == ids
    assert data.encode_cloze(tok, "Question: How?\nAnswer:", " Slowly and with care.", cutoff=3) == (ids[:3], [-100] * 3)
    # lm-eval moves the context's trailing whitespace into the continuation
    assert data.encode_pair(tok, "Answer: ", "yes") == data.encode_pair(tok, "Answer:", " yes")


def test_piqa_ships_with_the_repository_and_loads_with_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("GATERA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GATERA_DATA_URL", "http://127.0.0.1:9/nowhere")  # any download would fail
    train_set, test_set = data.load_task("piqa", "train"), data.load_task("piqa", "test")
    assert (len(train_set), len(test_set)) == (16113, 1838) and not (tmp_path / "cache").exists()
    assert (ROOT / "llm_adapters" / "DATA_LICENSE").is_file() and "ODC-By" in (ROOT / "llm_adapters" / "README.md").read_text()


def test_a_damaged_shipped_file_is_refused_and_named(tmp_path, monkeypatch):
    import lzma
    rel = "dataset/piqa/test.json"
    monkeypatch.setattr(data, "SHIPPED", tmp_path)
    (tmp_path / rel).parent.mkdir(parents=True)
    good = (ROOT / "llm_adapters" / f"{rel}.xz").read_bytes()
    (tmp_path / f"{rel}.xz").write_bytes(good[:1000])
    with pytest.raises(ValueError, match=r"test\.json\.xz: not a complete xz file .*git checkout"):
        data.load_task("piqa", "test")
    (tmp_path / f"{rel}.xz").write_bytes(lzma.compress(lzma.decompress(good)[:-2] + b"]\n"))
    with pytest.raises(ValueError, match=rf"test\.json\.xz: git blob .* is not the pinned {rel}.*git checkout"):
        data.load_task("piqa", "test")
