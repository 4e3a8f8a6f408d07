"""
Data for GateRA: the eight commonsense-reasoning tasks of LLM-Adapters (the
benchmark of the DoRA, HiRA and GateRA papers) in two forms: the papers' label format (their
prompts, loss masks and answer extraction) and lm-eval-harness's cloze form (each choice's text
after a short context), with batching for both.

Every data file comes from the LLM-Adapters repository at one pinned commit and is checked
against its git blob sha1 (what `git hash-object FILE` prints) before use, so every run reads
the very same bytes. PIQA ships with this repository (llm_adapters/, xz-compressed), so the
default run needs no network; the other tasks are downloaded once into a cache. Offline:
`load_task(..., data_dir=DIR)` with DIR in the upstream layout, e.g. DIR/dataset/piqa/test.json.
`python data.py [DIR]` fetches (or checks) every file. A --data-dir file that is not the pinned
one is taken as your own data in the same format: a warning, then every example is validated.

Start reading at load_task (fetch, then parse_examples), then the prompts (eval_prompt,
train_prompt) and the cloze pairs (cloze_choices, encode_pair). The tokenizer is tokenizer.py's.
"""
import argparse
import hashlib
import http.client
import json
import lzma
import math
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

import torch

from cli import UserError
from files import atomic_write

# -----------------------------------------------------------------------------
# the tasks and their pinned files

COMMIT = "816657208af4db747803f87ba40a4c71383fed7a"
URL = f"https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/{COMMIT}"  # env GATERA_DATA_URL overrides
SHIPPED = Path(__file__).resolve().parent / "llm_adapters"  # files the repository ships, xz-compressed (PIQA)
ANSWERS = ("answer1", "answer2", "answer3", "answer4", "answer5")  # social_i_qa offers 3, openbookqa 4, ARC 3 to 5
LABELS = {  # task -> the labels its answers use (LLM-Adapters' commonsense_evaluate.py)
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ANSWERS,
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ANSWERS,
    "ARC-Challenge": ANSWERS,
    "openbookqa": ANSWERS,
}
MIXES = ("commonsense_170k", "commonsense_15k")  # training mixes of all eight tasks (train split only)
EVAL_SEED = 1337  # draws --eval-examples' test items, whatever --seed is (train.py's default --seed: the same items)
ALL_LABELS = tuple(dict.fromkeys(label for labels in LABELS.values() for label in labels))
BLOBS = {  # upstream path -> git blob sha1 of the file at COMMIT (what `git hash-object FILE` prints)
    "dataset/boolq/train.json": "87a7beee26b49f81c450641ef2ff84f55611321f",
    "dataset/boolq/test.json": "6d7edb0a8e8a6566b546ccf0d98d24e48db3fdf3",
    "dataset/piqa/train.json": "44326ba946f8bd645bfa7a189e619d29b5bc17e5",
    "dataset/piqa/test.json": "f7a1c260692ef31796d4763cb6334f316a754fed",
    "dataset/social_i_qa/train.json": "bd524129d80efdfabc8476bbedc4f41b400cfda0",
    "dataset/social_i_qa/test.json": "eadf221799ca394367b144c0f86ee0436db409d2",
    "dataset/hellaswag/train.json": "ca68dc85fc2a2f73c9b1b8b0823cc41a8f669718",
    "dataset/hellaswag/test.json": "183c4920415f83ba4b793c4873a33e7e10bd1be5",
    "dataset/winogrande/train.json": "0b56375ac6b4464fa97abfb72812f15c772ba305",
    "dataset/winogrande/test.json": "21257263593dd4d00546e1918c88ca0f357b08ad",
    "dataset/ARC-Easy/train.json": "488a8e5e5bbbd7a630ebbfe07a1fd91b7d9d8c9b",
    "dataset/ARC-Easy/test.json": "6c0d30aaedaeca148df6bcd7aaacf7c31e6ad70f",
    "dataset/ARC-Challenge/train.json": "d7e080b04bff9fd16dd85455fb04481807a088d8",
    "dataset/ARC-Challenge/test.json": "9540685439144200b5a7e48dab9ca4655be2af09",
    "dataset/openbookqa/train.json": "75bcd5eb9f5e77a3796c05e6bb38f169d19563fc",
    "dataset/openbookqa/test.json": "a6e69676104bcb77237388c3b5a3f0dcbb81d1e2",
    "ft-training_set/commonsense_170k.json": "529e426b33d4cdb1d0c4a275a1a7245ad081fd91",
    "ft-training_set/commonsense_15k.json": "3716afef6d384c475dba13f88a5a96c8032dafe2",
}


def task_path(task, split):
    """The upstream path of a task's split, e.g. dataset/piqa/test.json."""
    if task in MIXES:
        if split != "train":
            raise UserError(f"{task} is a training mix and has no {split!r} split: use split='train'")
        return f"ft-training_set/{task}.json"
    if task not in LABELS:
        raise UserError(f"unknown task {task!r}: choose one of {', '.join([*LABELS, *MIXES])}")
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r} for {task}: use 'train' or 'test'")
    return f"dataset/{task}/{split}.json"


def task_labels(task):
    """The labels a task's answers use; a mix uses the union of all eight tasks' labels."""
    task_path(task, "train")  # raises on an unknown task
    return ALL_LABELS if task in MIXES else LABELS[task]


def task_list(text):
    """--task: one task, a comma-separated list of them, or a mix; returned as given (no spaces), once
    every name is known, none comes twice and a mix stands alone. Raises argparse.ArgumentTypeError."""
    names = [t.strip() for t in text.split(",")]
    unknown = [t for t in names if t not in LABELS and t not in MIXES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task {unknown[0]!r}: give one or more of {', '.join(LABELS)} "
                                         f"(comma-separated), or one of {' / '.join(MIXES)}")
    if len(set(names)) < len(names) or (len(names) > 1 and set(names) & set(MIXES)):
        raise argparse.ArgumentTypeError(f"{text!r}: each task once, and a mix ({' / '.join(MIXES)}) alone: it "
                                         "already holds all eight tasks")
    return ",".join(names)


def train_and_test_tasks(task):
    """(the tasks whose train files --task trains on, the tasks it is evaluated on): a task, itself
    twice; a list, its tasks twice (trained on their union); a mix, itself and the eight tasks."""
    names = task.split(",")
    return names, list(LABELS) if task in MIXES else names


# -----------------------------------------------------------------------------
# fetching and verifying files

def git_blob(data):
    """The hash `git hash-object` prints: sha1(b"blob <size>\\0" + content)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_blob(data, name, rel, then=""):
    if (got := git_blob(data)) != BLOBS[rel]:
        raise UserError(f"{name}: git blob {got} ({len(data)} bytes) is not the pinned {rel} of LLM-Adapters "
                        f"{COMMIT[:12]} (git blob {BLOBS[rel]}): the file is truncated, corrupt or another "
                        f"version; the pinned file is {URL}/{rel}{then}")


def cache_dir():
    return Path(os.environ.get("GATERA_CACHE", "~/.cache/gatera")).expanduser() / "llm_adapters" / COMMIT


def stream(url, path):
    """Copy url's bytes into path, with progress on stderr; returns the size the server announced (0: none)."""
    with urllib.request.urlopen(url, timeout=30) as r, open(path, "wb") as f:
        size, got, t0, shown = int(r.headers.get("Content-Length") or 0), 0, time.time(), 0.0
        while chunk := r.read(1 << 16):
            f.write(chunk)
            got += len(chunk)
            if (now := time.time()) - shown > 0.5 or got == size:
                shown, total = now, f" of {size / 1e6:.1f}" if size else ""
                print(f"\rdownloading {url}: {got / 1e6:.1f}{total} MB, "
                      f"{got / 1e6 / max(now - t0, 1e-6):.1f} MB/s, {now - t0:.1f} s", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return size


def download(rel, file):
    """Download upstream file `rel` into `file` through files.atomic_write, verified before the rename:
    `file` only ever holds a complete, verified copy. Returns its bytes."""
    url = f"{os.environ.get('GATERA_DATA_URL', URL).rstrip('/')}/{rel}"
    file.parent.mkdir(parents=True, exist_ok=True)
    verified = []

    def write(tmp):
        try:
            size = stream(url, tmp)
        except (OSError, http.client.HTTPException) as e:  # no network, refused, timeout, HTTP 404 ...
            raise UserError(
                f"could not download {url} ({e}). Without network, put that file at {file}, or pass "
                f"--data-dir DIR with it at DIR/{rel} (a checkout of github.com/AGI-Edgerunners/LLM-Adapters at "
                f"commit {COMMIT[:12]} has that layout)") from None
        data = Path(tmp).read_bytes()
        if size and len(data) != size:
            raise UserError(f"{url}: download truncated, {len(data)} of {size} bytes; nothing was cached, try again")
        check_blob(data, url, rel, then="; nothing was cached")
        verified.append(data)
    atomic_write(file, write)
    return verified[0]


WARNED = set()  # --data-dir files already reported as not the pinned ones


def fetch(rel, data_dir=None):
    """The bytes of upstream file `rel` and the name of where they came from: from data_dir if
    given (never downloads; a file that is not the pinned one is your own data: a warning, then
    parse_examples checks every example); else from the xz copy this repository ships (PIQA, see
    llm_adapters/README.md) or the cache, downloading when absent or corrupt: verified, always."""
    if data_dir is not None:
        file = Path(data_dir) / rel
        if not file.is_file():
            raise UserError(f"{file} not found: --data-dir must hold the LLM-Adapters layout, "
                            f"put {URL}/{rel} there")
        data = file.read_bytes()
        blob = git_blob(data)
        if blob != BLOBS[rel] and str(file) not in WARNED:  # your own data: validated, not refused
            WARNED.add(str(file))
            print(f"warning: {file} is not the pinned {rel} of LLM-Adapters {COMMIT[:12]} (git blob "
                  f"{blob}, pinned {BLOBS[rel]}): using it as your own data, checked example by "
                  f"example; results on it are not comparable with the papers'", file=sys.stderr)
        return data, str(file)
    shipped = SHIPPED / f"{rel}.xz"
    if shipped.is_file():
        restore = f"; restore it with `git checkout -- {shipped.relative_to(SHIPPED.parent)}`"
        try:
            data = lzma.decompress(shipped.read_bytes())
        except lzma.LZMAError as e:
            raise UserError(f"{shipped}: not a complete xz file ({e}){restore}") from None
        check_blob(data, shipped, rel, then=restore)
        return data, str(shipped)
    file = cache_dir() / rel
    if file.is_file():
        data = file.read_bytes()
        if git_blob(data) == BLOBS[rel]:  # re-verified on every load
            return data, str(file)
        print(f"{file} fails its hash check: deleting it and downloading it again", file=sys.stderr)
        file.unlink()
    return download(rel, file), str(file)


# -----------------------------------------------------------------------------
# examples

def parse_examples(data, name, task):
    """Validate the bytes of a JSON list of {"instruction", "input", "output", "answer"} examples.
    Every problem is an error naming the file (and the example index); nothing is skipped."""
    labels = task_labels(task)
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    except json.JSONDecodeError as e:
        what = "file is empty" if not data.strip() else f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        raise UserError(f"{name}: {what}; expected a JSON list of examples") from None
    if not isinstance(rows, list):
        raise UserError(f"{name}: expected a JSON list of examples, got a JSON {type(rows).__name__}")
    if not rows:
        raise UserError(f"{name}: the list holds no examples")
    examples = []
    for i, row in enumerate(rows):
        where = f"{name}: example {i}"
        if not isinstance(row, dict):
            raise UserError(f"{where} is a JSON {type(row).__name__}, expected an object")
        if missing := [k for k in ("instruction", "output", "answer") if not isinstance(row.get(k), str)]:
            raise UserError(f"{where} lacks the string field(s) {missing} (it has {sorted(row)})")
        if row.get("input"):
            raise UserError(f"{where} has a non-empty 'input': the commonsense prompt has no input section")
        if row["answer"] not in labels:
            raise UserError(f"{where}: answer {row['answer']!r} is not one of {task}'s labels {'|'.join(labels)}")
        examples.append({"instruction": row["instruction"], "input": "", "output": row["output"],
                         "answer": row["answer"]})
    return examples


def load_task(task, split, data_dir=None):
    """The verified examples of a task's split ("train" or "test"; mixes only "train"), each a dict
    with instruction, input (always ""), output ("the correct answer is X") and answer (X)."""
    data, name = fetch(task_path(task, split), data_dir)
    return parse_examples(data, name, task)


# -----------------------------------------------------------------------------
# prompts and answers

def _prompt(instruction, after_request, blank_line):
    i = " " * 16  # the reference's f-string sits indented in a function body: the indent is in the bytes
    return ("Below is an instruction that describes a task. Write a response that appropriately completes "
            f"the request.{after_request}\n\n{i}### Instruction:\n{i}{instruction}\n{blank_line}\n"
            f"{i}### Response:\n{i}")


def eval_prompt(instruction):
    """The exact evaluation prompt of LLM-Adapters (one space after "request.", empty blank line)."""
    return _prompt(instruction, " ", "")


def train_prompt(instruction, output, variant="eval"):
    """The training text: prompt + output.

    variant "eval" (default): the evaluation prompt + output, so the model is trained on the very
    prompt it is evaluated on. variant "reference": the bytes of LLM-Adapters' finetune.py, which
    differ from its evaluation prompt by TWO spaces after "request." and 16 spaces on the blank
    line after the instruction (what the papers trained on).
    """
    if variant == "eval":
        return eval_prompt(instruction) + output
    if variant == "reference":
        return _prompt(instruction, "  ", " " * 16) + output
    raise UserError(f"unknown training prompt variant {variant!r}: use 'eval' or 'reference'")


def extract_answer(task, text):
    """The label a model's answer names, or "" (counted wrong), as the reference evaluation does:
    the text after "### Response:" (up to a second one, as its split(...)[1]), stripped, and the
    FIRST match of the task's labels, case-sensitive. Pass the decoded prompt + generation as the
    reference does; a bare generation works too when it has no "### Response:" of its own."""
    if "### Response:" in text:
        text = text.split("### Response:")[1]
    m = re.search("|".join(map(re.escape, task_labels(task))), text.strip())
    return m.group(0) if m else ""


def label_choices(task, instruction):
    """{label: continuation} for log-likelihood scoring: the labels the instruction's closing
    "Answer format: a/b/c" line offers (all the task's labels if it has none), each with the
    response text the training data uses, "the correct answer is <label>"."""
    labels = task_labels(task)
    m = re.search(r"Answer format: (\S+)\s*$", instruction)
    offered = [label for label in m.group(1).split("/") if label in labels] if m else []
    return {label: f"the correct answer is {label}" for label in offered or labels}


# -----------------------------------------------------------------------------
# cloze: how small models are scored (lm-eval-harness's multiple-choice templates)
#
# A small model cannot map a question to a symbol ("the correct answer is solution2"), but it can
# tell which of two texts is more likely. lm-eval-harness scores a multiple-choice question as a
# cloze: each choice's text, after a short context, gets the log-likelihood of its tokens. The
# LLM-Adapters instructions hold every field those templates need, so we parse them back out.

PREFIXES = {  # the fixed start of each task's LLM-Adapters instruction
    "boolq": "Please answer the following question with true or false, question: ",
    "piqa": "Please choose the correct solution to the question: ",
    "hellaswag": "Please choose the correct ending to complete the given sentence: ",
    "winogrande": "Please choose the correct answer to fill in the blank to complete the given sentence: ",
    "ARC-Easy": "Please choose the correct answer to the question: ",  # also ARC-Challenge, OBQA, Social IQa
}
MARKERS = {"piqa": "Solution", "hellaswag": "Ending", "winogrande": "Option"}  # before each choice; else "Answer"
SEPARATOR = r"(?:\n\n| )"  # between two fields: a blank line (PIQA; before Answer1) or one space (ARC's answers)
# lm-eval-harness's doc_to_text for each task (lm_eval/tasks/<task>/*.yaml); the continuation is " " + choice
CONTEXTS = {"piqa": "Question: {}\nAnswer:", "ARC-Easy": "Question: {}\nAnswer:", "ARC-Challenge": "Question: {}\nAnswer:",
            "openbookqa": "{}", "social_i_qa": "Q: {}\nA:", "hellaswag": "{}", "boolq": "Question: {}\nAnswer:"}


def template_task(task, instruction):
    """The task whose template an instruction follows: the task itself, or, in a training mix, the
    task whose prefix the instruction starts with (Social IQa and OpenBookQA share ARC's)."""
    if task not in MIXES:
        return task
    return next((t for t, p in PREFIXES.items() if instruction.startswith(p)), task)


def parse_instruction(task, instruction):
    """(question, [choice text per offered label]) of an LLM-Adapters instruction, e.g. for PIQA
    "Please choose the correct solution to the question: {goal}\n\nSolution1: {sol1}\n\nSolution2:
    {sol2}\n\nAnswer format: solution1/solution2" -> (goal, [sol1, sol2]). BoolQ has no choices.
    Each field is returned as the dataset has it, with its own leading and trailing whitespace
    (PIQA's "can store footballs  "), because lm-eval scores " " + the field as it is: the field is
    the shortest text followed by exactly one SEPARATOR and the next marker (a pattern of any run of
    whitespace would take the field's own trailing spaces for part of the separator).
    Raises UserError when the instruction does not have its task's shape."""
    task = template_task(task, instruction)
    prefix, marker = PREFIXES.get(task, PREFIXES["ARC-Easy"]), MARKERS.get(task, "Answer")
    m = re.search(r"Answer format: (\S+)$", instruction)
    n = 0 if task == "boolq" or m is None else len(m.group(1).split("/"))
    pattern = re.escape(prefix) + "(.*?)" + "".join(rf"{SEPARATOR}{marker}{k}: (.*?)" for k in range(1, n + 1))
    match = re.fullmatch(pattern + SEPARATOR + r"Answer format: \S+", instruction, re.S) if m else None
    if match is None or not all(field.strip() for field in match.groups()):
        raise UserError(f"not a {task} instruction of LLM-Adapters (expected {prefix!r}, then the question, "
                        f"{marker}1: ... and 'Answer format: ...'): {instruction[:200]!r}")
    question, *choices = match.groups()
    return question, choices


def hellaswag_clean(text):
    """lm-eval-harness's HellaSwag preprocess: the WikiHow part's [title]/[step] tags removed."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def cloze_choices(task, instruction):
    """[(context, continuation)] for each offered choice, in label order: lm-eval-harness's zero-shot
    cloze form (the log-likelihood of the continuation given the context is the choice's score).
      PIQA, ARC       "Question: {question}\nAnswer:"   + " {choice}"
      OpenBookQA      "{question_stem}"                 + " {choice}"
      Social IQa      "Q: {context} {question}\nA:"     + " {answer}"
      HellaSwag       "{activity}: {ctx}"               + " {ending}"     (both cleaned as lm-eval does)
      BoolQ           "Question: {question}\nAnswer:"   + " yes" / " no"  (labels true / false)
      WinoGrande      the sentence up to the blank with each option, + " {the rest of the sentence}"
    lm-eval's BoolQ context starts with the passage, which the LLM-Adapters file does not have; its
    questions already end in "?", which lm-eval's template adds. A mix uses each example's task's
    template (see template_task)."""
    question, choices = parse_instruction(task, instruction)
    task = template_task(task, instruction)
    if task == "boolq":
        return [(CONTEXTS["boolq"].format(question), " yes"), (CONTEXTS["boolq"].format(question), " no")]
    if task == "winogrande":
        if question.count("_") != 1:
            raise UserError(f"a winogrande sentence has one blank '_', this has {question.count('_')}: {question!r}")
        blank = question.index("_")
        return [(question[:blank] + option, " " + question[blank + 1:].strip()) for option in choices]
    if task == "hellaswag":
        question, choices = hellaswag_clean(question), [hellaswag_clean(c) for c in choices]
    return [(CONTEXTS[task].format(question), " " + choice) for choice in choices]


# -----------------------------------------------------------------------------
# tokenized examples and batches

def encode_example(tok, ex, cutoff=256, train_on_inputs=False, variant="eval", bos=None):
    """(ids, labels) of one example, built as LLM-Adapters' finetune.py does.

    ids = encode(prompt + output)[:cutoff], then EOS only if that is shorter than cutoff (as the
    reference: an example that reaches the cutoff has no EOS). labels = ids, except -100 (no loss)
    on the first len(encode(prompt)) tokens unless train_on_inputs. Like the reference we tokenize
    the whole text and only count the prompt's tokens, although BPE merges across the boundary:
    the prompt ends in 16 spaces, which GPT-2 encodes as 16 " " alone but as 15 " " + " the" in
    front of the output, so " the" falls under the mask. bos: prepend BOS (default: as the
    checkpoint's tokenizer does, tok.add_bos: Llama 3 yes, GPT-2 and SmolLM2 no). Scoring uses the same with ex["output"] = a label_choices continuation.
    """
    prompt = train_prompt(ex["instruction"], "", variant)
    bos = tok.add_bos if bos is None else bos
    ids = tok.encode(prompt + ex["output"], bos=bos)[:cutoff]
    if len(ids) < cutoff:
        ids.append(tok.eos_id)
    labels = list(ids)
    if not train_on_inputs:
        n = min(len(tok.encode(prompt, bos=bos)), cutoff)
        labels[:n] = [-100] * n
    return ids, labels


def encode_pair(tok, context, continuation, bos=None):
    """(context ids, continuation ids) of a cloze request, split as lm-eval-harness does: whitespace
    at the end of the context moves to the start of the continuation, context + continuation is
    encoded as one text, and the continuation's ids are those after as many ids as the context
    alone encodes to (BPE may merge across the boundary; the split follows the whole text).
    bos: prepend BOS to the context (default: as the checkpoint's tokenizer does, tok.add_bos)."""
    bos = tok.add_bos if bos is None else bos
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation, bos=bos), tok.encode(context, bos=bos)
    return ctx, whole[len(ctx):]


def gold_index(task, ex):
    """Position of the example's answer among the labels its instruction offers."""
    return list(label_choices(task, ex["instruction"])).index(ex["answer"])


def encode_cloze(tok, context, continuation, cutoff=256, train_on_inputs=False):
    """(ids, labels) of a cloze training example, the correct choice after its context: the loss is
    on the continuation's tokens (all tokens with train_on_inputs), split as encode_pair does. No
    EOS: a continuation is a piece of a sentence, and scoring never asks for one. At most cutoff ids."""
    ctx, cont = encode_pair(tok, context, continuation)
    ids = (ctx + cont)[:cutoff]
    labels = list(ids) if train_on_inputs else ([-100] * len(ctx) + cont)[:cutoff]
    return ids, labels


def encode_examples(tok, task, examples, fmt="label", name="", cutoff=256, train_on_inputs=False, variant="eval"):
    """Training (ids, labels) of every example: fmt "label" is encode_example (the LLM-Adapters
    prompt and "the correct answer is X"), "cloze" encode_cloze of the correct choice. Says on
    stderr how many examples the cutoff cut short."""
    if fmt == "cloze":
        out = [encode_cloze(tok, *cloze_choices(task, ex["instruction"])[gold_index(task, ex)], cutoff=cutoff,
                            train_on_inputs=train_on_inputs) for ex in examples]
        cut = sum(len(ids) == cutoff for ids, _ in out)
    else:
        out = [encode_example(tok, ex, cutoff=cutoff, train_on_inputs=train_on_inputs, variant=variant) for ex in examples]
        cut = sum(ids[-1] != tok.eos_id for ids, _ in out)  # only a cut example lacks the EOS
    empty = sum(all(y == -100 for y in labels) for _, labels in out)
    if cut:
        print(f"{name}: {cut} of {len(out)} examples reach the cutoff of {cutoff} tokens, "
              f"{empty} of them with no target token left (they add no loss)", file=sys.stderr)
    return out


def pad(seqs, value, left=False):
    """Lists of ints -> one (B, T) tensor, padded with value to the longest, on the right or left."""
    T = max(map(len, seqs))
    rows = [[value] * (T - len(s)) + list(s) if left else list(s) + [value] * (T - len(s)) for s in seqs]
    return torch.tensor(rows)


def collate(batch, pad_id):
    """Training or scoring batch from (ids, labels) pairs -> ids, labels, mask, each (B, T).
    Right padding: real tokens keep positions 0.. and the causal model never sees the padding.
    labels[b, t] is the target at position t (the loss shifts: logits[:, :-1] vs labels[:, 1:]),
    -100 on padding; mask is 1 on real tokens, 0 on padding."""
    ids, labels = zip(*batch)
    return pad(ids, pad_id), pad(labels, -100), pad([[1] * len(s) for s in ids], 0)


def subset(n_items, n, seed):
    """Indices of a random subset of n of n_items (all if n is 0), the same for every run with this seed."""
    if not n or n >= n_items:
        return list(range(n_items))
    return sorted(torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def length_grouped_batches(lengths, batch_size, seed):
    """One epoch's batches (lists of example indices), grouped by length as Hugging Face's
    group_by_length: a random permutation is cut into groups of 64 batches, each group is sorted by
    length and cut into batches, and the batches are shuffled. Examples of about one length share a
    batch, so padding wastes little (PIQA's cloze examples: 36 tokens on average, 100 for the
    longest of 16 random ones). A function of the seed alone."""
    g = torch.Generator().manual_seed(seed)
    perm, batches = torch.randperm(len(lengths), generator=g).tolist(), []
    for i in range(0, len(perm), 64 * batch_size):
        group = sorted(perm[i:i + 64 * batch_size], key=lambda j: lengths[j])
        batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]


def micro_batches(idx, encoded, grad_accum, max_tokens, rank, world):
    """This rank's micro-batches of batch idx, the whole batch's numbers of target tokens and of real
    tokens, and its first example. The batch is cut into parts of equal size: at least grad_accum of
    them, and smaller ones where a part would hold more than max_tokens padded tokens (examples x the
    longest), so that the few long batches bound the activations' memory while the short ones keep their
    speed; rank r takes parts r, r + world, ... With DDP every rank must join every all-reduce, so where
    a rank's part is empty it runs the first example as a stand-in with weight 0 (its gradient adds
    zeros). The loss is normalised by the whole batch's counts, so any cut gives the same gradient."""
    size = part_size(len(idx), max(len(encoded[i][0]) for i in idx), grad_accum, max_tokens)
    parts = [idx[i:i + size] for i in range(0, len(idx), size)]
    parts += [[]] * (-len(parts) % world)  # as many parts for every rank
    return parts[rank::world], *token_counts(idx, encoded), idx[:1]


def part_size(n, longest, grad_accum, max_tokens):
    """Examples per micro-batch of a batch of n examples whose longest has `longest` tokens."""
    return min(math.ceil(n / grad_accum), max(1, max_tokens // longest))


def token_counts(idx, encoded):
    """(target tokens, real tokens) of examples idx: what the loss terms are normalised by."""
    n_targets = sum(y != -100 for i in idx for y in encoded[i][1][1:])  # the first token is never a target
    return max(n_targets, 1), sum(len(encoded[i][0]) for i in idx)


def load_tests(args):
    """{task: [(index in the task's test file, example)]} of every task train.py evaluates (args: its
    flags; each task of --task, or all eight after a mix): --eval-examples of each, or all. The subset
    is drawn with EVAL_SEED, not --seed: runs of any seed are scored on the same items, item by item."""
    tests = {}
    for t in train_and_test_tasks(args.task)[1]:
        examples = load_task(t, "test", args.data_dir)
        tests[t] = [(i, examples[i]) for i in subset(len(examples), args.eval_examples, EVAL_SEED)]
    return tests


def load_training(args, tok):
    """({task: the size of its train file}, the seeded --train-examples subset of their union, encoded:
    [(ids, labels)]); args: train.py's flags. The union is the train files one after another, so a
    subset draws from each task in proportion to its size, as the papers' commonsense_170k mix does."""
    sizes, union = {}, []
    for t in train_and_test_tasks(args.task)[0]:
        examples = load_task(t, "train", args.data_dir)
        sizes[t], union = len(examples), union + [(t, ex) for ex in examples]
    chosen = [union[i] for i in subset(len(union), args.train_examples, args.seed)]
    return sizes, [pair for t in sizes for pair in encode_examples(
        tok, t, [ex for task, ex in chosen if task == t], fmt=args.format, name=f"{t} train", cutoff=args.cutoff,
        train_on_inputs=args.train_on_inputs, variant=args.train_prompt)]


def union_note(sizes):
    """What the budget line says of a union of train files (sizes: {task: examples}): how it is drawn from."""
    if len(sizes) == 1:
        return ""
    return f" (the union of {', '.join(f'{t} {n}' for t, n in sizes.items())}: each task in proportion to its size)"


def collate_prompts(tok, instructions, bos=None):
    """Generation batch of evaluation prompts -> ids, mask, each (B, T). Left padding: every prompt
    ends in the last column, so the tokens generated for the batch line up; the model needs the
    mask (1 real, 0 padding) to skip the padding and to place positions."""
    bos = tok.add_bos if bos is None else bos
    seqs = [tok.encode(eval_prompt(s), bos=bos) for s in instructions]
    return pad(seqs, tok.pad_id, left=True), pad([[1] * len(s) for s in seqs], 0, left=True)


if __name__ == "__main__":
    data_dir = sys.argv[1] if len(sys.argv) > 1 else None  # python data.py [DIR]: fetch or check every file
    for task in [*LABELS, *MIXES]:
        for split in ("train",) if task in MIXES else ("train", "test"):
            try:
                print(f"{task_path(task, split):40s} {len(load_task(task, split, data_dir)):7d} examples")
            except (FileNotFoundError, ValueError) as e:
                print(f"{task_path(task, split):40s} {e}")
