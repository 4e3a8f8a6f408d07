"""
Generate text from a prompt with a pretrained model, with or without a trained adapter, and show its gates.

    python sample.py --prompt "How do you keep bread fresh?"                          # SmolLM2-135M alone
    python sample.py --prompt "How do you keep bread fresh?" --adapter out/adapter    # after train.py
    python sample.py --prompt "..." --adapter out/adapter --visualize 1 --out out     # and out/gates-1.html
    python sample.py --prompt "..." --temperature 0.8 --top-k 50 --seed 1             # sampled, not greedy

Prints the continuation as it comes (greedy at --temperature 0, else sampled and seeded by --seed),
then the gates of the prompt's tokens (prefill) and of each generated token (decode): with GateRA the
paper expects them low on the prompt and open on the answer.
"""

import argparse
import os

import torch

from checkpoints import check_adapter, load_adapter, load_pretrained, pick_dtype
from cli import (COUNT, NONNEGATIVE, POSITIVE_INT, SEED, Parser, UserError, first_free, pick_device, run, text,
                 writable_folder)
from gates import GateRecorder, gate_page, gate_report, write_page
from tokenizer import load_tokenizer

parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prompt", type=text, required=True, help="the text to continue")
parser.add_argument("--adapter", type=text, default=None,
                    help="adapter folder (train.py's <out>/adapter); none: the bare model")
parser.add_argument("--model", type=text, default="smollm2",
                    help="smollm2, a Hub id, a local Hugging Face folder or a .gguf file")
parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
parser.add_argument("--temperature", type=NONNEGATIVE, default=0.0, help="0: greedy; else sampling, seeded by --seed")
parser.add_argument("--top-k", type=POSITIVE_INT, default=None,
                    help="sample among the k most likely tokens (with --temperature > 0)")
parser.add_argument("--seed", type=SEED, default=1337)
parser.add_argument("--visualize", type=COUNT, default=0, metavar="N", help="N > 0: write the gates as <out>/gates-<n>.html")
parser.add_argument("--out", type=text, default="out", help="folder of the gate pages")
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="dtype of the frozen base weights; auto: bfloat16 where the CPU or GPU has bf16 matrix units")


@torch.no_grad()
def generate_text(model, tok, prompt, max_new_tokens, temperature, top_k, device, recorder=None):
    """Continues prompt, printing the text as it comes (greedy at temperature 0); returns the new ids.
    A GateRecorder gets the gates of every step: the prompt's (prefill), then each new token's (decode)."""
    ids = torch.tensor([tok.encode(prompt, bos=tok.add_bos)], device=device)       # (1, T)
    record = recorder.new_generation({0: 0}) if recorder else None  # its on_step, keeping row 0 in full
    new, shown = [], ""
    print(prompt, end="", flush=True)

    def step(fed, real, nxt, gates):  # after each step of generate; gates: the dict its forward filled
        nonlocal shown
        if record:
            record(fed, real, nxt, gates)
        if nxt.item() != tok.eos_id:  # once EOS comes, generate stops (a batch of one)
            new.append(nxt.item())
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a character split over tokens
            print(text[len(shown):], end="", flush=True)
            shown = text
    was_training = model.training
    model.eval()
    model.generate(ids, max_new_tokens, temperature, top_k, eos_id=tok.eos_id, on_step=step)
    model.train(was_training)
    print(flush=True)
    return new


def check(args):
    """Every check before the model loads: the device, the flags together, the adapter's files, the
    folder of the page. Returns (device, the adapter's config or None)."""
    device = pick_device(args.device)
    if args.top_k is not None and args.temperature == 0:
        raise UserError(f"--top-k {args.top_k} picks among the likeliest tokens when sampling, and --temperature 0 "
                        "is greedy: give --temperature > 0 (e.g. 0.8), or leave --top-k out")
    cfg = check_adapter(args.adapter) if args.adapter else None  # None: the pretrained model alone
    if args.visualize and (cfg is None or cfg.gate == "none"):
        what = "the bare model" if cfg is None else f"{args.adapter} (gate none)"
        raise UserError(f"--visualize shows the gates, but {what} has none: leave --visualize out, or give a gated "
                        "--adapter")
    if args.visualize:
        writable_folder(args.out, "--out")
    return device, cfg


def main(argv=None):
    args = parser.parse_args(argv)
    device, cfg = check(args)
    dtype, why = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    print(f"{device}: frozen base in {str(dtype).removeprefix('torch.')} ({why})", flush=True)
    model = load_pretrained(args.model, dtype=dtype).to(device).requires_grad_(False)
    tok = load_tokenizer(args.model)
    cfg = load_adapter(model, args.adapter) if cfg else None
    what = "no adapter" if cfg is None else f"{cfg.method} r={cfg.rank} gate={cfg.gate}"
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters | {what}", flush=True)
    n_prompt = len(tok.encode(args.prompt, bos=tok.add_bos))
    if model.config.arch == "gpt2" and n_prompt + args.max_new_tokens > model.config.block_size:  # learned positions
        raise UserError(f"the prompt's {n_prompt} tokens + --max-new-tokens {args.max_new_tokens} exceed this GPT-2's "
                        f"{model.config.block_size} positions: lower --max-new-tokens or shorten --prompt")

    recorder = GateRecorder(keep=1)
    ids = generate_text(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, device, recorder)
    for line in gate_report(recorder.summary(), "while generating"):
        print(line)
    if args.visualize and recorder.kept:
        path = first_free(os.path.join(args.out, "gates-{}.html"))  # beside earlier pages, never over them
        write_page(path, gate_page(f"{args.model}, {what}: generation", recorder, tok))
        print(f"wrote {path}")
    return {"generated": tok.decode(ids), "gates": recorder.summary()}


if __name__ == "__main__":
    run(main)
