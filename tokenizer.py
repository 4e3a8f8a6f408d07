"""
Tokenizers: a checkpoint's own byte-level BPE, run by tiktoken.

load_tokenizer(name_or_path) reads the tokenizer files a checkpoint ships and builds one
tiktoken.Encoding from them (mergeable ranks, split regex, special tokens); nothing else is
downloaded. Four sources, all byte-level BPE: GPT-2's vocab.json + merges.txt (also named
encoder.json + vocab.bpe); a Hugging Face tokenizer.json of type BPE with a ByteLevel
pre-tokenizer (GPT-2, SmolLM2, Llama 3); Llama 3's tiktoken file original/tokenizer.model; the
vocabulary and merges inside a .gguf file (needs the optional `gguf` package).

Start reading at Tokenizer (what encode and decode do), then the builders, then load_tokenizer at
the bottom, which picks the builder for a file.
"""
import base64
from pathlib import Path

import tiktoken

from checkpoints import checkpoint_files, open_gguf, read_json
from cli import UserError

# split regexes: text is cut into pieces by one regex, then BPE runs inside each piece

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 (a StarCoder-style tokenizer) first cuts out every digit on its own, then applies GPT-2's
# regex to the text between digits. As one regex: a digit is a piece, and a whitespace run also
# counts as "last in its piece" when a digit follows it, so (?!\S) becomes (?![^\s\p{N}]).
DIGITS_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_SPLITS = {"gpt-2": GPT2_SPLIT, "smollm": DIGITS_GPT2_SPLIT, "starcoder": DIGITS_GPT2_SPLIT,
               "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT}  # tokenizer.ggml.pre

# Llama 3's 256 special tokens follow its 128,000 ranks (names as in Meta's Llama 3.1+ tokenizer)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>", "<|image|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "original/tokenizer.model"]  # fetched for a Hub id
AGAIN = "restore it or download the checkpoint again"  # what to do about a damaged tokenizer file
SUPPORTED = ("supported are byte-level BPE tokenizers: GPT-2's vocab.json + merges.txt, a tokenizer.json "
             "with a BPE model and a ByteLevel pre-tokenizer (GPT-2, SmolLM2, Llama 3), Llama 3's tiktoken "
             "original/tokenizer.model, or a .gguf file whose tokenizer.ggml.model is 'gpt2'")


def _gpt2_byte_chars():
    """GPT-2's printable stand-in character for each byte 0..255; byte-level vocabularies spell tokens with these."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]  # control bytes and spaces move to chr(256), chr(257), ...
    chars = {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(moved)}
    return [chars[b] for b in range(256)]


BYTE_CHARS = _gpt2_byte_chars()


# -----------------------------------------------------------------------------
# the tokenizer

class Tokenizer:
    """Byte-level BPE on a tiktoken.Encoding (self.enc), speaking the checkpoint's own token ids.

    tiktoken works in ranks (merge priority) while a checkpoint's ids need not be ranks: SmolLM2
    puts 17 special tokens at ids 0-16 and its single bytes in alphabet order. So encode maps
    rank -> id and decode maps id -> rank.
    encode() makes special tokens only when asked (bos=, eos=): special-token text inside the input,
    e.g. "<|endoftext|>", is encoded as ordinary text (tiktoken's disallowed_special=()), so data
    cannot inject control tokens. Added tokens that are not special (tokenizer.json "special": false,
    GGUF USER_DEFINED) are matched in the text, as Hugging Face does.
    """

    def __init__(self, name, pattern, tokens, specials, matched=frozenset(), bos_id=None, eos_id=None, pad_id=None,
                 add_bos=False):
        """tokens: (bytes, id) pairs in merge-priority order; specials: token text -> id.
        id None marks a byte the vocabulary lacks (SmolLM2 lacks 21, e.g. the control character
        \x04): encode drops it, as Hugging Face does, but Hugging Face then lets its neighbours
        in the same piece merge and we do not, so such rare text can get other ids."""
        ranks, self._id = {}, []  # token bytes -> rank, rank -> id
        for piece, i in tokens:
            if piece not in ranks:  # a later merge rule can rebuild an existing token: keep its first rank
                ranks[piece] = len(self._id)
                self._id.append(i)
        special_ranks = {text: len(self._id) + k for k, text in enumerate(specials)}
        self._id += list(specials.values())
        self._rank = {}
        for r, i in enumerate(self._id):
            if i is not None:
                self._rank.setdefault(i, r)
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_ranks)
        self.name, self.matched = name, set(matched)
        self.vocab_size = max(self._rank) + 1
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos and bos_id is not None  # the checkpoint's own habit: Llama 3 yes, GPT-2/SmolLM2 no
        self.pad_id = pad_id if pad_id is not None else eos_id  # a real id to pad with
        if self.pad_id is None:
            raise UserError(f"{name}: found no eos or pad token; name one as eos_token in tokenizer_config.json")

    def encode(self, text, bos=False, eos=False):
        """text -> list of token ids, with the BOS / EOS id around it when asked."""
        for wanted, i, what in ((bos, self.bos_id, "BOS"), (eos, self.eos_id, "EOS")):
            if wanted and i is None:
                raise ValueError(f"{self.name} has no {what} token; call encode(..., {what.lower()}=False)")
        ranks = self.enc.encode(text, allowed_special=self.matched, disallowed_special=())
        ids = [i for r in ranks if (i := self._id[r]) is not None]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        """token ids -> text (invalid UTF-8, e.g. half a character, becomes U+FFFD, as in Hugging Face)."""
        try:
            ranks = [self._rank[int(i)] for i in ids]
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary of {self.name}") from None
        return self.enc.decode(ranks)

    def token_bytes(self, i):
        """The bytes of one token id (a piece of a character, possibly: see gates.piece_text)."""
        if int(i) not in self._rank:
            raise ValueError(f"token id {i} is not in the vocabulary of {self.name}")
        return self.enc.decode_single_token_bytes(self._rank[int(i)])


# -----------------------------------------------------------------------------
# building a Tokenizer from each kind of file



def _byte_level_bpe(name, pattern, vocab, merges, specials, matched=(), bos_id=None, eos_id=None, pad_id=None,
                    add_bos=False):
    """A Tokenizer from Hugging Face style byte-level BPE: vocab (token string -> id) and merge rules.

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank; Hugging Face applies
    the merge rule with the lowest index. Giving the token made by merge rule i the rank 256 + i
    (after the 256 single bytes, whose ranks never matter) makes both choose the same merges.
    """
    byte_of = {c: b for b, c in enumerate(BYTE_CHARS)}
    if not all(c in byte_of for a, b in merges for c in a + b):
        raise UserError(f"{name}: merges use characters outside GPT-2's byte alphabet, so this is not "
                        f"byte-level BPE; {SUPPORTED}")
    lost = [a + b for a, b in merges if a + b not in vocab]
    if lost:
        raise UserError(f"{name}: {len(lost)} merge results are not in the vocabulary, e.g. {lost[0]!r}")
    # single bytes in id order (then GPT-2's ranks equal its ids), bytes missing from the vocabulary last
    singles = sorted(range(256), key=lambda b: vocab.get(BYTE_CHARS[b], float("inf")))
    tokens = [(bytes([b]), vocab.get(BYTE_CHARS[b])) for b in singles]
    tokens += [(bytes(byte_of[c] for c in a + b), vocab[a + b]) for a, b in merges]
    return Tokenizer(name, pattern, tokens, specials, matched, bos_id, eos_id, pad_id, add_bos)


def _configured_specials(folder, token_ids, add_bos=False):
    """(bos, eos, pad) ids named in tokenizer_config.json / special_tokens_map.json, else GPT-2's <|endoftext|>,
    and whether BOS is prepended (tokenizer_config.json's add_bos_token, else add_bos)."""
    names = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        if (folder / file).is_file():
            config = read_json(folder / file, AGAIN)
            for key in ("bos_token", "eos_token", "pad_token"):
                if key in config:  # null means none
                    token = config[key]
                    names[key] = token.get("content") if isinstance(token, dict) else token
            add_bos = config.get("add_bos_token", add_bos)
    default = "<|endoftext|>"
    return (token_ids.get(names.get("bos_token", default)), token_ids.get(names.get("eos_token", default)),
            token_ids.get(names.get("pad_token")), add_bos)


def _from_gpt2_files(vocab_path):
    """GPT-2's vocab.json + merges.txt (OpenAI's names: encoder.json + vocab.bpe)."""
    merges_path = vocab_path.with_name("merges.txt" if vocab_path.name == "vocab.json" else "vocab.bpe")
    if not merges_path.is_file():
        raise UserError(f"{merges_path} not found: {vocab_path.name} needs the merges file next to it")
    vocab = read_json(vocab_path, AGAIN)
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:  # e.g. cut in the middle of a character
        raise UserError(f"{merges_path} is damaged: not UTF-8 text (byte {e.start}); {AGAIN}") from e
    merges = []
    for n, line in enumerate(lines, 1):
        if line and not line.startswith("#version"):
            if len(pair := line.split(" ")) != 2:
                raise UserError(f"{merges_path}: line {n} is not a merge rule (two tokens, a space between): "
                                f"{line!r}; {AGAIN}")
            merges.append(pair)
    made = {a + b for a, b in merges} | set(BYTE_CHARS)
    specials = {t: i for t, i in vocab.items() if t not in made}  # e.g. <|endoftext|>: no merge makes it
    return _byte_level_bpe(str(vocab_path), GPT2_SPLIT, vocab, merges, specials, (),
                           *_configured_specials(vocab_path.parent, vocab))


def _split_regex(pre_tokenizer, where):
    """The one split regex equal to a tokenizer.json pre_tokenizer, for the shapes byte-level checkpoints use:
    ByteLevel (GPT-2), Digits + ByteLevel (SmolLM2), Split(regex) + ByteLevel without regex (Llama 3)."""
    pre_tokenizer = pre_tokenizer or {}
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])  # a Sequence's steps, or the one pre-tokenizer
    *first, last = steps
    kinds = [step.get("type") for step in first]
    if last.get("type") == "ByteLevel" and not last.get("add_prefix_space"):
        if last.get("use_regex", True) and kinds == []:
            return GPT2_SPLIT
        if last.get("use_regex", True) and kinds == ["Digits"] and first[0].get("individual_digits"):
            return DIGITS_GPT2_SPLIT
        if not last.get("use_regex", True) and kinds == ["Split"] and "Regex" in first[0]["pattern"] \
                and first[0]["behavior"] == "Isolated" and not first[0]["invert"]:
            return first[0]["pattern"]["Regex"]
    raise UserError(f"{where}: pre_tokenizer {[s.get('type') for s in steps]} has no single split regex here; "
                    f"{SUPPORTED}")


def _from_tokenizer_json(path):
    """A Hugging Face tokenizer.json (plus tokenizer_config.json beside it for bos / eos / pad)."""
    spec = read_json(path, AGAIN)
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict):
        raise UserError(f"{path} has no \"model\" object: not a tokenizer.json, or damaged; {AGAIN}")
    if model.get("type") != "BPE" or spec.get("normalizer") or model.get("byte_fallback") or model.get("dropout") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError(f"{path}: a {model.get('type')} model (normalizer {spec.get('normalizer')}, byte_fallback "
                        f"{model.get('byte_fallback')}) is not plain byte-level BPE; {SUPPORTED}")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise UserError(f"{path}: its BPE model lacks a vocab or merges list: the file is damaged; {AGAIN}")
    pattern = _split_regex(spec.get("pre_tokenizer"), path)
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]  # "a b" or ["a", "b"]
    added = spec.get("added_tokens", [])
    specials = {t["content"]: t["id"] for t in added}
    matched = {t["content"] for t in added if not t["special"]}
    ids = {**model["vocab"], **specials}
    template = (spec.get("post_processor") or {}).get("single") or [{}]  # Llama 3: [<|begin_of_text|>, $A]
    return _byte_level_bpe(str(path), pattern, model["vocab"], merges, specials, matched,
                           *_configured_specials(path.parent, ids, add_bos="SpecialToken" in template[0]))


def _from_tiktoken_file(path):
    """Llama 3's original/tokenizer.model: one "base64(token bytes) rank" line per token, rank = id,
    then the 256 special tokens; tiktoken format, so ranks need no translation."""
    try:
        lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line]
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in lines}
    except ValueError:  # also UnicodeDecodeError, binascii.Error, and unpacking a line that is not 2 fields
        raise UserError(f"{path} is not a tiktoken BPE file (SentencePiece tokenizer.model files, as Llama 1 and 2 "
                        f"use, are not supported); {SUPPORTED}") from None
    n = len(ranks)
    tokens = sorted(ranks.items(), key=lambda item: item[1])
    specials = {text: n + k for k, text in enumerate(LLAMA3_SPECIALS)}
    return Tokenizer(str(path), LLAMA3_SPLIT, tokens, specials, bos_id=n, eos_id=n + 1, add_bos=True)


def _from_gguf(path):
    """The tokenizer inside a .gguf file (llama.cpp's tokenizer.ggml.* keys)."""
    fields = open_gguf(path).fields

    def get(key, required=True):
        if key not in fields and required:
            raise UserError(f"{path} has no {key}: it carries no byte-level BPE tokenizer; {SUPPORTED}")
        return fields[key].contents() if key in fields else None

    model = get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"{path}: tokenizer.ggml.model is {model!r} ('llama' is SentencePiece); {SUPPORTED}")
    pre = get("tokenizer.ggml.pre")
    if pre not in GGUF_SPLITS:
        raise UserError(f"{path}: unknown pre-tokenizer tokenizer.ggml.pre = {pre!r}; known: {sorted(GGUF_SPLITS)}")
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types: special, and added but not special
    specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)}
    matched = {t for t, kind in zip(tokens, types) if kind == USER_DEFINED}
    merges = [m.split(" ") for m in get("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    ids = [get(f"tokenizer.ggml.{key}_token_id", required=False) for key in ("bos", "eos", "padding")]
    add_bos = bool(get("tokenizer.ggml.add_bos_token", required=False))
    return _byte_level_bpe(str(path), GGUF_SPLITS[pre], vocab, merges, specials, matched, *ids, add_bos)


# -----------------------------------------------------------------------------
# the one entry point


def load_tokenizer(name_or_path):
    """A Tokenizer from a checkpoint directory, a tokenizer file, a .gguf file or a Hugging Face Hub id.
    In a directory the first found wins: tokenizer.json, vocab.json, encoder.json, tokenizer.model,
    original/tokenizer.model, a .gguf."""
    path = Path(name_or_path)
    if not path.exists():  # a Hub id (or a short name of checkpoints.EMBEDDED): downloaded as checkpoints do
        path = Path(checkpoint_files(str(name_or_path), allow_patterns=TOKENIZER_FILES))
    if path.is_dir():
        names = ["tokenizer.json", "vocab.json", "encoder.json", "tokenizer.model", "original/tokenizer.model"]
        found = [path / n for n in names if (path / n).is_file()] + sorted(path.glob("*.gguf"))
        if not found:
            raise UserError(f"no tokenizer in {path}: looked for {', '.join(names)} or a .gguf; {SUPPORTED}")
        path = found[0]
    if path.suffix == ".gguf":
        return _from_gguf(path)
    if path.name == "tokenizer.json":
        return _from_tokenizer_json(path)
    if path.name in ("vocab.json", "encoder.json"):
        return _from_gpt2_files(path)
    if path.name == "tokenizer.model":
        return _from_tiktoken_file(path)
    raise UserError(f"{path} is not a tokenizer file this project reads; {SUPPORTED}")
