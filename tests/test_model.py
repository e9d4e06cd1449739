"""model.py: parity with transformers, KV cache, the embeds/positions seam, the real default model, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model, word_tokenizer

from generate import generate
from machinery.hf_io import load_pretrained, save_pretrained
from model import Mistral

transformers = pytest.importorskip("transformers")


def write_hf_checkpoint(path, arch: str, max_shard_size=None, n_tokenizer_words=50, **overrides):
    """A tiny random checkpoint written by transformers itself, with a word-level tokenizer beside it."""
    torch.manual_seed(1)
    common = dict(vocab_size=101, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=8, rope_theta=500.0)
    if arch == "mistral":
        cfg = transformers.MistralConfig(**common | dict(sliding_window=4, tie_word_embeddings=False) | overrides)
        hf = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common | dict(tie_word_embeddings=True) | overrides)
        hf = transformers.LlamaForCausalLM(cfg)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(path, **kwargs)
    word_tokenizer(n_tokenizer_words, extra=()).save(str(path / "tokenizer.json"))
    return hf.eval()


@pytest.mark.parametrize("arch,shard", [("mistral", None), ("llama", None), ("mistral", "40KB")],
                         ids=["mistral-window-gqa-untied", "llama-tied", "mistral-sharded"])
def test_logits_match_transformers(tmp_path, arch, shard):
    hf = write_hf_checkpoint(tmp_path, arch, max_shard_size=shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = load_pretrained(tmp_path)
    assert all(p.device.type == "cpu" for p in model.parameters()), "a tensor was left on the meta device"
    assert model.config.tie_embeddings == (arch == "llama")
    assert (model.lm_head.weight is model.embed_tokens.weight) == (arch == "llama")
    tokens = torch.randint(0, 101, (2, 11))  # 11 tokens > sliding window 4
    with torch.no_grad():
        expected, got = hf(tokens).logits, model(tokens)
    diff = (expected - got).abs().max().item()
    # fp32 logits <= 1.2 (measured equal bit for bit): 1e-5 is ~80 roundings of the largest, room for other
    # kernels' order of <= 100-term sums over 2 layers (~1e-6). Wrong positions move logits by 0.3 (see below).
    assert diff <= 1e-5, f"max abs logit difference vs transformers: {diff:.2e}"


def random_model(**overrides) -> Mistral:
    return tiny_model(**overrides)


@pytest.mark.parametrize("window", [5, None])
def test_kv_cache_decoding_equals_full_forward(window):
    model = random_model(window=window)
    tokens = torch.randint(0, 37, (3, 13))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        pieces = [model(tokens[:, :4], cache=cache)]                      # a prompt, then one at a time
        pieces += [model(tokens[:, t:t + 1], cache=cache) for t in range(4, 13)]
    diff = (full - torch.cat(pieces, dim=1)).abs().max().item()
    # logits ~1, attention over other key counts (fp32 sums reordered: measured 4e-7); a key left out of the cache
    # or a window off by one moves them by 0.1 and more
    assert diff <= 1e-5, f"cached vs full: {diff:.2e}"


def test_embeds_and_positions_equal_tokens():
    model = random_model()
    tokens = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        by_tokens = model(tokens)
        by_embeds = model(embeds=model.embed(tokens), positions=torch.arange(9))
        by_batched_positions = model(embeds=model.embed(tokens), positions=torch.arange(9).expand(2, 9))
    # the same kernels on the same values (measured equal bit for bit); 1e-6 is a few roundings of logits <= 1.1
    assert torch.allclose(by_tokens, by_embeds, atol=1e-6, rtol=0)
    assert torch.allclose(by_tokens, by_batched_positions, atol=1e-6, rtol=0)
    # an explicit mask equal to the default one changes nothing; RoPE is relative, so shifting every
    # position by 7 changes nothing either, but spreading them apart does
    from attention_mask import causal_mask
    with torch.no_grad():
        by_mask = model(tokens, mask=causal_mask(9, window=5))
        shifted = model(tokens, positions=torch.arange(7, 16))
        spread = model(tokens, positions=2 * torch.arange(9))
    assert torch.allclose(by_tokens, by_mask, atol=1e-6, rtol=0)                # the window's mask: the same path
    # RoPE angles up to 15 rad are rounded to 15 x 6e-8 = 1e-6 (measured 2e-7 in the logits): 1e-5 leaves 10x;
    # spreading the positions moves the logits by 0.3, far outside 1e-3
    assert torch.allclose(by_tokens, shifted, atol=1e-5, rtol=0)
    assert not torch.allclose(by_tokens, spread, atol=1e-3)


@pytest.mark.parametrize("layers_per_checkpoint", [1, 2, 3])
def test_activation_checkpointing_gives_same_gradients(layers_per_checkpoint):
    """5 layers in groups of 1, 2 (the default; the last group has one layer) or 3, with a KV cache filled by an
    earlier call, as the thought passes use it: every group's keys reach the cache, every gradient is the same."""
    model = tiny_model(37, window=4, n_layers=5).train()
    tokens = torch.randint(0, 37, (2, 8))

    def loss_grads_and_cache():
        model.zero_grad()
        cache = model.new_cache()
        model(tokens[:, :3], cache=cache)
        logits = model(tokens[:, 3:], cache=cache)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 4:].flatten()).backward()
        return [p.grad.clone() for p in model.parameters()], cache
    plain, plain_cache = loss_grads_and_cache()
    model.activation_checkpointing, model.layers_per_checkpoint = True, layers_per_checkpoint
    grads, cache = loss_grads_and_cache()
    for a, b in zip(plain, grads):   # the recomputed forward is the same computation (measured equal bit for bit);
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)   # gradients <= 0.3: room for reordered sums only
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_cache.keys + plain_cache.values,
                                                                cache.keys + cache.values))


def test_save_pretrained_round_trip_and_transformers_reads_it(tmp_path):
    model = random_model()
    save_pretrained(model, word_tokenizer(37, extra=()), tmp_path)
    loaded, tok = load_pretrained(tmp_path)
    tokens = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        diff = (hf(tokens).logits - model(tokens)).abs().max().item()
    assert diff <= 1e-5, f"transformers reading our checkpoint: {diff:.2e}"   # as in the parity test above


def test_generate_uses_the_cache_and_matches_greedy_argmax(tmp_path):
    model = random_model(window=None)
    tok = word_tokenizer(37, extra=())
    text = generate(model, tok, "w3 w5 w7", max_new_tokens=6, stop_at_eos=False)
    generated = [int(word[1:]) for word in text.split()]
    assert len(generated) == 6
    tokens = torch.tensor([[3, 5, 7]])
    with torch.no_grad():
        for token in generated:  # the slow way: a full forward per new token
            logits = model(tokens)[0, -1]
            # the argmax up to rounding: cached and full forwards differ by ~4e-7 (above), so an exact argmax could
            # flip at a near-tie; the top two logits here are 2.5e-2 and more apart
            assert logits[token] >= logits.max() - 1e-5
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    sampled = [generate(model, tok, "w3", max_new_tokens=8, temperature=1.0, seed=s, stop_at_eos=False)
               for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and len(sampled[0].split()) == 8


# ---- bad input: every error says what is wrong and what to do ------------------------------------------

def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="does not exist.*built-in names"):
        load_pretrained("./no/such/folder")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_pretrained(tmp_path)


def test_unsupported_architecture(tmp_path):
    write_hf_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*MistralForCausalLM"):
        load_pretrained(tmp_path)


def test_truncated_safetensors(tmp_path):
    write_hf_checkpoint(tmp_path, "mistral")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_pretrained(tmp_path)


def test_tokenizer_larger_than_the_embedding(tmp_path):
    write_hf_checkpoint(tmp_path, "mistral", n_tokenizer_words=150)  # the model has 101 rows
    with pytest.raises(ValueError, match="150 tokens but the model's embedding has only 101"):
        load_pretrained(tmp_path)


def test_hub_id_without_network(tmp_path):
    # A real subprocess, so that huggingface_hub reads the endpoint fresh; 127.0.0.1:9 refuses at once.
    env = os.environ | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path), "HF_HUB_ETAG_TIMEOUT": "1",
                        "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    code = "from machinery.hf_io import load_pretrained; load_pretrained('someorg/some-model')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "could not download 'someorg/some-model'" in result.stderr
    assert "pass the local folder instead" in result.stderr


# ---- the real default model -------------------------------------------------------------------------

PARAGRAPH = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
             "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to "
             "1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was constructed as the "
             "centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of the French "
             "Revolution. Although initially criticised by some of France's leading artists and intellectuals "
             "for its design, it has since become a global cultural icon of France and one of the most "
             "recognisable structures in the world.")


@pytest.fixture(scope="session")
def smollm():
    return load_pretrained("smollm2-135m")


def test_default_model_perplexity(smollm):
    model, tok = smollm
    tokens = torch.tensor([tok.encode(PARAGRAPH).ids])
    with torch.no_grad():
        logits = model(tokens)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    # 7.28, fixed by the weights (another CPU moves it by ~1e-5); a uniform guess is 49152, a shifted target ~1e3
    assert 5.0 < nll.exp().item() < 10.0, f"perplexity {nll.exp().item():.2f}"


def test_default_model_knows_paris(smollm):
    model, tok = smollm
    # greedy: " Paris" leads the runner-up by 2.5 logits, far beyond any rounding
    assert generate(model, tok, "The capital of France is", max_new_tokens=3).startswith(" Paris")
