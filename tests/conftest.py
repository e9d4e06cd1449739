import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def word_tokenizer(n_words: int, extra: tuple[str, ...] = ("---",)):
    """A word-level tokenizer: 'w0' .. 'w{n-1}' plus `extra` words (ids after them); 'w0' is unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(n_words)} | {w: n_words + i for i, w in enumerate(extra)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def tiny_model(vocab_size=37, window=5, std=0.3, seed=2, **overrides):
    """A random Mistral with deliberately unequal sizes: 6 query heads over 2 K/V heads (GQA), head dim 4,
    a sliding window shorter than the test sequences. Weights larger than the default init, so that a
    wrong mask or position cannot hide behind near-uniform attention."""
    from model import Mistral, MistralConfig
    torch.manual_seed(seed)
    cfg = MistralConfig(**dict(vocab_size=vocab_size, dim=24, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=4,
                               ffn_dim=40, sliding_window=window, rope_theta=1000.0) | overrides)
    model = Mistral(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model.eval()


class FavouriteTokensHead(torch.nn.Linear):
    """An LM head (weights 0, a bias) that puts +30 on a few tokens and 0 on every other, whatever the hidden
    state: an unmasked sampler picks them always."""

    def __init__(self, dim: int, vocab: int, favourite: list[int]):
        super().__init__(dim, vocab)
        with torch.no_grad():
            self.weight.zero_()
            self.bias.copy_(torch.zeros(vocab).index_fill(0, torch.tensor(favourite), 30.0))
