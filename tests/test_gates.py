"""Recording the gates (every value, by position kind, layer and module) and the gate page."""

import json
import shutil
import subprocess

import pytest
import torch

import data
import evaluate
from gatera import GateRAConfig, adapted_layers, apply_gatera
from gates import GateRecorder, gate_page, gate_report, piece_text, write_page
from checkpoints import load_pretrained
from tokenizer import load_tokenizer
from tests.conftest import adapted_tiny, FIXTURES, left_padded, PIQA, piqa_example


# =============================================================================
# recording the gates: every value, by position kind, layer and module (gates.GateRecorder)


def gate_hooks(model):
    """Every gate value, computed from each adapted layer's input by its gate module,
    g = sigmoid(gate(x)), at every forward: {(layer, module): [(B, T) per forward]}."""
    seen = {}
    for name, layer in adapted_layers(model):
        key = (int(name.split(".h.")[1].split(".")[0]), name.rsplit(".", 1)[-1])
        layer.register_forward_hook(lambda m, inputs, out, key=key: seen.setdefault(key, []).append(
            torch.sigmoid(m.gate_logit(inputs[0]))[..., 0]))
    return seen


def test_recorded_gates_are_exactly_the_gate_modules_outputs(workdir):
    model_dir, _, _ = workdir
    tok, model = load_tokenizer(model_dir), load_pretrained(model_dir)
    torch.manual_seed(1)
    apply_gatera(model, GateRAConfig(method="lora", rank=4, gate="token", gate_init_std=0.5,  # gate folded into A
                                     target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    model.eval()
    seen = gate_hooks(model)
    recorder = GateRecorder(keep=2)
    items = [(i, piqa_example(*r)) for i, r in enumerate(PIQA[:3])]
    summary, predictions = evaluate.evaluate(model, tok, "piqa", items, batch_size=4, recorder=recorder)
    L, M = model.config.n_layer, len(recorder.modules)
    assert (L, M) == (2, 7) and recorder.modules[0] == "q_proj"
    rows = [(ctx, cont) for _, ex in items for ctx, cont in
            (data.encode_pair(tok, *c) for c in data.cloze_choices("piqa", ex["instruction"]))]
    want = {kind: torch.zeros(L, M, dtype=torch.float64) for kind in ("prefill", "scored")}
    n_values = {kind: 0 for kind in want}
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))
    for key, outs in seen.items():  # each forward's (B, T) gates, batch by batch in scoring order
        l, m = key[0], recorder.modules.index(key[1])
        for b, g in enumerate(outs):
            for j, i in enumerate(order[4 * b:4 * b + 4]):
                ctx, cont = rows[i]
                want["prefill"][l, m] += g[j, :len(ctx)].sum()
                want["scored"][l, m] += g[j, len(ctx):len(ctx) + len(cont)].sum()  # not the padding after it
    n_values = {"prefill": sum(len(c) for c, _ in rows), "scored": sum(len(c) for _, c in rows)}
    for kind in want:
        s = summary["gates"][kind]
        assert s["positions"] == n_values[kind] and sum(s["histogram"]) == n_values[kind] * L * M
        torch.testing.assert_close(torch.tensor(s["per_layer_module"], dtype=torch.float64),
                                   want[kind] / n_values[kind], rtol=1e-6, atol=1e-7)
    assert sorted(recorder.kept) == [0, 1]  # the first two examples, their correct choice's row in full
    for n, kept in recorder.kept.items():
        ex = items[n][1]
        ctx, cont = data.encode_pair(tok, *data.cloze_choices("piqa", ex["instruction"])[data.gold_index("piqa", ex)])
        assert kept["ids"] == ctx + cont and kept["kinds"] == ["prefill"] * len(ctx) + ["scored"] * len(cont)
        gates = torch.cat(kept["gates"])  # (T, L, M)
        row = [i for i in order if rows[i] == (ctx, cont)][0]
        b, j = order.index(row) // 4, order.index(row) % 4
        for (l, module), outs in seen.items():
            torch.testing.assert_close(gates[:, l, recorder.modules.index(module)], outs[b][j, :len(ctx) + len(cont)])


def test_decode_gates_with_the_kv_cache_equal_the_same_tokens_gates_without_it():
    """Generation feeds the prompt (prefill), then each new token alone with the KV cache (decode):
    the gate of the first generated token is computed in the first decode step; it equals that token's
    gate in one full forward over prompt + generated tokens, without a cache. Left padding and the
    tokens after a row's EOS are not recorded."""
    model = adapted_tiny(method="hira", gate="token", gate_init_std=0.5).eval()
    prompt, mask = left_padded(torch.randint(0, 96, (2, 9)), [9, 5])
    recorder = GateRecorder(keep=2)
    out = model.generate(prompt, 6, mask=mask, on_step=recorder.new_generation({0: 0, 1: 1}))
    full_mask, full_gates = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1), {}
    model(out, mask=full_mask, gates=full_gates)  # no cache: every position at once
    full = GateRecorder().grid(full_gates)  # (L, M, B, 9 + 6)
    for b, n_prompt in enumerate([9, 5]):
        kept = recorder.kept[b]
        assert kept["kinds"] == ["prefill"] * n_prompt + ["decode"] * 5  # the 6th new token is never fed back
        assert kept["ids"] == out[b, 9 - n_prompt:9 + 5].tolist()
        gates = torch.cat(kept["gates"]).permute(1, 2, 0)  # (L, M, T)
        torch.testing.assert_close(gates, full[:, :, b, 9 - n_prompt:9 + 5], rtol=1e-5, atol=1e-6)
        first_decode = kept["gates"][1]  # the first decode step: (1, L, M)
        torch.testing.assert_close(first_decode[0], full[:, :, b, 9], rtol=1e-5, atol=1e-6)
    summary = recorder.summary()
    assert summary["prefill"]["positions"] == 9 + 5 and summary["decode"]["positions"] == 2 * 5
    eos = out[0, 10].item()  # row 0's second new token ends it; row 1 goes on (unless it emits it too)
    recorder = GateRecorder(keep=1)
    out = model.generate(prompt, 6, mask=mask, eos_id=eos, on_step=recorder.new_generation({0: 0}))
    assert recorder.kept[0]["ids"][9:] == out[0, 9:11].tolist()  # its two tokens, EOS included, not the EOS after


def test_one_recorder_over_two_generations_records_each_prompt_as_prefill():
    """evaluate's label generation hands one recorder batch after batch: new_generation starts the
    steps over, so the second batch's prompt counts as prefill, not decode, under its own example numbers."""
    model = adapted_tiny(method="lora", gate="token", gate_init_std=0.5).eval()
    prompt, mask = left_padded(torch.randint(0, 96, (2, 6)), [6, 4])
    recorder = GateRecorder(keep=4)
    for offset in (0, 2):
        model.generate(prompt, 3, mask=mask, on_step=recorder.new_generation({0: offset, 1: offset + 1}))
    assert [recorder.kept[n]["kinds"] for n in range(4)] == [["prefill"] * n + ["decode"] * 2 for n in (6, 4, 6, 4)]
    summary = recorder.summary()
    assert summary["prefill"]["positions"] == 2 * (6 + 4) and summary["decode"]["positions"] == 2 * 2 * 2


def test_a_model_without_gates_records_nothing_and_the_report_says_where_gates_differ():
    gates, ids = {}, torch.zeros(1, 3, dtype=torch.long)
    adapted_tiny(method="lora", gate="none")(ids, gates=gates)  # the forward writes no gate into the dict
    recorder = GateRecorder(keep=1)
    recorder.add(gates, torch.zeros(1, 3, dtype=torch.long), ids, {0: 0})
    assert gates == {} and recorder.summary() == {} and recorder.kept == {} and gate_report({}, "after") == []
    summary = {"prefill": {"mean": 0.2, "below_0.1": 0.5, "above_0.9": 0.0, "positions": 10, "per_layer": [0.1, 0.2, 0.3]},
               "decode": {"mean": 0.6, "below_0.1": 0.0, "above_0.9": 0.4, "positions": 4, "per_layer": [0.2, 0.9, 0.35]}}
    lines = gate_report(summary, "after training")
    assert lines[1].split()[:2] == ["prefill", "0.200"] and "40.0%" in lines[2]
    assert lines[3].endswith("layer 1 (0.200 vs 0.900), layer 0 (0.100 vs 0.200), layer 2 (0.300 vs 0.350)")


# =============================================================================
# the gate page (gates.py, gates.html)

HOSTILE = ["</script><script>alert(1)</script>", "&amp; & \"quotes\" 'single'", "<b>bold</b>"]


def tiny_page(tmp_path, texts=None):
    """gates.html of a tiny gated model generating from two prompts; texts, if given, replace the tokens' text."""
    model = adapted_tiny(method="hira", gate="token", gate_init_std=0.5).eval()
    prompt, mask = left_padded(torch.randint(0, 96, (2, 7)), [7, 4])
    recorder = GateRecorder(keep=2)
    model.generate(prompt, 5, mask=mask, on_step=recorder.new_generation({0: 0, 1: 1}))
    tok = load_tokenizer(FIXTURES / "tokenizers" / "smollm_tiny")  # ids 0-95: the tiny model's vocabulary
    page = gate_page("tiny <model> & page", recorder, tok)
    for t, text in zip((t for ex in page["examples"] for t in ex["tokens"]), texts or []):
        t["text"] = text
    path = tmp_path / "gates.html"
    write_page(str(path), page)
    return path, page, recorder


class Tags(__import__("html.parser").parser.HTMLParser):
    """Every start tag with its attributes, and the text of the JSON data element."""
    def __init__(self):
        super().__init__()
        self.tags, self.open, self.data = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "br", "input", "link", "img", "base", "embed", "hr", "wbr", "source"):  # void elements
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes {self.open[-1:]}"

    def handle_data(self, text):
        if self.tags and self.tags[-1] == ("script", {"type": "application/json", "id": "data"}) and self.open[-1:] == ["script"]:
            self.data = (self.data or "") + text


def test_the_page_parses_holds_every_token_and_embeds_no_external_url(tmp_path):
    path, page, recorder = tiny_page(tmp_path)
    text = path.read_text()
    parser = Tags()
    parser.feed(text)
    parser.close()
    assert parser.open == []  # every element closed
    assert json.loads(parser.data) == json.loads(json.dumps(page))  # the data, whole
    tokens = [t for ex in json.loads(parser.data)["examples"] for t in ex["tokens"]]
    assert len(tokens) == sum(len(ex["ids"]) for ex in recorder.kept.values()) == 7 + 4 + 2 * 4
    assert [t["kind"] for t in tokens[:8]] == ["prefill"] * 7 + ["decode"]
    for tag, attrs in parser.tags:  # every element: none loads anything
        assert tag not in ("link", "img", "iframe", "object", "embed", "base"), (tag, attrs)
        assert not {"src", "href", "srcset", "action"} & set(attrs), (tag, attrs)
    for external in ("http:", "https:", "://", "@import", "url("):  # (a protocol-relative "//host" needs src/href)
        assert external not in text, external


def test_hostile_token_text_is_escaped_and_kept_exactly(tmp_path):
    broken = piece_text(b"\xe2\x82")  # half of a three-byte character
    assert broken == "\\xe2\\x82" and piece_text("é".encode()) == "é"
    path, page, _ = tiny_page(tmp_path, HOSTILE + [broken])
    text = path.read_text()
    for raw in ("</script><script>", "<b>", "alert(1)</script>"):
        assert raw not in text
    assert text.count("</script>") == 2  # the data element's and the script's own
    data = text.split('<script type="application/json" id="data">')[1].split("</script>")[0]
    assert not {"<", ">", "&"} & set(data)  # all as \u003c, \u003e, \u0026: no "</script " or "<!--" inside
    parser = Tags()
    parser.feed(text)
    assert [t["text"] for t in json.loads(parser.data)["examples"][0]["tokens"][:4]] == HOSTILE + [broken]
    assert "<title>tiny &lt;model&gt; &amp; page</title>" in text


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium_without_script_errors(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package chromium): the page was not rendered")
    path, page, _ = tiny_page(tmp_path, HOSTILE)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    n_tokens = sum(len(ex["tokens"]) for ex in page["examples"])
    assert 'data-ready="1"' in dom  # the script ran to its last line
    assert '<pre id="errors"></pre>' in dom  # and window.onerror saw nothing
    assert len(__import__("re").findall(r'class="tok[ "]', dom)) == n_tokens
    assert "alert(1)" in dom and "<script>alert" not in dom  # shown as text, not run
    assert dom.count('<table class="heat">') == 2  # prefill beside decode
