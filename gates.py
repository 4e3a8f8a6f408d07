"""
An extra: recording GateRA's gates during an evaluation or a generation, and drawing them as one web page.

    python train.py --eval-only --adapter out/adapter --visualize 8     # out/after/piqa/gates.html
    python train.py --task piqa --visualize 8                           # the same, after training

Start reading at GateRecorder.add. A forward called with a dict, model(ids, gates=gates), fills it
with every gated layer's gate value g = sigmoid(z), (B, T), under the layer's module name; add()
takes that dict with the kind of each position (prompt, scored continuation, generated token) and
keeps sums and a histogram per layer and module. gate_report turns the summary into lines for the
log; gate_page into the page's data, which write_page injects as JSON into the template gates.html
(its HTML, CSS and script, beside this file).

The page needs no external script, font or image: the file opens from disk, offline. The data
travels as JSON inside a <script type="application/json"> element with <, > and & escaped, and the
script shows token text only through textContent, so a token such as "</script>" is just text.
Colours: viridis (dark purple = gate 0, the frozen model; yellow = gate 1, the whole adapter),
a sequential scale that stays legible for colour-blind readers and in grey.
"""

import html
import json
import math
import os
import re
from pathlib import Path

import torch

from files import atomic_write

# -----------------------------------------------------------------------------
# recording: every gate value, by kind of position, layer and module

KINDS = ("prefill", "scored", "decode")  # the prompt; a scored continuation (fed whole); generated, fed one by one


def layer_and_module(name):
    """A gated layer's name -> (layer index, module type): "transformer.h.3.attn.q_proj" -> (3, "q_proj")."""
    return int(re.search(r"\.h\.(\d+)\.", name)[1]), name.rsplit(".", 1)[-1]


class GateRecorder:
    """Every gate value of an evaluation, by kind of position (KINDS), layer and module type.

    After each forward, add() takes the dict of gates g = sigmoid(z) that the forward filled
    ({layer name: (B, T)}) and the kind of each position, as the caller marks them. Memory stays
    bounded whatever the test set: for all positions only sums (layers x modules) and a 20-bin
    histogram per kind; the full (tokens, layers, modules) gates only for the first `keep` examples
    (the page). Padding and tokens after a generated EOS are never marked. The layers and modules
    come from the first dict's names; an empty dict (a model without gates) records nothing; no
    recorder (evaluate's default) costs nothing."""

    def __init__(self, keep=0):
        self.keep = keep
        self.modules, self.n_layer, self.cells = [], 0, {}  # e.g. [q_proj, ...]; name -> (layer, module index)
        self.sums = None                                     # (K, L, M) once the first gates come
        self.counts = [0] * len(KINDS)
        self.hist = torch.zeros(len(KINDS), 20, dtype=torch.float64)  # bins of 0.05 on [0, 1]
        self.kept = {}  # example number -> {"ids": [...], "kinds": [...], "gates": [(T, L, M) tensors]}
        self.step, self.rows = 0, {}  # GPT.generate's step, and the rows to keep (new_generation)

    def grid(self, gates):
        """A forward's dict of gates as one (L, M, B, T) tensor (NaN where a layer has no such module)."""
        if not self.cells:
            where = {name: layer_and_module(name) for name in gates}
            self.modules = list(dict.fromkeys(m for _, m in where.values()))
            self.n_layer = max(l for l, _ in where.values()) + 1
            self.cells = {name: (l, self.modules.index(m)) for name, (l, m) in where.items()}
            self.sums = torch.zeros(len(KINDS), self.n_layer, len(self.modules), dtype=torch.float64)
        B, T = next(iter(gates.values())).shape
        grid = torch.full((self.n_layer, len(self.modules), B, T), float("nan"))
        for name, g in gates.items():
            if name not in self.cells:
                raise ValueError(f"{name}: a gated layer this recorder has not seen before; use one recorder per model")
            grid[self.cells[name]] = g.detach().float().cpu()
        return grid

    def add(self, gates, kinds, ids, keep=None):
        """gates: the dict {layer name: g (B, T)} of one forward; kinds (B, T): index into KINDS of each
        position, -1 where not counted; ids (B, T) its input tokens; keep {row b: example number} of
        the rows whose full gates to keep."""
        if not gates:
            return
        g, kinds = self.grid(gates), kinds.cpu()                   # (L, M, B, T), (B, T)
        for k in range(len(KINDS)):
            v = g[:, :, kinds == k]                                  # (L, M, n) the gates at those positions
            if v.shape[-1]:
                self.sums[k] += v.nansum(-1)
                self.counts[k] += v.shape[-1]
                self.hist[k] += torch.histc(v[~v.isnan()], bins=20, min=0, max=1)
        for b, n in (keep or {}).items():
            if n < self.keep:
                real = kinds[b] >= 0
                ex = self.kept.setdefault(n, {"ids": [], "kinds": [], "gates": []})
                ex["ids"] += ids[b].cpu()[real].tolist()
                ex["kinds"] += [KINDS[k] for k in kinds[b][real].tolist()]
                ex["gates"].append(g[:, :, b, real].permute(2, 0, 1))  # (T, L, M)

    def new_generation(self, keep=None):
        """Before each GPT.generate: its next step reads the prompt, and keep {row b: example number}
        names the rows to keep in full. Returns on_step, the callback to hand to generate."""
        self.step, self.rows = 0, keep or {}
        return self.on_step

    def on_step(self, fed, real, nxt, gates):
        """GPT.generate(on_step=...) calls this after each step: the first step's forward read the
        prompt (prefill), each later one the token generated before it (decode); real (B, t) marks
        the fed tokens that count (not padding, not after an EOS)."""
        self.add(gates, torch.where(real, 0 if self.step == 0 else 2, -1), fed, self.rows)
        self.step += 1

    def summary(self):
        """Per kind of position: the mean gate, per layer, per module type and per (layer, module);
        the share of gates below 0.1 and at or above 0.9; the histogram; the number of positions."""
        out = {}
        for k, kind in enumerate(KINDS):
            if self.counts[k]:
                mean = self.sums[k] / self.counts[k]                  # (L, M)
                hist = self.hist[k]
                out[kind] = {"mean": mean.nanmean().item(), "below_0.1": (hist[:2].sum() / hist.sum()).item(),
                             "above_0.9": (hist[18:].sum() / hist.sum()).item(), "positions": self.counts[k],
                             "per_layer": mean.nanmean(1).tolist(),
                             "per_module": dict(zip(self.modules, mean.nanmean(0).tolist())),
                             "per_layer_module": [[None if math.isnan(x) else x for x in row] for row in mean.tolist()],
                             "histogram": [int(c) for c in hist.tolist()]}
        return out


def gate_report(summary, when):
    """Lines for the end of the log: the gates on each kind of position, and the layers where the
    prompt's gates differ most from the answer's (the paper: low on the prompt, open on the answer)."""
    if not summary:
        return []
    lines = [f"gates {when} (mean | < 0.1 | >= 0.9 | positions):"]
    lines += [f"  {kind:8s} {s['mean']:.3f} | {s['below_0.1']:6.1%} | {s['above_0.9']:6.1%} | {s['positions']:,}"
              for kind, s in summary.items()]
    answer = "decode" if "decode" in summary else "scored"
    if "prefill" in summary and answer in summary:
        pre, ans = summary["prefill"]["per_layer"], summary[answer]["per_layer"]
        top = sorted(range(len(pre)), key=lambda i: -abs(pre[i] - ans[i]))[:3]
        lines.append(f"  largest prefill - {answer} difference: " +
                     ", ".join(f"layer {i} ({pre[i]:.3f} vs {ans[i]:.3f})" for i in top))
    return lines


# -----------------------------------------------------------------------------
# the page's data


def piece_text(raw):
    """A token's bytes as display text: UTF-8 where valid; half a character as \\xNN escapes."""
    return raw.decode("utf-8", errors="backslashreplace")


def no_nan(rows):
    """JSON has no NaN: a (layer, module) pair that is not adapted becomes null."""
    return [[None if x != x else x for x in row] for row in rows]


def note(p):
    """One line on an example's answer: the correct one, and what the model predicted or generated."""
    if p is None:
        return ""
    if "generated" in p:
        return f"generated {p['generated']!r} -> {p['extracted'] or 'no label'} | correct: choice {p['gold'] + 1}"
    right = "right" if p["pred"] == p["gold"] else "wrong"
    return f"shown: the correct choice ({p['gold'] + 1}) | predicted: choice {p['pred'] + 1} ({right})"


def gate_page(title, recorder, tok, indices=None, predictions=None):
    """The page's data from a GateRecorder: its kept examples token by token (each token's gate per
    layer and module), the mean gate per (layer, module) and the histogram of each kind of
    position. indices: the test-file index of each kept example, in order; predictions: the
    evaluation's, for each example's note."""
    summary = recorder.summary()
    by_index = {p["index"]: p for p in predictions or []}
    examples = []
    for k, n in enumerate(sorted(recorder.kept)):
        kept = recorder.kept[n]
        gates = [row for t in kept["gates"] for row in t.tolist()]  # (T, L, M) as lists
        tokens = [{"id": i, "text": piece_text(tok.token_bytes(i)), "kind": kind, "gates": no_nan(g)}
                  for i, kind, g in zip(kept["ids"], kept["kinds"], gates)]
        index = indices[k] if indices else n
        examples.append({"index": index, "note": note(by_index.get(index)), "tokens": tokens})
    return {"title": title, "layers": recorder.n_layer, "modules": recorder.modules, "kinds": list(summary),
            "examples": examples,
            "heatmap": {kind: s["per_layer_module"] for kind, s in summary.items()},
            "histogram": {"edges": [i / 20 for i in range(21)],
                          "counts": {kind: s["histogram"] for kind, s in summary.items()}},
            "summary": {kind: {k: s[k] for k in ("mean", "below_0.1", "above_0.9", "positions")}
                        for kind, s in summary.items()}}


# -----------------------------------------------------------------------------
# the page: the template gates.html with the data injected

TEMPLATE = Path(__file__).with_name("gates.html")  # HTML, CSS and the script that draws the data


def write_page(path, page):
    """Writes the page (gate_page's dict) into the template as one HTML file, atomically: the title
    HTML-escaped for <title>, the data as JSON for the script, with <, > and & as \\u escapes, so
    that no text in it can close the <script> element (JSON.parse reads them back unchanged)."""
    data = json.dumps(page, ensure_ascii=True)
    data = data.replace("<", r"\u003c").replace(">", r"\u003e").replace("&", r"\u0026")
    values = {"%TITLE%": html.escape(page["title"]), "%DATA%": data}
    text = re.sub("%TITLE%|%DATA%", lambda m: values[m[0]], TEMPLATE.read_text(encoding="utf-8"))  # one pass

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, write)
