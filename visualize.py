"""
One self-contained web page of GateRA's gates: where they open, token by token.

    python train.py --eval-only --adapter out/adapter --visualize 8     # out/after/piqa/gates.html
    python train.py --task piqa --visualize 8                           # the same, after training

Start at write_page: it puts the data of gate_page (from an evaluate.GateRecorder) into PAGE, an
HTML file with its CSS and script inline. No external script, font or image: the file opens from
disk, offline. The data travels as JSON inside a <script type="application/json"> element and the
script shows token text only through textContent, so a token such as "</script>" is just text.
Colours: viridis (dark purple = gate 0, the frozen model; yellow = gate 1, the whole adapter),
a sequential scale that stays legible for colour-blind readers and in grey.
"""

import html
import json
import os

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
    """The page's data from an evaluate.GateRecorder: its kept examples token by token (each token's
    gate per layer and module), the mean gate per (layer, module) and the histogram of each kind of
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


def write_page(path, page):
    """Writes the page (gate_page's dict) as one HTML file, atomically (a temporary file, then a rename)."""
    data = json.dumps(page, ensure_ascii=True)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # no "</script>" inside
    text = PAGE.replace("%TITLE%", html.escape(page["title"])).replace("%DATA%", data)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# the page: HTML, CSS and the script that draws it from the data

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:12px 14px 180px}
h1{font-size:1.2em;margin:.3em 0}h2{font-size:1.05em;margin:1.2em 0 .4em}
.small{color:#555;font-size:.9em}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.scroll{overflow-x:auto;max-width:100%}
.example{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 10px;margin:10px 0}
.tokens{font-family:ui-monospace,monospace;font-size:14px;line-height:2;overflow-wrap:anywhere}
.tok{display:inline;padding:2px 1px;margin:0 1px;border-radius:3px;white-space:pre-wrap;cursor:pointer;
 border-bottom:3px solid transparent}
.tok.answer{border-bottom:3px solid #d62728}
.tok.nogate{background:#fff!important;color:#222!important;border:1px dashed #888}
.tok:focus,.tok.sel{outline:2px solid #000;outline-offset:1px}
.start{font:11px system-ui,sans-serif;color:#d62728;margin:0 2px;white-space:nowrap}
#panel{position:fixed;left:0;right:0;bottom:0;background:#fff;border-top:2px solid #444;padding:6px 14px;
 max-height:40vh;overflow:auto;font-size:13px;box-shadow:0 -2px 8px rgba(0,0,0,.15)}
table{border-collapse:collapse}td,th{padding:1px 5px;text-align:right;font-size:12px}
th{font-weight:600}td.bc{text-align:left}.heat td{width:34px;height:18px;font-size:10px;text-align:center}
.bar{display:inline-block;height:10px;vertical-align:middle}
.legend{height:14px;width:260px;max-width:80vw;border:1px solid #888}
select{font-size:14px;padding:2px}
#errors{color:#b00;white-space:pre-wrap}
.hist{position:relative;margin-top:1.5em;width:300px;max-width:85vw;height:140px;border-bottom:1px solid #333;background:#fff}
.hbar{outline:1px solid rgba(0,0,0,.35)}.band{position:absolute;top:-1.4em;left:2px;font-size:10px;color:#444;white-space:nowrap}
.axis{position:relative;width:300px;max-width:85vw;height:1.3em;font-size:10px}
.axis span{position:absolute;transform:translateX(-50%)}
</style></head>
<body><main>
<h1 id="title"></h1>
<p class="small">Each token is tinted by its gate g(x): 0 (dark) keeps the frozen model, 1 (yellow) applies the
whole adapter update. Answer tokens (scored or generated) are underlined in red. Hover over or tap a token for
its gate in every layer.</p>
<div class="row"><label>tint by <select id="pick"></select></label>
<div><div class="legend" id="legend"></div><div class="small" id="ticks" style="position:relative;width:260px;max-width:80vw;height:1.4em"></div></div></div>
<div id="examples"></div>
<h2>Mean gate per layer and module</h2>
<div class="row scroll" id="heat"></div>
<h2>Histogram of gate values</h2>
<div class="row" id="hist"></div>
<h2>Summary</h2>
<div class="scroll"><table id="summary"></table></div>
<pre id="errors"></pre>
</main>
<div id="panel" class="small">Hover over or tap a token.</div>
<script type="application/json" id="data">%DATA%</script>
<script>
"use strict";
window.onerror = function (msg, src, line) { document.getElementById("errors").textContent += msg + " (line " + line + ")\\n"; };
const D = JSON.parse(document.getElementById("data").textContent);
const VIRIDIS = ["#440154", "#46327e", "#365c8d", "#277f8e", "#1fa187", "#4ac16d", "#a0da39", "#fde725"];
function colour(g) {  // g in [0, 1] -> an interpolated viridis colour
  const x = Math.min(Math.max(g, 0), 1) * (VIRIDIS.length - 1), i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
  const a = VIRIDIS[i], b = VIRIDIS[i + 1], ch = k => Math.round(parseInt(a.substr(k, 2), 16) * (1 - f) + parseInt(b.substr(k, 2), 16) * f);
  return "rgb(" + ch(1) + "," + ch(3) + "," + ch(5) + ")";
}
function ink(g) { return g > 0.55 ? "#000" : "#fff"; }  // readable text on the tint
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function mean(xs) { const v = xs.filter(x => x !== null); return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null; }
function shown(t) { return t.replace(/ /g, "\\u2423").replace(/\\n/g, "\\u21b5\\n").replace(/\\t/g, "\\u21e5"); }
function fmt(g) { return g === null ? "-" : g.toFixed(3); }

// what tints a token: the mean over everything, one layer (mean over modules), or one module type (mean over layers)
const picks = [["all", "mean over all layers and modules"]];
for (let l = 0; l < D.layers; l++) picks.push(["L" + l, "layer " + l]);
D.modules.forEach((m, i) => picks.push(["M" + i, m + " (mean over layers)"]));
const pick = document.getElementById("pick");
picks.forEach(([v, t]) => { const o = el("option", t); o.value = v; pick.appendChild(o); });
function value(gates) {
  if (gates === null) return null;
  const p = pick.value;
  if (p === "all") return mean(gates.flat());
  if (p[0] === "L") return mean(gates[+p.slice(1)]);
  return mean(gates.map(row => row[+p.slice(1)]));
}

document.getElementById("title").textContent = D.title;
const legend = document.getElementById("legend");
legend.style.background = "linear-gradient(to right," + VIRIDIS.join(",") + ")";
[0, 0.1, 0.5, 0.9, 1].forEach(t => { const s = el("span", String(t)); s.style.position = "absolute"; s.style.left = (t * 100) + "%";
  s.style.transform = "translateX(-50%)"; document.getElementById("ticks").appendChild(s); });

const panel = document.getElementById("panel"), cells = [];
function detail(t) {
  panel.textContent = "";
  const head = el("div"); head.appendChild(el("b", "token " + t.id + " ")); head.appendChild(el("code", JSON.stringify(t.text)));
  head.appendChild(el("span", " | " + t.kind + " | tint " + fmt(value(t.gates)))); panel.appendChild(head);
  if (t.gates === null) { panel.appendChild(el("div", "no gate recorded: the last generated token is never fed back to the model")); return; }
  const table = el("table"), hr = el("tr");
  ["layer", "mean", ""].concat(D.modules.map(m => m.replace("_proj", ""))).forEach(h => hr.appendChild(el("th", h))); table.appendChild(hr);
  t.gates.forEach((row, l) => {
    const tr = el("tr"), m = mean(row), bar = el("span", "", "bar");
    bar.style.width = Math.round(60 * (m || 0)) + "px"; bar.style.background = colour(m || 0);
    tr.appendChild(el("td", String(l))); tr.appendChild(el("td", fmt(m))); const bc = el("td", undefined, "bc"); bc.appendChild(bar); tr.appendChild(bc);
    row.forEach(g => { const td = el("td", g === null ? "-" : g.toFixed(2)); if (g !== null) { td.style.background = colour(g); td.style.color = ink(g); }
      tr.appendChild(td); });
    table.appendChild(tr);
  });
  panel.appendChild(table);
}

const box = document.getElementById("examples");
D.examples.forEach(ex => {
  const div = el("div", undefined, "example");
  div.appendChild(el("div", "test example " + ex.index + (ex.note ? " | " + ex.note : ""), "small"));
  const line = el("div", undefined, "tokens");
  ex.tokens.forEach((t, i) => {
    if (t.kind !== "prefill" && (i === 0 || ex.tokens[i - 1].kind === "prefill")) line.appendChild(el("span", "answer \\u25b8", "start"));
    const c = el("span", shown(t.text), "tok" + (t.kind === "prefill" ? "" : " answer") + (t.gates === null ? " nogate" : ""));
    c.tabIndex = 0;
    const show = () => { cells.forEach(x => x[0].classList.remove("sel")); c.classList.add("sel"); detail(t); };
    c.addEventListener("mouseenter", show); c.addEventListener("focus", show); c.addEventListener("click", show);
    cells.push([c, t]); line.appendChild(c);
    line.appendChild(document.createElement("wbr"));  // lines break between tokens (a \u2423 is no space)
  });
  div.appendChild(line); box.appendChild(div);
});
function tint() {
  cells.forEach(([c, t]) => { const g = value(t.gates); if (g !== null) { c.style.background = colour(g); c.style.color = ink(g); }
    c.title = t.kind + ", gate " + fmt(g); });
}
pick.addEventListener("change", tint);
tint();

// heat maps: layers down, modules across, one per kind of position
const heat = document.getElementById("heat");
D.kinds.forEach(kind => {
  const wrap = el("div"); wrap.appendChild(el("div", kind, "small"));
  const table = el("table", undefined, "heat"), hr = el("tr"); hr.appendChild(el("th", "layer"));
  D.modules.forEach(m => hr.appendChild(el("th", m.replace("_proj", "")))); table.appendChild(hr);
  D.heatmap[kind].forEach((row, l) => {
    const tr = el("tr"); tr.appendChild(el("th", String(l)));
    row.forEach((g, i) => { const td = el("td", g === null ? "" : g.toFixed(2)); if (g !== null) { td.style.background = colour(g); td.style.color = ink(g); }
      td.title = kind + ", layer " + l + ", " + D.modules[i] + ": " + fmt(g); tr.appendChild(td); });
    table.appendChild(tr);
  });
  wrap.appendChild(table); heat.appendChild(wrap);
});

// histograms: one bar per bin of 0.05, the bands g < 0.1 and g >= 0.9 shaded
function rect(parent, left, bottom, width, height, colour, cls) {
  const d = el("div", undefined, cls); Object.assign(d.style, {position: "absolute", left: left + "%", bottom: bottom + "%",
    width: width + "%", height: height + "%", background: colour}); parent.appendChild(d); return d;
}
D.kinds.forEach(kind => {
  const counts = D.histogram.counts[kind], total = counts.reduce((a, b) => a + b, 0), top = Math.max(...counts) / (total || 1);
  const wrap = el("div"), plot = el("div", undefined, "hist");
  wrap.appendChild(el("div", kind + " (" + total.toLocaleString() + " gate values; the tallest bar " + (100 * top).toFixed(1) + "%)", "small"));
  rect(plot, 0, 0, 10, 100, "#e4e4e4").appendChild(el("span", "<0.1", "band"));
  rect(plot, 90, 0, 10, 100, "#e4e4e4").appendChild(el("span", "\u22650.9", "band"));
  counts.forEach((c, i) => { const bar = rect(plot, i * 5 + 0.4, 0, 4.2, total ? 100 * (c / total) / top : 0, colour((i + 0.5) / 20), "hbar");
    bar.title = (i * 0.05).toFixed(2) + "-" + ((i + 1) * 0.05).toFixed(2) + ": " + c.toLocaleString(); });
  const axis = el("div", undefined, "axis");
  [0, 0.5, 1].forEach(t => { const s = el("span", String(t)); s.style.left = (100 * t) + "%"; axis.appendChild(s); });
  wrap.appendChild(plot); wrap.appendChild(axis); document.getElementById("hist").appendChild(wrap);
});

const summary = document.getElementById("summary"), hr = el("tr");
["positions of", "mean gate", "share < 0.1", "share \\u2265 0.9", "positions"].forEach(h => hr.appendChild(el("th", h))); summary.appendChild(hr);
D.kinds.forEach(kind => { const s = D.summary[kind], tr = el("tr");
  [kind, s.mean.toFixed(3), (100 * s["below_0.1"]).toFixed(1) + "%", (100 * s["above_0.9"]).toFixed(1) + "%", s.positions.toLocaleString()]
    .forEach(v => tr.appendChild(el("td", v))); summary.appendChild(tr); });
document.body.dataset.ready = "1";
</script></body></html>
"""
