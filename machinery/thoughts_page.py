"""One self-contained HTML page of what Quiet-STaR's thoughts did to a text, plus training curves. Standard
library only, no external resources: inline CSS, a little inline JS, SVG charts computed here in Python."""
import argparse
import html
import json
import math
import os
from pathlib import Path

import torch

from data import arithmetic_texts, filler_token_id, read_texts
from generate import token_scores
from machinery.cli import UsageError, check_writable
from machinery.hf_io import load_model
from qstar import QuietStar

CLIP = 1.0  # |delta NLL| (nats) at which a token's colour reaches full intensity
PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"]
GROUPS = [("Training losses", ["loss", "nll_base", "nll_mixed", "nll_talk", "reinforce"]),  # (title, keys)
          ("Reward and mixing weight", ["reward_mean", "mix_weight_mean"]),
          ("Held-out NLL: no thought, sampled, filler, shuffled",  # also picks up any other "eval_*nll*" key
           ["eval_nll_none", "eval_nll_sampled", "eval_nll_filler", "eval_nll_shuffled"]),
          ("Thoughts before a bare answer that write it (fraction)",
           ["thought_accuracy_sampled", "thought_accuracy_shuffled"]),
          ("Content reward: sampled minus shuffled thought (nats)", ["content_reward_post", "content_reward_mixed"])]
# Metric keys of runs written before the rename to one word per meaning: "mixed" for the blended prediction, "post"
# for the post-thought prediction alone. Old runs' metrics.jsonl still draw.
RENAMED_METRICS = {"nll_thought": "nll_mixed", "nll_unmixed": "nll_post", "reward_gap_thought": "reward_gap_post",
                   "content_reward_thought": "content_reward_post"}
DASHES = {"_none": "5 3", "_filler": "2 2", "_shuffled": "8 3 2 3", "_base": "5 3"}  # by name suffix; else solid
CSS = """
body{font-family:system-ui,"Segoe UI","DejaVu Sans",sans-serif;margin:24px auto;max-width:1100px;
 padding:0 20px;color:#1f2937} h1{margin:0 0 8px;font-size:26px} figure{margin:0} figcaption{font-size:13px}
h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd} .legend{line-height:1.5;max-width:900px}
#text{white-space:pre-wrap;font-size:17px;line-height:1.9;border:1px solid #ddd;border-radius:8px;padding:1em}
.tok{border-radius:3px;cursor:pointer;box-shadow:inset -1px 0 0 rgba(0,0,0,.1)} .scale span{padding:0 7px}
.tok:hover,.tok.pinned{outline:2px solid} .th{display:none;color:#6b7280;font-size:12px;font-style:italic}
body.show-thoughts .th{display:inline} #info b{color:#9ca3af} .charts{display:flex;flex-wrap:wrap;gap:18px}
#info{position:fixed;right:18px;bottom:18px;width:330px;background:#111827;color:#f9fafb;border-radius:8px;
 padding:10px 14px;font-size:14px;line-height:1.5;white-space:pre-wrap} table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;font-size:14px} td.n{text-align:right}
code{background:#f3f4f6;padding:0 4px;white-space:pre}
figcaption i{display:inline-block;width:18px;margin:0 4px 3px 10px;border-top:3px solid;vertical-align:middle}
"""
JS = """
const put = (id, v) => { document.getElementById(id).textContent = v || '-'; };  // text only, never markup
function show(t) { put('i-tok', JSON.stringify(t.textContent)); put('i-thought', t.dataset.thought);
                   put('i-mix', t.dataset.mix); put('i-delta', t.dataset.delta);
                   put('i-filler', t.dataset.filler); }
let pinned = null; const text = document.getElementById('text');
text.addEventListener('mouseover', e => { const t = e.target.closest('.tok'); if (t && !pinned) show(t); });
text.addEventListener('click', e => {  // a click pins a token's info; a second click unpins it
  const t = e.target.closest('.tok'); if (!t) return; if (pinned) pinned.classList.remove('pinned');
  pinned = pinned === t ? null : t; if (pinned) { pinned.classList.add('pinned'); show(pinned); }
});
const all = document.getElementById('showall');
all.onchange = () => document.body.classList.toggle('show-thoughts', all.checked);
"""


def _esc(s, one_line=False):  # one_line: newlines and tabs as visible symbols
    s = str(s).replace("\n", "\u21b5").replace("\t", "\u21e5") if one_line else str(s)
    return html.escape(s, quote=True)


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v):  # data attributes and table cells; "" for a missing value
    return f"{v:.4f}" if _finite(v) else ""


def _bg(delta):  # green: the thought helped (delta < 0), red: it hurt; sqrt intensity clipped at CLIP nats
    if not _finite(delta) or delta == 0:
        return ""
    a = 0.8 * math.sqrt(min(abs(delta) / CLIP, 1.0))
    return f' style="background:rgba({"34,170,80" if delta < 0 else "220,50,40"},{a:.2f})"'


def _text_section(tokens):
    parts = []
    for t in tokens:
        if t.get("thought"):  # displayed only while "show all thoughts" is ticked
            parts.append(f'<span class="th">[{_esc(t["thought"], True)}]</span>')
        parts.append(f'<span class="tok" data-thought="{_esc(t.get("thought") or "")}" '
                     f'data-mix="{_fmt(t.get("mix_weight"))}" data-delta="{_fmt(t.get("delta_nll"))}" '
                     f'data-filler="{_fmt(t.get("delta_nll_filler"))}"'
                     f'{_bg(t.get("delta_nll"))}>{_esc(t["text"])}</span>')
    return f'<div id="text">{"".join(parts)}</div>'


def _top_table(tokens, k=10):
    """The k tokens whose thoughts helped most (most negative delta), with those thoughts."""
    best = sorted((t["delta_nll"], i) for i, t in enumerate(tokens)
                  if _finite(t.get("delta_nll")) and t["delta_nll"] < 0)[:k]
    if not best:
        return "<p>No token was helped by its thought.</p>"
    rows = "".join(f'<tr><td class="n">{r}</td><td class="n">{i}</td>'
                   f'<td><code>{_esc(tokens[i]["text"], True)}</code></td><td class="n">{d:.4f}</td>'
                   f'<td class="n">{_fmt(tokens[i].get("delta_nll_filler"))}</td>'
                   f'<td class="n">{_fmt(tokens[i].get("mix_weight"))}</td>'
                   f'<td>{_esc(tokens[i].get("thought") or "", True)}</td></tr>'
                   for r, (d, i) in enumerate(best, 1))
    return ('<table id="top"><tr><th>#</th><th>pos</th><th>token</th><th>&Delta;NLL</th><th>&Delta;NLL filler</th>'
            f'<th>mix</th><th>thought before it</th></tr>{rows}</table>')


def _axis(lo, hi, n=4, mults=(1, 2, 2.5, 5, 10)):
    """A padded, non-empty range around [lo, hi] and about n 'nice' ticks (mults times a power of ten)."""
    pad = (hi - lo) * 0.05 if hi - lo > 1e-12 else max(abs(lo) * 0.1, 0.5)
    lo, hi = lo - pad, hi + pad
    mag = 10 ** math.floor(math.log10((hi - lo) / n))
    step = next(m * mag for m in mults if m * mag >= (hi - lo) / n)
    first = math.ceil(lo / step) * step
    return lo, hi, [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _chart(title, series, w=520, h=250, left=56, right=14, top=30, bottom=40):
    """SVG line chart of {name: [(step, value), ...]}; "*_base" lines dashed, coloured as "*_thought"."""
    xs, ys = zip(*[p for pts in series.values() for p in pts], strict=True)
    (x0, x1, xticks), (y0, y1, yticks) = _axis(min(xs), max(xs), 5, (1, 2, 5, 10)), _axis(min(ys), max(ys))
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    out = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-size="11" fill="#374151">',
           f'<text x="{left}" y="18" font-size="14" font-weight="600">{_esc(title)}</text>']
    for t in yticks:
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>')
    for t in xticks:
        out.append(f'<path d="M{px(t):.1f},{h - bottom}v4" stroke="#6b7280"/>'
                   f'<text x="{px(t):.1f}" y="{h - bottom + 16}" text-anchor="middle">{t:.6g}</text>')
    out.append(f'<path d="M{left},{top}V{h - bottom}H{w - right}" fill="none" stroke="#6b7280"/>'
               f'<text x="{(left + w - right) / 2}" y="{h - 6}" text-anchor="middle">step</text>')
    family = lambda n: n.rsplit("_", 1)[0] if n.endswith(tuple(DASHES) + ("_thought", "_sampled")) else n  # noqa: E731
    families = list(dict.fromkeys(family(n) for n in series))
    keys = []
    for name, pts in series.items():
        color = PALETTE[families.index(family(name)) % len(PALETTE)]
        pattern = next((d for suffix, d in DASHES.items() if name.endswith(suffix)), None)
        dashed = pattern is not None
        dash = f' stroke-dasharray="{pattern}"' if dashed else ""
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline data-series="{_esc(name)}" points="{coords}" fill="none" stroke="{color}" '
                   f'stroke-width="1.8"{dash}><title>{_esc(name)}</title></polyline>')
        if len(pts) <= 40:  # sparse series (e.g. eval rows) also get point markers
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts)
        keys.append(f'<i style="color:{color};border-top-style:{"dashed" if dashed else "solid"}"></i>'
                    f'{_esc(name)}')
    return f'<figure>{"".join(out)}</svg><figcaption>{"".join(keys)}</figcaption></figure>'


def _content(row):
    """The content measures of an eval row (lists in metrics.jsonl) as plain numbers, for the charts."""
    out = {RENAMED_METRICS.get(k, k): v for k, v in row.items()}
    accuracy, reward = row.get("eval_thought_accuracy"), row.get("eval_content_reward")
    if isinstance(accuracy, list) and len(accuracy) >= 2:
        out["thought_accuracy_sampled"], out["thought_accuracy_shuffled"] = accuracy[0], accuracy[1]
    if isinstance(reward, dict):
        out |= {RENAMED_METRICS.get(f"content_reward_{k}", f"content_reward_{k}"): v[0]
                for k, v in reward.items() if isinstance(v, list) and v}
    return out


def _curves_section(metrics):
    rows = [_content(r) for r in (metrics or []) if isinstance(r, dict) and _finite(r.get("step"))]
    extra = sorted({k for r in rows for k in r if k.startswith("eval_") and "nll" in k} - set(GROUPS[2][1]))
    charts = []
    for title, keys in GROUPS[:2] + [(GROUPS[2][0], GROUPS[2][1] + extra)] + GROUPS[3:]:
        series = {k: pts for k in keys if (pts := [(r["step"], r[k]) for r in rows if _finite(r.get(k))])}
        charts += [_chart(title, series)] if series else []
    return (f'<div class="charts">{"".join(charts)}</div>' if charts
            else "<p>No training metrics were given.</p>")


def render_page(tokens, metrics=None, title="Quiet-STaR thoughts"):
    """The whole page as one HTML string."""
    ds = [t["delta_nll"] for t in tokens if _finite(t.get("delta_nll"))]
    fs = [t["delta_nll_filler"] for t in tokens if _finite(t.get("delta_nll_filler"))]
    summary = (f"{len(tokens)} tokens; mean &Delta;NLL {sum(ds) / len(ds):+.4f} nats; the thought helped "
               f"{sum(d < 0 for d in ds)} of {len(ds)} predicted tokens." if ds else "")
    summary += f" A filler thought: mean &Delta;NLL {sum(fs) / len(fs):+.4f} nats." if fs else ""
    scale = "".join(f"<span{_bg(d)}>{d:+g}</span>" for d in (-1, -0.5, -0.1, 0.1, 0.5, 1))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{CSS}</style></head>
<body><h1>{_esc(title)}</h1>
<p class="legend">Before every token the model sampled a short hidden thought, then predicted the token by
mixing its post-thought prediction with the plain one through a learned mixing weight. Each token is coloured
by &Delta;NLL = NLL with the thought &minus; NLL without it: <b>green</b> means the thought helped, <b>red</b>
that it hurt, full colour at &plusmn;{CLIP:g} nat (<span class="scale">{scale}</span>). Hover over or click a
token to see its thought, mixing weight and &Delta;NLL in the box at the bottom right, next to the &Delta;NLL of a
<i>filler</i> thought of the same length ("." repeated): where the two are alike, the thought's content did not
matter, only its presence. {summary}</p>
<label><input type="checkbox" id="showall"> show all thoughts (dimmed, in brackets, before each token)</label>
<h2>Text</h2>{_text_section(tokens)}
<div id="info"><b>token</b> <span id="i-tok">hover or click a token</span>
<b>thought</b> <span id="i-thought"></span>
<b>mixing weight</b> <span id="i-mix"></span>   <b>&Delta;NLL (nats)</b> <span id="i-delta"></span>
<b>&Delta;NLL with a filler thought</b> <span id="i-filler"></span></div>
<h2>Where the thoughts helped most</h2>{_top_table(tokens)}
<h2>Training curves</h2>{_curves_section(metrics)}
<script>{JS}</script></body></html>
"""


def write_thoughts_page(path, tokens, metrics=None, title="Quiet-STaR thoughts") -> Path:
    """Write the page to `path` atomically (a temp file in the same folder, then os.replace); return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(render_page(tokens, metrics, title))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # never leave a half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---- the records of one text, and eval.py --task thoughts ------------------------------------------------------

@torch.no_grad()
def thought_records(qs: QuietStar, tokenizer, tokens: torch.Tensor, filler_id: int) -> list[dict]:
    """One text (T,) -> a record per token for thoughts_page: its text, the thought sampled before it (at the
    previous position), the mixing weight, how much the thought changed its NLL (negative = helped), and how
    much a filler thought of the same length changed it: where the two differ, the content mattered."""
    scores = token_scores(qs, tokens[None])
    filler_ids = torch.full_like(scores["thought_ids"], filler_id)
    filler = token_scores(qs, tokens[None], filler_ids)["nll_mixed"][0]
    records = [{"text": tokenizer.decode([tokens[0].item()]), "thought": "", "mix_weight": None,
                "delta_nll": None, "delta_nll_filler": None, "nll_base": None}]
    for i in range(1, len(tokens)):
        base, after = scores["nll_base"][0, i - 1].item(), scores["nll_mixed"][0, i - 1].item()
        records.append({"text": tokenizer.decode([tokens[i].item()]),
                        "thought": tokenizer.decode(scores["thought_ids"][0, i - 1].tolist()),
                        "mix_weight": scores["mix_weight"][0, i - 1].item(), "delta_nll": after - base,
                        "delta_nll_filler": filler[i - 1].item() - base, "nll_base": base})
    return records


def thoughts_page_path(args) -> Path:
    """--out, else thoughts.html inside the model's folder when it is a checkpoint (or a training run), else
    thoughts-<name>.html here: never a folder named like a model, which would shadow the model's name."""
    if args.out:
        return Path(args.out)
    folder = Path(args.model).expanduser()
    if folder.is_dir() and ((folder / "latest").is_file() or (folder / "quietstar.json").is_file()):
        return folder / "thoughts.html"
    return Path(f"thoughts-{Path(args.model).name}.html")


def write_page(args, heldout_seed: int) -> Path:
    """eval.py --task thoughts: the page for the first --seq_len tokens of --data."""
    text = (arithmetic_texts(8, seed=heldout_seed + args.seed, bare_fraction=args.bare_fraction, kinds=args.problems)
            if args.data == "arithmetic" else read_texts(args.data, limit=1))
    out = thoughts_page_path(args)
    check_writable(out, "--out")
    qs, tokenizer = load_model(args)
    torch.manual_seed(args.seed)
    device = qs.model.embed_tokens.weight.device
    tokens = torch.tensor(tokenizer.encode("".join(text)).ids[:args.seq_len], device=device)
    if len(tokens) < 2:
        raise UsageError(f"--data {args.data}: the text has {len(tokens)} token(s); the page needs at least 2")
    metrics = Path(args.model) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    records = thought_records(qs.eval(), tokenizer, tokens, filler_token_id(tokenizer))
    return write_thoughts_page(out, records, rows, title=f"Quiet-STaR thoughts: {args.model}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Render Quiet-STaR thoughts (and training curves) as HTML.")
    ap.add_argument("tokens", help="JSON file: a list of {text, thought, mix_weight, delta_nll, nll_base}")
    ap.add_argument("metrics", nargs="?", help="metrics.jsonl of a training run (optional)")
    ap.add_argument("-o", "--out", default="thoughts.html", help="output HTML file")
    args = ap.parse_args(argv)
    lines = Path(args.metrics).read_text(encoding="utf-8").splitlines() if args.metrics else []
    tokens = json.loads(Path(args.tokens).read_text(encoding="utf-8"))
    print(write_thoughts_page(args.out, tokens, [json.loads(x) for x in lines if x.strip()]))


if __name__ == "__main__":
    main()
