"""The README is tested: every ```python block runs, in order, in one namespace, and prints what the README shows
after it (numbers to 1e-3, sampled thoughts all but a third, everything else exactly); the file map lists every .py
file at the top level and in machinery/ with its line count; and the README teaches first: the algorithm, the
guided tour and the file map all start before line 250, in that order."""

import contextlib
import io
import re

import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()
NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?|[-+]?\d+")
THOUGHT = re.compile(r"^(.*?) -> (['\"].*['\"])$", flags=re.M)       # "'context' -> 'sampled thought'"


def blocks_with_output():
    """[(code, shown output or None)]: a ```python block and the plain ``` block right after it, if any."""
    pattern = re.compile(r"```python\n(.*?)```\n(?:```\n(.*?)```)?", flags=re.S)
    return [(m.group(1), m.group(2)) for m in pattern.finditer(README)]


def split_thoughts(text: str) -> tuple[str, list[str]]:
    """-> the text with each sampled thought replaced by <thought>, and the thoughts."""
    return THOUGHT.sub(r"\1 -> <thought>", text), [m.group(2) for m in THOUGHT.finditer(text)]


def same_output(printed: str, shown: str) -> bool:
    # A thought is drawn from 49152 logits near 25, which another CPU rounds differently (~1e-5 to 1e-4): logits
    # perturbed by 3e-5 drew another thought at 3 of 175 positions, by 3e-4 at 20. So a third of the shown ones may
    # differ; thoughts from a wrong position or marker share none.
    (printed, got), (shown, want) = split_thoughts(printed), split_thoughts(shown)
    if len(got) != len(want) or 3 * sum(a != b for a, b in zip(got, want)) > len(want):
        return False
    if NUMBER.sub("#", printed).split() != NUMBER.sub("#", shown).split():
        return False
    # Numbers are printed to 4 decimals: another CPU's last bit can flip the last digit (1e-4), and a thought drawn
    # otherwise moves a printed mean by ~1e-4 (mixing weights ~1e-3); 1e-3, relative above 1. A bug is 1e-1.
    return all(abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(b)))
               for a, b in zip(NUMBER.findall(printed), NUMBER.findall(shown)))


def test_every_python_block_in_the_readme_runs_and_prints_what_it_shows(tmp_path, monkeypatch):
    blocks = blocks_with_output()
    assert len(blocks) >= 6, "the guided tour should have its code blocks"
    assert sum(shown is not None for _, shown in blocks) >= 6, "and show what they print"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for number, (code, shown) in enumerate(blocks, 1):
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"README.md python block {number}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README python block {number} failed: {type(e).__name__}: {e}\n{code}")
        if shown is not None:
            assert same_output(printed.getvalue(), shown), \
                f"README python block {number} printed\n{printed.getvalue()}\nbut the README shows\n{shown}"


def test_the_output_comparison_can_fail():
    assert same_output("loss 2.0958 and 'w'", "loss 2.0961 and 'w'")
    assert not same_output("loss 2.0958", "loss 2.1958")
    assert not same_output("thought 'a b'", "thought 'a c'")
    shown = "'x' -> 'a 1'\n'y' -> 'b 2'\n'z' -> \"c's\""
    assert same_output(shown.replace("'b 2'", "'d 7'"), shown)                    # one thought of three drawn otherwise
    assert not same_output(shown.replace("'b 2'", "'d 7'").replace("'a 1'", "'e'"), shown)      # two of three
    assert not same_output(shown.replace("'y'", "'w'"), shown)                    # the context is exact


def test_file_map_line_counts_match_the_files():
    rows = re.findall(r"^\| `([\w/.]+\.py)` \| (\d+) \|", README, flags=re.M)
    assert len(rows) >= 8, "the file map lists the project's files with their line counts"
    for name, count in rows:
        actual = len((ROOT / name).read_text().splitlines())
        assert int(count) == actual, f"README says {name} has {count} lines; it has {actual}"
    listed = {name for name, _ in rows}
    on_disk = {p.name for p in ROOT.glob("*.py")}
    assert on_disk <= listed, f"files missing from the README's file map: {sorted(on_disk - listed)}"
    machinery = {f"machinery/{p.name}" for p in (ROOT / "machinery").glob("*.py")}
    assert machinery, "machinery/ holds the run's machinery"
    assert machinery <= listed, f"files missing from the README's file map: {sorted(machinery - listed)}"
    research = {f"research/{p.name}" for p in (ROOT / "research").glob("*.py")}
    assert research <= listed, f"files missing from the README's file map: {sorted(research - listed)}"


def heading_lines() -> dict[str, int]:
    """{heading text: 1-based line number} for the README's headings outside code blocks."""
    headings, in_code = {}, False
    for number, line in enumerate(README.splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            headings.setdefault(line.lstrip("#").strip(), number)
    return headings


def test_the_readme_teaches_first():
    # A new reader meets, in this order and within the first 250 lines: what Quiet-STaR is, the quick start, the
    # algorithm, the guided tour and the file map (read these / machinery). Results, speed and training come later.
    lines = heading_lines()
    order = ["Quick start", "The algorithm in five steps", "A guided tour", "File map", "Read these", "Machinery"]
    missing = [h for h in order if h not in lines]
    assert not missing, f"README sections missing: {missing}"
    for heading in ("The algorithm in five steps", "A guided tour", "File map"):
        assert lines[heading] < 250, f"README section {heading!r} starts at line {lines[heading]}, after line 250"
    starts = [lines[h] for h in order]
    assert starts == sorted(starts), f"README sections out of order: {dict(zip(order, starts))}"
