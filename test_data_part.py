"""Tests of data.py's task/data part (the lead merges them into test_gatera.py). Offline, fast."""
import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

import data

HERE = Path(__file__).parent
SHARED = HERE.parent / "shared" / "data" / "llm_adapters"
FIXTURE = HERE / "fixtures" / "data" / "dataset" / "boolq" / "test.json"  # 3 hand-written boolq examples
FIXTURE_BLOB = "489ebe938ec595c94c68a727d6ea745eb7326515"  # `git hash-object fixtures/data/dataset/boolq/test.json`
BOOLQ_TEST = "dataset/boolq/test.json"

# REFERENCE §6, copied character for character (16 spaces; one trailing space after "request.")
EVAL_TEMPLATE = "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n                ### Instruction:\n                {instruction}\n\n                ### Response:\n                "
# LLM-Adapters finetune.py: TWO spaces after "request.", 16 spaces on the blank line after the instruction
TRAIN_REFERENCE_TEMPLATE = "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n                ### Instruction:\n                {instruction}\n                \n                ### Response:\n                {output}"

INSTRUCTION = "Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false"
OUTPUT = "the correct answer is true"


def blob(b):  # git's object hash, written out here independently of data.git_blob
    return hashlib.sha1(b"blob " + str(len(b)).encode() + b"\x00" + b).hexdigest()


def example(answer="true", **kw):
    return {"instruction": INSTRUCTION, "input": "", "output": f"the correct answer is {answer}", "answer": answer, **kw}


class ByteTok:
    """One token per UTF-8 byte, so every position below can be counted by hand."""
    bos_id, eos_id, pad_id = 256, 257, 258
    add_bos = True  # like the Llama tokenizers of the papers

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos


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
    out = data.encode_examples(tok, [ex, ex, example("false")], name="boolq", cutoff=n_prompt - 3)
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


def test_data_dir(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / BOOLQ_TEST)):
        data.load_task("boolq", "test", data_dir=tmp_path)
    (tmp_path / BOOLQ_TEST).parent.mkdir(parents=True)
    (tmp_path / BOOLQ_TEST).write_bytes(FIXTURE.read_bytes())
    with pytest.raises(ValueError, match=f"{tmp_path / BOOLQ_TEST}: git blob {FIXTURE_BLOB} .* {data.BLOBS[BOOLQ_TEST]}"):
        data.load_task("boolq", "test", data_dir=tmp_path)  # not the pinned file
    monkeypatch.setitem(data.BLOBS, BOOLQ_TEST, FIXTURE_BLOB)
    assert data.load_task("boolq", "test", data_dir=tmp_path) == json.loads(FIXTURE.read_text())


GOOD = json.dumps(example())
BAD_FILES = [
    (b"", "file is empty"),
    (b"  \n", "file is empty"),
    (b'[{"instruction": "x",\n "answer": }]', "invalid JSON at line 2, column 12"),
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
    monkeypatch.setitem(data.BLOBS, BOOLQ_TEST, blob(content))  # past the hash check, to the validation
    with pytest.raises(ValueError, match=f"^{file}: .*{error}"):
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


# the real files in ../shared/data/llm_adapters, counts from its README
REAL = [("boolq", "train", 9427), ("boolq", "test", 3270), ("piqa", "train", 16113), ("piqa", "test", 1838),
        ("social_i_qa", "train", 33410), ("social_i_qa", "test", 1954), ("winogrande", "test", 1267),
        ("ARC-Easy", "train", 2251), ("openbookqa", "train", 4957)]


@pytest.mark.parametrize("task, split, count", REAL)
def test_real_files(task, split, count):
    if not (SHARED / data.task_path(task, split)).is_file():
        pytest.skip(f"needs {SHARED / data.task_path(task, split)}, the shared copy of the LLM-Adapters data")
    examples = data.load_task(task, split, data_dir=SHARED)  # passes the pinned git blob check
    assert len(examples) == count
    for ex in examples:  # the reference's own outputs extract to the answer, and the instruction offers it
        assert data.extract_answer(task, data.eval_prompt(ex["instruction"]) + ex["output"]) == ex["answer"]
        assert data.label_choices(task, ex["instruction"])[ex["answer"]] == ex["output"]


# -----------------------------------------------------------------------------
# downloading, against a local HTTP server

@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server on 127.0.0.1 for GATERA_DATA_URL; routes maps a URL path to (body, Content-Length)."""
    routes, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path not in routes:
                return self.send_error(404)
            body, length = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("GATERA_CACHE", str(tmp_path))
    monkeypatch.setenv("GATERA_DATA_URL", f"http://127.0.0.1:{srv.server_address[1]}/repo")
    yield routes, hits
    srv.shutdown()
    srv.server_close()


def cached(tmp_path):
    return tmp_path / "llm_adapters" / data.COMMIT / BOOLQ_TEST


def files(tmp_path):
    return sorted(p.name for p in tmp_path.rglob("*") if p.is_file())


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


def test_download_wrong_hash_not_cached(server, tmp_path):
    routes, _ = server
    routes["/repo/" + BOOLQ_TEST] = (FIXTURE.read_bytes(), len(FIXTURE.read_bytes()))  # not the pinned boolq test
    with pytest.raises(ValueError, match=f"git blob {FIXTURE_BLOB} .*{data.BLOBS[BOOLQ_TEST]}.*nothing was cached"):
        data.load_task("boolq", "test")
    assert files(tmp_path) == []


def test_download_truncated_not_cached(server, tmp_path, monkeypatch):
    routes, _ = server
    good = FIXTURE.read_bytes()
    routes["/repo/" + BOOLQ_TEST] = (good[:200], len(good))  # the connection closes early
    monkeypatch.setitem(data.BLOBS, BOOLQ_TEST, FIXTURE_BLOB)
    with pytest.raises(ValueError, match=f"download truncated, 200 of {len(good)} bytes; nothing was cached"):
        data.load_task("boolq", "test")
    assert files(tmp_path) == []


def test_download_unavailable_says_where_to_put_the_file(server, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="HTTP Error 404") as e:  # the server lacks the file
        data.load_task("boolq", "test")
    with socket.socket() as s:  # a port nobody listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GATERA_DATA_URL", f"http://127.0.0.1:{port}/repo")
    with pytest.raises(FileNotFoundError) as e:
        data.load_task("boolq", "test")
    msg = str(e.value)
    assert f"could not download http://127.0.0.1:{port}/repo/{BOOLQ_TEST}" in msg
    assert f"put that file at {cached(tmp_path)}" in msg and f"at DIR/{BOOLQ_TEST}" in msg and "--data-dir" in msg
    assert files(tmp_path) == []
