"""attention_mask.py: every mask equals the drawing in its docstring, plus the properties the drawings imply."""

import re

import pytest
import torch

import attention_mask
from attention_mask import causal_mask, thought_mask, thought_positions


def parse_mask(drawing: str) -> torch.Tensor:
    """'1' = may attend, '.' = masked; spaces and row labels (like 's0') are ignored."""
    rows = []
    for line in drawing.strip().splitlines():
        line = re.sub(r"^\s*s\d+", "", line)
        rows.append([c == "1" for c in line if c in "1."])
    return torch.tensor(rows)


def docstring_drawings(fn) -> list[torch.Tensor]:
    """The mask drawings inside a docstring: runs of lines made only of 1, '.', spaces and row labels."""
    drawings, current = [], []
    for line in fn.__doc__.splitlines():
        body = re.sub(r"^\s*s\d+", "", line)
        if body.strip() and set(body.strip()) <= set("1. "):
            current.append(line)
        elif current:
            drawings.append(parse_mask("\n".join(current)))
            current = []
    return drawings


def test_causal_mask_T5_window3_equals_its_docstring():
    (drawn,) = docstring_drawings(causal_mask)
    assert torch.equal(causal_mask(5, window=3), drawn)
    assert torch.equal(causal_mask(5, window=3), parse_mask("""
        1....
        11...
        111..
        .111.
        ..111"""))


def test_causal_mask_with_cache_is_the_bottom_rows():
    assert torch.equal(causal_mask(2, 5, window=3), causal_mask(5, window=3)[3:])
    assert torch.equal(causal_mask(4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_thought_mask_drawings_in_the_docstring():
    no_window, with_window, selected = docstring_drawings(thought_mask)
    assert torch.equal(thought_mask(3, offset=2), no_window)
    assert torch.equal(thought_mask(4, offset=2, window=3), with_window)
    assert torch.equal(thought_mask(4, offset=1, at=torch.tensor([[1, 3]])), selected[None, None])


@pytest.mark.parametrize("T,offset,window", [(7, 3, None), (6, 2, 4), (6, 4, 2)])
def test_thought_mask_at_selected_positions_is_the_full_mask_restricted(T, offset, window):
    """Streams at positions at (B, K): the rows at[b] of the full mask, with each thought block's columns at[b]."""
    full = thought_mask(T, offset, window)
    at = torch.tensor([[0, 2, 5], [1, 3, 4]])
    sub = thought_mask(T, offset, window, at=at)
    assert sub.shape == (2, 1, 3, T + 3 * offset)
    for b in range(2):
        columns = torch.cat([torch.arange(T)] + [T * p + at[b] for p in range(1, offset + 1)])
        assert torch.equal(sub[b, 0], full[at[b]][:, columns])
    assert torch.equal(thought_positions(T, offset, at=at), at + offset)


def test_thought_mask_T3_offset1():
    assert torch.equal(thought_mask(3, offset=1), parse_mask("""
        1..  1..
        11.  .1.
        111  ..1"""))


def test_thought_mask_window_drops_old_thought_tokens():
    # T=2, offset=3, W=2: query at position i+3 sees positions > i+1: only its pass-2 and pass-3 tokens
    assert torch.equal(thought_mask(2, offset=3, window=2), parse_mask("""
        ..  ..  1.  1.
        ..  ..  .1  .1"""))


@pytest.mark.parametrize("T,offset", [(1, 1), (5, 1), (5, 4), (7, 3)])
def test_thought_mask_properties(T, offset):
    mask = thought_mask(T, offset)
    assert mask.shape == (T, T * (offset + 1))
    assert torch.equal(mask[:, :T], causal_mask(T))                        # real block: causal
    for s in range(1, offset + 1):                                          # each thought block: identity
        assert torch.equal(mask[:, s * T:(s + 1) * T], torch.eye(T, dtype=torch.bool))
    assert torch.equal(thought_mask(T, offset, window=T + offset), mask)       # a window that never bites
    assert mask.any(dim=1).all() and thought_mask(T, offset, window=1).any(dim=1).all()  # no empty row


def test_thought_positions():
    assert thought_positions(4, offset=3).tolist() == [3, 4, 5, 6]


def test_module_imports_only_torch():
    source = open(attention_mask.__file__).read()
    imports = set(re.findall(r"^(?:import|from) (\w+)", source, flags=re.M))
    assert imports == {"torch"}
