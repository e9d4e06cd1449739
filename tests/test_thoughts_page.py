"""thoughts_page.py: the HTML structure (escaping, one span per token, charts, top-10 table, no external
resources), the atomic write, the CLI, and a real headless-Chromium screenshot of the page."""
import json
import math
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest

from machinery import thoughts_page as tp

NASTY = "<script>alert(1)</script>"
WORDS = ("Quiet thoughts help a small model guess what comes next : when the text says that two plus "
         "three is five , the thought before five can do the sum first").split()


def make_tokens():
    """A first token without a prediction, ordinary words, and nasty tokens (HTML, &, newline)."""
    toks = [{"text": "Once", "thought": "", "mix_weight": None, "delta_nll": None, "nll_base": None}]
    for i, w in enumerate(WORDS):
        toks.append({"text": " " + w, "thought": f" {WORDS[i - 1]} then" if i % 4 else "",
                     "mix_weight": round(0.5 + 0.45 * math.sin(i), 4),
                     "delta_nll": round(0.9 * math.sin(1.7 * i) - 0.15, 4), "nll_base": 2.0 + (i % 5)})
    toks.insert(5, {"text": NASTY, "thought": " x < y && z > 0", "mix_weight": 1.7, "delta_nll": -2.5,
                    "delta_nll_filler": -0.25, "nll_base": 9.0})
    toks.insert(9, {"text": " &", "thought": "a & b", "mix_weight": -0.3, "delta_nll": 0.3, "nll_base": 4.0})
    toks.insert(14, {"text": "\n\n", "thought": "new\nparagraph", "mix_weight": 0.2, "delta_nll": -0.01,
                     "nll_base": 1.0})
    return toks


def make_metrics(n=60, every=10):
    """Training rows every step; eval rows only every `every` steps; one missing value to skip."""
    rows = []
    for s in range(n):
        d = math.exp(-s / 20)
        rows.append({"step": s, "loss": 3 + 2 * d, "nll_base": 3.1 + 1.5 * d, "nll_mixed": 3 + 1.6 * d,
                     "nll_talk": 3.05 + 1.55 * d, "reinforce": -0.2 * d * math.cos(s),
                     "reward_mean": 0.05 * (1 - d), "mix_weight_mean": 0.1 + 0.3 * (1 - d)})
        if s % every == 0:
            rows.append({"step": s, "eval_nll_base": 3.2 + d, "eval_nll_thought": 3.1 + 0.9 * d,
                         "eval_hard_nll_base": 5 + d, "eval_hard_nll_thought": 4.7 + d})
    rows[3]["reward_mean"] = None
    return rows


class PageParser(HTMLParser):
    """Collects token spans (attributes + text), SVG polylines, top-table rows and every attribute."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.toks, self.svgs, self.polylines, self.rows, self.attrs = [], [], [], [], []
        self.cur, self.in_top = None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs += attrs
        if tag == "span" and a.get("class") == "tok":
            self.cur = {"attrs": a, "text": ""}
            self.toks.append(self.cur)
        elif tag == "svg":
            self.svgs.append(a)
        elif tag == "polyline":
            self.polylines.append(a)
        elif tag == "table" and a.get("id") == "top":
            self.in_top = True
        elif tag == "tr" and self.in_top:
            self.rows.append([])
        elif tag == "td" and self.in_top:
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "span":
            self.cur = None
        elif tag == "table":
            self.in_top = False

    def handle_data(self, data):
        if self.cur is not None:
            self.cur["text"] += data
        if self.in_top and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


def parse(path):
    p = PageParser()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


@pytest.fixture
def page(tmp_path):
    return tp.write_thoughts_page(tmp_path / "page.html", make_tokens(), make_metrics(), "Test <run> & co")


def test_one_span_per_token_with_data_attributes(page):
    tokens, p = make_tokens(), parse(page)
    assert len(p.toks) == len(tokens)
    for tok, span in zip(tokens, p.toks, strict=True):
        assert span["text"] == tok["text"]  # exact, including spaces, newlines and HTML characters
        assert span["attrs"]["data-thought"] == tok["thought"]
        for key, attr in (("mix_weight", "data-mix"), ("delta_nll", "data-delta")):
            if tok[key] is None:
                assert span["attrs"][attr] == ""
            else:
                # written with 4 decimals: off by <= 5e-5; another token's value is off by 6e-4 and more
                assert float(span["attrs"][attr]) == pytest.approx(tok[key], abs=1e-4)
    assert "style" not in p.toks[0]["attrs"]  # the first token has no delta: no colour
    assert "34,170,80" in p.toks[5]["attrs"]["style"] and "220,50,40" in p.toks[9]["attrs"]["style"]


def test_everything_is_escaped(page):
    doc = page.read_text(encoding="utf-8")
    assert "<script>alert" not in doc and "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert doc.count("<script") == 1  # only the page's own script
    assert "<run>" not in doc and "Test &lt;run&gt; &amp; co" in doc
    assert " &<" not in doc and "x < y" not in doc


def test_self_contained(page):
    doc, p = page.read_text(encoding="utf-8"), parse(page)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(|<link|<iframe|<img", doc, re.I)
    assert not [(k, v) for k, v in p.attrs if k in ("src", "href", "srcset", "action")]


def test_charts_have_a_polyline_per_metric(page):
    p, metrics = parse(page), make_metrics()
    assert len(p.svgs) == 3
    present = {k for r in metrics for k, v in r.items() if k != "step" and v is not None}
    assert {pl["data-series"] for pl in p.polylines} == present
    for pl in p.polylines:
        name, pts = pl["data-series"], pl["points"].split()
        assert len(pts) == sum(r.get(name) is not None for r in metrics)  # eval lines: eval rows only
        for xy in pts:  # every point inside the chart
            x, y = map(float, xy.split(","))
            assert 0 <= x <= float(p.svgs[0]["width"]) and 0 <= y <= float(p.svgs[0]["height"])


def test_top_table_lists_most_helpful_first(page):
    rows, tokens = [r for r in parse(page).rows if r], make_tokens()  # [] is the header row
    assert len(rows) == 10
    deltas = [float(r[3]) for r in rows]
    assert deltas == sorted(deltas) and deltas[0] == -2.5
    assert rows[0][2] == NASTY and rows[0][4] == "-0.2500" and rows[0][6] == " x < y && z > 0"  # filler column
    best = sorted(t["delta_nll"] for t in tokens if t["delta_nll"] is not None)[:10]
    assert deltas == pytest.approx(best)       # 4-decimal values written with 4 decimals: equal but for parsing


@pytest.mark.parametrize("metrics", [None, [], [{"step": 0}]])
def test_no_metrics(tmp_path, metrics):
    out = tp.write_thoughts_page(tmp_path / "p.html", make_tokens()[:3], metrics)
    doc = out.read_text(encoding="utf-8")
    assert "No training metrics were given." in doc and "<svg" not in doc
    assert len(parse(out).toks) == 3


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_write_is_atomic(tmp_path, monkeypatch, fail_at):
    path = tp.write_thoughts_page(tmp_path / "p.html", make_tokens(), make_metrics(), title="first")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tp.os, fail_at, boom)
    with pytest.raises(OSError, match="disk full"):
        tp.write_thoughts_page(path, make_tokens()[:2], None, title="second")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["p.html"]  # no temp file left behind


def test_cli(tmp_path):
    (tmp_path / "tokens.json").write_text(json.dumps(make_tokens()))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in make_metrics()) + "\n")
    out = tmp_path / "sub" / "out.html"
    tp.main([str(tmp_path / "tokens.json"), str(tmp_path / "metrics.jsonl"), "-o", str(out)])
    p = parse(out)
    assert len(p.toks) == len(make_tokens()) and len(p.svgs) == 3


def png_size_and_pixels(data):
    """(width, height, decompressed scanlines) of a PNG; asserts the signature and the IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    idat, pos = b"", 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def chromium_cmd(tmp_path):
    """The headless Chromium command line (without the final action and URL). Without Chromium the browser tests
    skip, saying why; CI sets QUIETSTAR_REQUIRE_BROWSER=1, which turns that skip into a failure."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        message = ("Chromium not found (neither 'chromium' nor 'chromium-browser' is on PATH): run "
                   ".ci/install_chromium.sh to run the browser tests")
        if os.environ.get("QUIETSTAR_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600"]


def test_browser_screenshot(tmp_path):
    cmd = chromium_cmd(tmp_path)
    page = tp.write_thoughts_page(tmp_path / "page.html", make_tokens(), make_metrics())
    shot = tmp_path / "shot.png"
    res = subprocess.run(cmd + [f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                         timeout=90)
    assert res.returncode == 0 and shot.exists(), f"chromium failed ({res.returncode}):\n{res.stderr[-3000:]}"
    data = shot.read_bytes()
    shutil.copyfile(shot, "/tmp/thoughts_page_shot.png")  # for a human to look at
    width, height, pixels = png_size_and_pixels(data)
    assert (width, height) == (1200, 1600)
    # A blank (one-colour) image decompresses to a handful of distinct byte values whatever the row
    # filters; a rendered page with coloured tokens, anti-aliased text and charts has very many.
    assert len(set(pixels)) > 64, "the screenshot looks blank"


def test_browser_info_box_and_checkbox(tmp_path):
    """The page's JS runs: hovering a token fills the info box (as text); the checkbox shows thoughts."""
    cmd = chromium_cmd(tmp_path)
    page = tp.write_thoughts_page(tmp_path / "page.html", make_tokens(), make_metrics())
    driver = ("<script>const t = document.querySelectorAll('.tok')[5];"
              "t.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));"
              "document.getElementById('showall').click();</script></body>")
    page.write_text(page.read_text(encoding="utf-8").replace("</body>", driver), encoding="utf-8")
    res = subprocess.run(cmd + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, f"chromium failed ({res.returncode}):\n{res.stderr[-3000:]}"
    dom = res.stdout
    assert re.search(r'<body class="show-thoughts">', dom)
    assert '<span id="i-thought"> x &lt; y &amp;&amp; z &gt; 0</span>' in dom
    assert '<span id="i-mix">1.7000</span>' in dom and '<span id="i-delta">-2.5000</span>' in dom
    assert '<span id="i-filler">-0.2500</span>' in dom                  # the filler thought's delta beside it
    assert "<script>alert" not in dom  # the token text went in as text, not markup


def test_content_measures_are_drawn_over_steps(tmp_path):
    """The thought accuracy [sampled, shuffled, n] and the content reward {source: [mean, low, high]} of each eval
    row become one line each, with a point per eval row (values from the rows themselves). The first row is an old
    run's, whose source "thought" is today's "post": both draw on the same line."""
    metrics = [{"step": 0, "eval_nll_none": 2.0, "eval_thought_accuracy": [0.05, 0.02, 160],
                "eval_content_reward": {"thought": [-0.1, -0.3, 0.1], "mixed": [0.0, -0.01, 0.01]}},
               {"step": 1, "loss": 3.0},
               {"step": 2, "eval_nll_none": 1.9, "eval_thought_accuracy": [0.25, 0.03, 160],
                "eval_content_reward": {"post": [0.4, 0.2, 0.6], "mixed": [0.02, 0.0, 0.04]}}]
    p = parse(tp.write_thoughts_page(tmp_path / "page.html", make_tokens(), metrics))
    lines = {pl["data-series"]: pl["points"].split() for pl in p.polylines}
    for name in ("thought_accuracy_sampled", "thought_accuracy_shuffled", "content_reward_post",
                 "content_reward_mixed"):
        assert len(lines[name]) == 2, name
    # the sampled accuracy rises from 0.05 to 0.25: its second point is higher on the chart (smaller y)
    (_, y0), (_, y1) = (map(float, xy.split(",")) for xy in lines["thought_accuracy_sampled"])
    assert y1 < y0


def test_an_old_runs_metric_names_draw_under_todays(tmp_path):
    """Runs written before the rename log nll_thought (the mixed prediction) and nll_unmixed (the post-thought
    prediction alone): they draw as nll_mixed and nll_post."""
    old = [{"step": s, "loss": 3.0 - s, "nll_thought": 2.0 - s / 2, "nll_unmixed": 5.0 - s} for s in range(3)]
    p = parse(tp.write_thoughts_page(tmp_path / "page.html", make_tokens(), old))
    names = {pl["data-series"] for pl in p.polylines}
    assert {"nll_mixed", "loss"} <= names and not names & {"nll_thought", "nll_unmixed"}
