"""The README is tested: every ```python block runs, in order, in one namespace; the file map's line counts
are the files' line counts."""

import re

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_python_block_in_the_readme_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 5, "the guided tour should have its code blocks"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README python block {number} failed: {type(e).__name__}: {e}\n{block}")


def test_file_map_line_counts_match_the_files():
    rows = re.findall(r"^\| `([\w/.]+\.py)` \| (\d+) \|", README, flags=re.M)
    assert len(rows) >= 8, "the file map lists the project's files with their line counts"
    for name, count in rows:
        actual = len((ROOT / name).read_text().splitlines())
        assert int(count) == actual, f"README says {name} has {count} lines; it has {actual}"
    listed = {name for name, _ in rows}
    on_disk = {p.name for p in ROOT.glob("*.py")}
    assert on_disk <= listed, f"files missing from the README's file map: {sorted(on_disk - listed)}"
