"""Draws the figures of docs/ as SVG files, from the golden models, with the standard library and NumPy only.

    python docs/make_figures.py              # (re)writes docs/figures/*.svg
    python docs/make_figures.py --out DIR    # writes them into DIR (tests/test_docs.py compares the two)

- attention_llama_mha.svg: transformers' attention probabilities stored in golden/cases/llama_mha.npz.
- rope_frequencies.svg: inv_freq per rotary pair for each rope_scaling type, from the golden configs (refimpl.rope).
- block_llama.svg, block_open_llama.svg, block_opt.svg: one decoder block per family. Every box names the trace
  point (refimpl.trace) that holds its output, and its shape is read from a traced forward of a golden model, so a
  renamed or reshaped op breaks this script instead of leaving a stale picture.
- trained_heads.svg, trained_logit_lens.svg, trained_residual_max.svg: golden/models/llama_trained on held-out line
  SHOWN + 1 of golden/trained/heldout.txt: the best previous-token, sink and induction heads (scored over the first
  MEASURED held-out docstrings), the logit lens (final norm + lm_head on each residual state), and the max |value|
  per hidden dimension of the residual stream.

The SVG markup is written by hand (heatmaps are paths of unit squares, plots are polylines); numbers are formatted
with fixed decimals, so the output is the same bytes on every run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from refimpl import load, load_tokenizer, read_config  # noqa: E402  (the repository root must be on the path first)
from refimpl.llama import lm_logits  # noqa: E402
from refimpl.ops import rms_norm, softmax  # noqa: E402
from refimpl.rope import default_inv_freq, llama_rope_init  # noqa: E402
from refimpl.trace import TABLES, Trace, generic_name  # noqa: E402

GOLDEN = os.path.join(ROOT, "golden")
FONT = "font-family=\"Helvetica, Arial, sans-serif\""
MONO = "font-family=\"Menlo, Consolas, monospace\""


def esc(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg(width, height, body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT} font-size="12">\n'
            f'<rect width="{width}" height="{height}" fill="#ffffff"/>\n' + "".join(body) + "</svg>\n")


def text(x, y, s, size=12, anchor="start", extra=""):
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>{esc(s)}</text>\n'


# --- colours ------------------------------------------------------------------------------------------------

VIRIDIS = ["#440154", "#482878", "#3e4a89", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
           "#fde725"]


def palette(n):
    """n colours along viridis, interpolated between its anchors."""
    anchors = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in VIRIDIS]
    out = []
    for k in range(n):
        t = k / (n - 1) * (len(anchors) - 1)
        i = min(int(t), len(anchors) - 2)
        a, b, f = anchors[i], anchors[i + 1], t - i
        out.append("#%02x%02x%02x" % tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3)))
    return out


# --- attention maps -----------------------------------------------------------------------------------------

def attention_figure():
    """Layer x head grid of golden llama_mha attention on the left-padded batch row, first N positions."""
    case = np.load(os.path.join(GOLDEN, "cases", "llama_mha.npz"))
    row, n, cell = 1, 16, 10
    mask = case["full.in.attention_mask"][row]
    pads = int(np.sum(mask[:n] == 0))
    keys = case["full.out.attentions.0"].shape[-1]
    levels = 12
    colours = palette(levels)
    lo = -3.0  # log10 of the smallest probability given its own colour

    def level(p):
        return min(levels - 1, max(0, int((math.log10(p) - lo) / -lo * levels)))

    size = n * cell
    left, top, gap = 70, 78, 34
    body = [text(20, 24, f"Attention probabilities of golden llama_mha on its left-padded batch row "
                         f"(transformers 4.46.3)", 15, extra=' font-weight="bold"'),
            text(20, 44, f"Row {row} of the `full` call: {pads} pads, then tokens. First {n} of {keys} positions. "
                         f"Grey: exactly 0 (masked). Pad rows are flat: 1/{keys} on every key, future ones too.", 12)]
    for layer in range(2):
        probs = case[f"full.out.attentions.{layer}"][row]  # [H, S, K]
        for head in range(probs.shape[0]):
            x0 = left + head * (size + gap)
            y0 = top + layer * (size + gap + 14)
            body.append(text(x0, y0 - 6, f"layer {layer}, head {head}", 11))
            body.append(f'<rect x="{x0}" y="{y0}" width="{size}" height="{size}" fill="#e4e4e4"/>\n')
            paths = {}
            for q in range(n):
                k = 0
                while k < n:
                    p = float(probs[head, q, k])
                    if p == 0.0:
                        k += 1
                        continue
                    lv = level(p)
                    run = 1
                    while k + run < n and probs[head, q, k + run] != 0 and level(float(probs[head, q, k + run])) == lv:
                        run += 1
                    paths.setdefault(lv, []).append(f"M{k} {q}h{run}v1h-{run}z")
                    k += run
            body.append(f'<g transform="translate({x0} {y0}) scale({cell})" shape-rendering="crispEdges">\n')
            for lv in sorted(paths):
                body.append(f'<path fill="{colours[lv]}" d="{"".join(paths[lv])}"/>\n')
            body.append("</g>\n")
            # the boundary between pads and tokens, on both axes
            xb, yb = x0 + pads * cell, y0 + pads * cell
            body.append(f'<path d="M{xb} {y0}V{y0 + size}M{x0} {yb}H{x0 + size}" stroke="#ffffff" '
                        f'stroke-width="1" stroke-dasharray="2 2"/>\n')
            if head == 0:
                body.append(text(x0 - 8, y0 + cell * 0.8, "0", 10, "end"))
                body.append(text(x0 - 8, yb + cell * 0.8, str(pads), 10, "end"))
                body.append(text(x0 - 8, y0 + size - 2, str(n - 1), 10, "end"))
                body.append(f'<text x="{x0 - 26}" y="{y0 + size / 2:.1f}" font-size="11" text-anchor="middle" '
                            f'transform="rotate(-90 {x0 - 26} {y0 + size / 2:.1f})">query</text>\n')
            if layer == 1:
                yt = y0 + size + 14
                body.append(text(x0 + cell / 2, yt, "0", 10, "middle"))
                body.append(text(xb + cell / 2, yt, str(pads), 10, "middle"))
                body.append(text(x0 + size - cell / 2, yt, str(n - 1), 10, "middle"))
                body.append(text(x0 + size / 2, yt + 14, "key", 11, "middle"))
    # colour bar
    xc, yc, h = left + 4 * (size + gap) + 6, top, 2 * size + gap
    step = h / levels
    for lv in range(levels):
        body.append(f'<rect x="{xc}" y="{yc + h - (lv + 1) * step:.2f}" width="14" height="{step + 0.3:.2f}" '
                    f'fill="{colours[lv]}"/>\n')
    for power in range(int(lo), 1):
        y = yc + h - (power - lo) / -lo * h
        body.append(f'<path d="M{xc + 14} {y:.1f}h4" stroke="#000000"/>\n')
        body.append(text(xc + 21, y + 4, f"1e{power}" if power else "1", 10))
    body.append(f'<rect x="{xc}" y="{yc + h + 12}" width="14" height="10" fill="#e4e4e4"/>\n')
    body.append(text(xc + 21, yc + h + 21, "0", 10))
    width = xc + 60
    height = top + 2 * size + gap + 14 + 40
    return svg(width, height, body)


# --- RoPE frequencies ---------------------------------------------------------------------------------------

ROPE_SERIES = (  # (golden case, label, colour, sequence length for dynamic)
    ("llama_mha", "default (θ 1e4, Dh 16)", "#333333", None),
    ("llama_rope_linear", "linear, factor 3", "#1f77b4", None),
    ("llama_rope_dynamic", "dynamic, factor 2, at L = 66 (mpe 32)", "#9467bd", 66),
    ("llama_rope_yarn", "yarn, factor 4 (Dh 32)", "#2ca02c", None),
    ("llama_rope_longrope", "longrope, long factors", "#d62728", None),
    ("llama_rope_llama3", "llama3, factor 8 (θ 5e5, Dh 32)", "#ff7f0e", None),
)


def rope_figure():
    """inv_freq per pair (left) and its ratio to the unscaled frequencies (right), log scales."""
    series = []
    for case, label, colour, seq_len in ROPE_SERIES:
        cfg = read_config(os.path.join(GOLDEN, "models", case))
        inv_freq, scaling = llama_rope_init(cfg, np.float64, seq_len=seq_len)
        base = default_inv_freq(cfg.rope_theta, cfg.head_dim, np.float64)
        x = np.arange(0, cfg.head_dim, 2) / cfg.head_dim  # 2j / Dh
        series.append((label, colour, x, inv_freq, inv_freq / base))

    pw, ph, left, top, gap = 330, 250, 70, 96, 90
    body = [text(20, 24, "RoPE inverse frequencies of the golden configs (refimpl.rope, as transformers 4.46.3)",
                 15, extra=' font-weight="bold"'),
            text(20, 44, "x: pair index j as a fraction of the head, 2j/Dh. Left: inv_freq_j, the angle pair j turns "
                         "by per position.", 12),
            text(20, 62, "Right: the same divided by the unscaled θ^(−2j/Dh): the scale each rope_scaling type "
                         "applies to each pair.", 12)]

    def panel(x0, ymin, ymax, ticks, values, title, tick_text):
        out = [text(x0 + pw / 2, top - 8, title, 12, "middle", ' font-weight="bold"'),
               f'<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999999"/>\n']
        ly = lambda v: top + ph - (math.log10(v) - ymin) / (ymax - ymin) * ph
        lx = lambda v: x0 + v * pw
        for t in ticks:
            y = ly(t)
            out.append(f'<path d="M{x0} {y:.1f}h{pw}" stroke="#eeeeee"/>\n')
            out.append(text(x0 - 5, y + 4, tick_text(t), 10, "end"))
        for t in (0, 0.25, 0.5, 0.75, 1.0):
            out.append(text(lx(t), top + ph + 14, f"{t:g}", 10, "middle"))
        out.append(text(x0 + pw / 2, top + ph + 30, "2j / Dh", 11, "middle"))
        for label, colour, x, inv, ratio in series:
            v = values(inv, ratio)
            pts = " ".join(f"{lx(a):.1f},{ly(b):.1f}" for a, b in zip(x, v))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.6"/>\n')
            out.extend(f'<circle cx="{lx(a):.1f}" cy="{ly(b):.1f}" r="2.2" fill="{colour}"/>\n' for a, b in zip(x, v))
        return out

    body += panel(left, -7, 0, [10.0 ** p for p in range(-7, 1)], lambda inv, r: inv, "inv_freq_j",
                  lambda t: f"1e{round(math.log10(t))}" if t != 1 else "1")
    body += panel(left + pw + gap, math.log10(0.1), math.log10(1.2), [0.125, 0.25, 0.5, 1.0],
                  lambda inv, r: r, "inv_freq_j / unscaled", lambda t: f"{t:g}")
    y = top + ph + 52
    for i, (label, colour, *_rest) in enumerate(series):
        x = left + (i % 3) * 260
        yy = y + (i // 3) * 18
        body.append(f'<path d="M{x} {yy - 4}h22" stroke="{colour}" stroke-width="2"/>\n')
        body.append(text(x + 28, yy, label, 11))
    return svg(left + 2 * pw + gap + 20, y + 40, body)


# --- decoder block diagrams ---------------------------------------------------------------------------------

COLOURS = {"embed": "#e8def8", "norm": "#fff1c2", "attn": "#d6e8fa", "mlp": "#dcf0d5", "pos": "#f9dada",
           "head": "#e8def8"}
BOX_W, LINE, FRAME_RIGHT = 330, 13, 56  # box width, text line height, frame margin right


def traced(case, ids):
    model = load(os.path.join(GOLDEN, "models", case))
    trace = Trace()
    model(input_ids=ids, trace=trace)
    return model.config.family, trace


def shape_line(family, trace, name, concrete=True):
    """'layers.{i}.attn.q  B H S Dh = 1×4×8×16' for a trace name of layer 0 (or a top-level name)."""
    if name not in trace:
        raise KeyError(f"trace point {name!r} is not recorded any more: update docs/make_figures.py")
    generic, _ = generic_name(name)
    letters = next(row[1] for row in TABLES[family] if row[0] == generic)
    if not concrete:
        return f"{generic}   {letters}"
    return f"{generic}   {letters} = {'×'.join(str(d) for d in trace[name].shape)}"


def block_column(family, trace, items, x0, y0, layers):
    """Draw one column of items (top to bottom). Returns (svg parts, bottom y).

    items: ("box", title, [trace names], colour key) | ("add", trace name) | ("branch",) | ("start",) | ("end",).
    A "branch" starts a residual bypass that rejoins at the next "add".
    """
    out, cx, y = [], x0 + BOX_W / 2, y0
    branch_y, frame_top = None, None
    for number, item in enumerate(items):
        kind = item[0]
        if kind == "start":
            frame_top = y
            y += 22
            continue
        if kind == "end":
            out.append(f'<rect x="{x0 - 44}" y="{frame_top}" width="{BOX_W + FRAME_RIGHT + 44}" '
                       f'height="{y - frame_top + 8}" rx="8" fill="none" stroke="#888888" stroke-dasharray="5 4"/>\n')
            out.append(text(x0 + BOX_W + FRAME_RIGHT - 8, frame_top + 15, f"× L ({layers} here)", 11, "end",
                            ' fill="#555555"'))
            y += 26
            continue
        if kind == "branch":
            branch_y = y - 7
            out.append(f'<circle cx="{cx}" cy="{branch_y}" r="2.5" fill="#333333"/>\n')
            continue
        if kind == "add":
            r = 10
            out.append(f'<circle cx="{cx}" cy="{y + r}" r="{r}" fill="#ffffff" stroke="#333333"/>\n')
            out.append(f'<path d="M{cx - 5} {y + r}h10M{cx} {y + r - 5}v10" stroke="#333333" stroke-width="1.5"/>\n')
            out.append(text(cx + 16, y + r + 4, shape_line(family, trace, item[1], concrete=False), 10,
                            extra=f" {MONO}"))
            bx = x0 - 24  # the residual bypass runs down the left side and enters the circle from the left
            out.append(f'<path d="M{cx} {branch_y}H{bx}V{y + r}H{cx - r - 1}" fill="none" stroke="#333333" '
                       f'marker-end="url(#arrow)"/>\n')
            y += 2 * r + 14
            out.append(arrow(cx, y - 14, y))
            continue
        _, title, names, colour = item
        h = 10 + LINE * (1 + len(names))
        out.append(f'<rect x="{x0}" y="{y}" width="{BOX_W}" height="{h}" rx="4" fill="{COLOURS[colour]}" '
                   f'stroke="#666666"/>\n')
        out.append(text(x0 + 8, y + 16, title, 12, extra=' font-weight="bold"'))
        for i, name in enumerate(names):
            out.append(text(x0 + 8, y + 16 + LINE * (i + 1), shape_line(family, trace, name), 10, extra=f" {MONO}"))
        y += h + 14
        if number < len(items) - 1:
            out.append(arrow(cx, y - 14, y))
    return out, y - 14


def arrow(x, y1, y2):
    return f'<path d="M{x} {y1}V{y2 - 1}" stroke="#333333" marker-end="url(#arrow)"/>\n'


ARROW_DEF = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto"><path d="M0 0L10 5L0 10z" fill="#333333"/></marker></defs>\n')
IDS = [[15, 120, 94, 21, 172, 108, 28, 6]]


def llama_items(open_llama):
    embed = [("box", "embed_tokens[input_ids]", ["embed_tokens"], "embed")]
    if open_llama:
        embed.append(("box", "embed_layer_norm: LayerNorm, ε 1e-5", ["embed"], "norm"))
    scores = "softmax(max(q kᵀ / √Dh + mask, min))" if open_llama else "softmax(q kᵀ / √Dh + mask)"
    head = ("h · embed_tokensᵀ (shared embedding)" if open_llama else "lm_head (or embed_tokens if tied)")
    return embed + [
        ("start",),
        ("branch",),
        ("box", "input_layernorm: RMSNorm", ["layers.0.input_norm"], "norm"),
        ("box", "q_proj, k_proj, v_proj", ["layers.0.attn.q", "layers.0.attn.k"], "attn"),
        ("box", "RoPE on q and k (rotate_half)", ["layers.0.attn.q_rope", "layers.0.attn.k_rope"], "pos"),
        ("box", "repeat_kv: each kv head H/Hkv times (GQA)", ["layers.0.attn.k_repeat"], "attn"),
        ("box", scores, ["layers.0.attn.probs"], "attn"),
        ("box", "probs · v, heads merged; o_proj", ["layers.0.attn.context", "layers.0.attn.out"], "attn"),
        ("add", "layers.0.attn_residual"),
        ("branch",),
        ("box", "post_attention_layernorm: RMSNorm", ["layers.0.post_attn_norm"], "norm"),
        ("box", "gate_proj, up_proj", ["layers.0.mlp.gate", "layers.0.mlp.up"], "mlp"),
        ("box", "act(gate) ⊙ up   (act: hidden_act, silu)", ["layers.0.mlp.act"], "mlp"),
        ("box", "down_proj", ["layers.0.mlp.down"], "mlp"),
        ("add", "layers.0.out"),
        ("end",),
        ("box", "norm: RMSNorm", ["final_norm"], "norm"),
        ("box", head, ["logits"], "head"),
    ]


def opt_items(pre):
    embed = [("box", "embed_tokens[input_ids]", ["embed"], "embed")]
    if not pre:
        embed.append(("box", "project_in (E → D)", ["project_in"], "embed"))
    embed.append(("box", "+ embed_positions[position_ids + 2]", ["position_ids", "pos_embed"], "pos"))
    ln1 = [("box", "self_attn_layer_norm: LayerNorm", ["layers.0.attn_in"], "norm")] if pre else []
    ln1_post = [] if pre else [("box", "self_attn_layer_norm, after the add",
                                ["layers.0.self_attn_layer_norm"], "norm")]
    ln2 = [("box", "final_layer_norm (the layer's): LayerNorm", ["layers.0.ffn_in"], "norm")] if pre else []
    ln2_post = [] if pre else [("box", "final_layer_norm (the layer's), after the add",
                                ["layers.0.final_layer_norm"], "norm")]
    tail = ([("box", "final_layer_norm (the decoder's)", ["final_layer_norm"], "norm")] if pre else
            [("box", "project_out (D → E); no final LayerNorm", ["project_out"], "embed")])
    return embed + [
        ("start",),
        ("branch",),
        *ln1,
        ("box", "q_proj then × Dh^−½; k_proj, v_proj", ["layers.0.attn.q", "layers.0.attn.k"], "attn"),
        ("box", "softmax(max(q kᵀ + mask, min))", ["layers.0.attn.probs"], "attn"),
        ("box", "probs · v, heads merged; out_proj", ["layers.0.attn.out"], "attn"),
        ("add", "layers.0.attn_residual"),
        *ln1_post,
        ("branch",),
        *ln2,
        ("box", "fc1, activation_function (relu)", ["layers.0.fc1", "layers.0.act"], "mlp"),
        ("box", "fc2", ["layers.0.fc2"], "mlp"),
        ("add", "layers.0.out"),
        *ln2_post,
        ("end",),
        *tail,
        ("box", "lm_head (tied to embed_tokens)", ["logits"], "head"),
    ]


def block_figure(columns, title, subtitle):
    """columns: [(heading, golden case, items)] side by side; subtitle: lines under the title."""
    body = [ARROW_DEF, text(20, 24, title, 15, extra=' font-weight="bold"')]
    body += [text(20, 44 + 17 * i, line, 12) for i, line in enumerate(subtitle)]
    top = 44 + 17 * len(subtitle) + 16
    bottom, x = 0, 74
    for heading, case, items in columns:
        family, trace = traced(case, IDS)
        layers = read_config(os.path.join(GOLDEN, "models", case)).num_hidden_layers
        body.append(text(x + BOX_W / 2, top, heading, 13, "middle", ' font-weight="bold"'))
        body.append(text(x + BOX_W / 2, top + 16, f"shapes: golden/models/{case} on 8 ids", 10, "middle",
                         ' fill="#555555"'))
        parts, y = block_column(family, trace, items, x, top + 30, layers)
        body += parts
        bottom = max(bottom, y)
        x += BOX_W + FRAME_RIGHT + 110
    return svg(x - 90, bottom + 20, body)


# --- the trained model: heads, logit lens, residual magnitudes ----------------------------------------------

TRAINED = os.path.join(GOLDEN, "models", "llama_trained")
HELDOUT = os.path.join(GOLDEN, "trained", "heldout.txt")
MEASURED = 40  # head statistics: averaged over the first MEASURED held-out docstrings
SHOWN = 232  # held-out docstring drawn (0-based; the figures say line 233): short, "a is the" twice


def trained_forward(model, ids):
    trace = Trace()
    model(input_ids=[ids], trace=trace)
    return trace


def head_statistics(model, tok, lines):
    """[L, H] mean attention of query q >= 1 to: key q-1 (previous), key 0 (BOS, the sink), and the keys right
    after earlier occurrences of token q (induction; over the queries that have one, key 1.. only, key q-1
    excluded), and what uniform attention over keys 0..q would give to the last one and to any single key."""
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    prev, sink, ind = np.zeros((L, H)), np.zeros((L, H)), np.zeros((L, H))
    n_q, n_ind, uniform, uniform_one = 0, 0, 0.0, 0.0
    for line in lines:
        ids = tok.encode(line)[:model.config.max_position_embeddings]
        S = len(ids)
        a = np.asarray(ids)
        # target[q, k]: key k follows an earlier copy of token q (k - 1 >= 1, k < q)
        target = (a[None, :-1] == a[:, None]) & (np.arange(S - 1)[None, :] >= 1)
        target = np.concatenate([np.zeros((S, 1), bool), target], 1) & (np.arange(S)[None, :] < np.arange(S)[:, None])
        has = target.any(1)
        trace = trained_forward(model, ids)
        for layer in range(L):
            p = trace[f"layers.{layer}.attn.probs"][0].astype(np.float64)  # [H, S, S]
            prev[layer] += p[:, np.arange(1, S), np.arange(S - 1)].sum(1)
            sink[layer] += p[:, 1:, 0].sum(1)
            ind[layer] += (p * target[None]).sum(2)[:, has].sum(1)
        n_q += S - 1
        uniform_one += float((1 / (np.arange(1, S) + 1)).sum())
        n_ind += int(has.sum())
        uniform += float((target.sum(1) / (np.arange(S) + 1))[has].sum())
    return prev / n_q, sink / n_q, ind / n_ind, uniform / n_ind, uniform_one / n_q


def piece(token):
    return token.replace("▁", "·")


def trained_data():
    model = load(TRAINED)
    tok = load_tokenizer(TRAINED)
    with open(HELDOUT, encoding="utf-8") as f:
        lines = f.read().splitlines()
    stats = head_statistics(model, tok, lines[:MEASURED])
    line = lines[SHOWN]
    ids = tok.encode(line)
    tokens = ["<s>"] + [piece(t) for t in tok.tokenize(line)]
    assert len(tokens) == len(ids)
    return model, tok, stats, line, ids, tokens, trained_forward(model, ids)


def heatmap(probs, x0, y0, cell, colours, level):
    """One attention map [S, S] as paths of unit squares, one path per colour level; masked cells left as is."""
    n = probs.shape[0]
    paths = {}
    for q in range(n):
        for k in range(q + 1):
            paths.setdefault(level(float(probs[q, k])), []).append(f"M{k} {q}h1v1h-1z")
    out = [f'<g transform="translate({x0} {y0}) scale({cell})" shape-rendering="crispEdges">\n']
    out += [f'<path fill="{colours[lv]}" d="{"".join(paths[lv])}"/>\n' for lv in sorted(paths)]
    return out + ["</g>\n"]


def trained_heads_figure(data):
    model, tok, (prev, sink, ind, uniform, uniform_one), line, ids, tokens, trace = data
    picks = [("previous token", prev), ("first token (sink)", sink), ("induction", ind)]
    S, cell, levels = len(ids), 11, 10
    colours = palette(levels)
    level = lambda p: min(levels - 1, int(p * levels))  # linear: 0.1 per colour
    size = S * cell
    left, top, gap = 96, 84, 40
    body = [text(20, 24, "Three heads of golden/models/llama_trained, on a held-out docstring", 15,
                 extra=' font-weight="bold"'),
            text(20, 44, f"Heads picked by their mean attention over the first {MEASURED} held-out docstrings; "
                         f"the maps: held-out line {SHOWN + 1}, {S} tokens (<s> first).", 12),
            text(20, 62, f"Uniform attention would give {uniform_one:.3f} to the previous token or to <s>, and "
                         f"{uniform:.3f} to the tokens after earlier copies: induction is weak in this model.", 12)]
    for i, (kind, score) in enumerate(picks):
        layer, head = np.unravel_index(int(np.argmax(score)), score.shape)
        x0 = left + i * (size + gap)
        body.append(text(x0, top - 6, f"{kind}: head {layer}.{head}, mean {score[layer, head]:.3f}", 11))
        body.append(f'<rect x="{x0}" y="{top}" width="{size}" height="{size}" fill="#e4e4e4"/>\n')
        body += heatmap(trace[f"layers.{layer}.attn.probs"][0, head], x0, top, cell, colours, level)
        for k, t in enumerate(tokens):
            xk = x0 + k * cell + cell * 0.7
            body.append(f'<text x="{xk:.1f}" y="{top + size + 4}" font-size="8" text-anchor="end" {MONO} '
                        f'transform="rotate(-90 {xk:.1f} {top + size + 4})">{esc(t)}</text>\n')
            if i == 0:
                body.append(text(x0 - 4, top + k * cell + cell * 0.8, t, 8, "end", f" {MONO}"))
    xc, h = left + 3 * (size + gap) - gap + 16, size
    for lv in range(levels):
        body.append(f'<rect x="{xc}" y="{top + h - (lv + 1) * h / levels:.2f}" width="14" '
                    f'height="{h / levels + 0.3:.2f}" fill="{colours[lv]}"/>\n')
    for v in (0, 0.5, 1):
        body.append(text(xc + 20, top + h - v * h + 4, f"{v:g}", 10))
    body.append(text(left, top + size + 70, "rows: query, columns: key; grey: masked (future keys)", 11))
    return svg(xc + 50, top + size + 84, body)


def lens(model, h):
    """Final RMSNorm + lm_head applied to a residual-stream state [S, D] -> probabilities [S, V]."""
    x = rms_norm(h[None], model.params["norm"], model.config.rms_norm_eps)
    return softmax(lm_logits(model.params, model.config, x)[0].astype(np.float64))


def residual_states(trace, layers):
    return [("embedding", trace["embed"][0])] + [(f"after layer {i}", trace[f"layers.{i}.out"][0])
                                                for i in range(layers)]


def logit_lens_figure(data):
    model, tok, _, line, ids, tokens, trace = data
    states = residual_states(trace, model.config.num_hidden_layers)
    probs = [lens(model, h) for _, h in states]
    final = probs[-1].argmax(-1)
    logits = trace["logits"][0]
    assert np.array_equal(final, logits.argmax(-1)), "the lens of the last layer must be the model's prediction"
    S, cw, ch, levels = len(ids), 46, 22, 10
    colours = palette(levels)
    left, top = 96, 96
    agree = [int((p.argmax(-1) == final).sum()) for p in probs]
    body = [text(20, 24, "Logit lens of golden/models/llama_trained on held-out line "
                         f"{SHOWN + 1}: final norm + lm_head on each residual state", 15, extra=' font-weight="bold"'),
            text(20, 44, "Cell: the top-1 next-token prediction at that position; colour: the probability that "
                         "state gives to the model's final prediction.", 12),
            text(20, 62, "Top-1 equal to the final prediction, of " + str(S) + " positions: " +
                 ", ".join(f"{name} {n}" for (name, _), n in zip(states, agree)) + ".", 12)]
    for r, ((name, _), p) in enumerate(zip(states, probs)):
        y = top + r * ch
        body.append(text(left - 6, y + ch * 0.68, name, 11, "end"))
        top1 = p.argmax(-1)
        for q in range(S):
            f = float(p[q, final[q]])
            lv = min(levels - 1, int(f * levels))
            body.append(f'<rect x="{left + q * cw}" y="{y}" width="{cw}" height="{ch}" fill="{colours[lv]}" '
                        f'stroke="#ffffff"/>\n')
            body.append(text(left + q * cw + cw / 2, y + ch * 0.68, piece(tok.sp.IdToPiece(int(top1[q])))[:7], 9,
                             "middle", f' {MONO} fill="{"#000000" if lv >= 6 else "#ffffff"}"'))
    y = top + len(states) * ch
    for q, t in enumerate(tokens):
        xq = left + q * cw + cw / 2 + 3
        body.append(f'<text x="{xq:.1f}" y="{y + 6}" font-size="9" text-anchor="end" {MONO} '
                    f'transform="rotate(-90 {xq:.1f} {y + 6})">{esc(t)}</text>\n')
    body.append(text(left - 6, y + 14, "input", 11, "end"))
    xc = left + S * cw + 16
    h = len(states) * ch
    for lv in range(levels):
        body.append(f'<rect x="{xc}" y="{top + h - (lv + 1) * h / levels:.2f}" width="14" '
                    f'height="{h / levels + 0.3:.2f}" fill="{colours[lv]}"/>\n')
    for v in (0, 0.5, 1):
        body.append(text(xc + 20, top + h - v * h + 4, f"{v:g}", 10))
    return svg(xc + 50, y + 70, body)


def residual_figure(data):
    model, tok, _, line, ids, tokens, trace = data
    states = residual_states(trace, model.config.num_hidden_layers)
    mags = [np.abs(h).max(0) for _, h in states]  # [D] per state
    D = mags[0].shape[0]
    top_value = max(float(m.max()) for m in mags)
    pw, ph, left, top, gap = 3 * D, 70, 110, 100, 18
    ymax = math.ceil(top_value)
    body = [text(20, 24, f"Max |value| per hidden dimension of the residual stream, llama_trained on held-out line "
                         f"{SHOWN + 1}", 15, extra=' font-weight="bold"'),
            text(20, 44, f"Each bar: one of the {D} dimensions, max over the {len(ids)} positions. Largest anywhere: "
                         f"{top_value:.2f} (fp16 max 65504, {65504 / top_value:.0f}× larger).", 12),
            text(20, 62, "Medians per row: " + ", ".join(f"{name} {np.median(m):.2f}" for (name, _), m in
                                                          zip(states, mags)) + ".", 12)]
    for r, ((name, _), m) in enumerate(zip(states, mags)):
        y0 = top + r * (ph + gap)
        body.append(f'<rect x="{left}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999999"/>\n')
        body.append(text(left - 8, y0 + ph / 2 + 4, name, 11, "end"))
        body.append(text(left + pw + 6, y0 + 4, f"{ymax}", 10))
        body.append(text(left + pw + 6, y0 + ph + 4, "0", 10))
        d = "".join(f"M{left + 3 * i + 1.5} {y0 + ph}V{y0 + ph - float(v) / ymax * ph:.1f}" for i, v in enumerate(m))
        body.append(f'<path d="{d}" stroke="#3e4a89" stroke-width="2.2"/>\n')
        i = int(np.argmax(m))
        body.append(text(left + 3 * i + 1.5, y0 + ph - float(m[i]) / ymax * ph - 3, f"dim {i}: {m[i]:.2f}", 9,
                         "middle"))
    y = top + len(states) * (ph + gap)
    for t in (0, D // 2, D - 1):
        body.append(text(left + 3 * t + 1.5, y, str(t), 10, "middle"))
    body.append(text(left + pw / 2, y + 16, "hidden dimension", 11, "middle"))
    return svg(880, y + 30, body)


def figures():
    trained = trained_data()
    return {
        "trained_heads.svg": trained_heads_figure(trained),
        "trained_logit_lens.svg": logit_lens_figure(trained),
        "trained_residual_max.svg": residual_figure(trained),
        "attention_llama_mha.svg": attention_figure(),
        "rope_frequencies.svg": rope_figure(),
        "block_llama.svg": block_figure(
            [("Llama 2 (pre-norm)", "llama_mha", llama_items(False))], "The Llama decoder block",
            ["Each box: the op, then the trace point holding its output", "(refimpl.trace) with its shape.",
             "B batch, S tokens, K keys, D hidden, H heads, Hkv kv heads,", "Dh head dim, F MLP width, V vocab."]),
        "block_open_llama.svg": block_figure(
            [("Open-Llama (pre-norm)", "openllama_default", llama_items(True))], "The Open-Llama decoder block",
            ["As Llama, plus a LayerNorm after the embedding,",
             "a clamp after the mask, and the embedding as output."]),
        "block_opt.svg": block_figure(
            [("OPT pre-LN (125m, 1.3b, ...)", "opt_preln", opt_items(True)),
             ("OPT post-LN (350m)", "opt_350m_like", opt_items(False))], "The OPT decoder block",
            ["Learned positions from the mask; LayerNorm with bias; q scaled before the product.",
             "E = word_embed_proj_dim (350m: project_in and project_out around the decoder)."]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"), help="folder to write the SVGs to")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, content in figures().items():
        with open(os.path.join(args.out, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(content)
        print(f"wrote {os.path.join(args.out, name)} ({len(content.encode())} bytes)")


if __name__ == "__main__":
    main()
