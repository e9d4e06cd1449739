"""Hugging Face files: a model folder (config.json, model.safetensors or shards, tokenizer.json) in and out, and
a Quiet-STaR checkpoint (the same, plus quietstar.safetensors with the markers and the mixing head, and
quietstar.json with the QuietStarConfig). load_pretrained and load_quietstar take a folder, a training run's folder
(its latest checkpoint, checked against its manifest), a built-in short name or a Hub id (machinery/gguf_import.py).
These files are a model's format, written into any folder; a checkpoint holds them beside the run's own files:
machinery/checkpoint.py's table lists every file of a checkpoint, its writer and reader, and the format's version."""

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor

import fast
from machinery.cli import resolve_device
from machinery.gguf_import import resolve_model_dir
from model import Mistral, MistralConfig
from qstar import QuietStar
from research import levers

SUPPORTED_ARCHITECTURES = ("MistralForCausalLM", "LlamaForCausalLM")
QUIETSTAR_WEIGHTS, QUIETSTAR_CONFIG = "quietstar.safetensors", "quietstar.json"


# ---- the base model ----------------------------------------------------------------------------------------

def config_from_hf(hf: dict) -> MistralConfig:
    """Map a Hugging Face config.json (dict) onto our names; the one place that knows both."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}: model.py implements {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Quiet-STaR needs a decoder whose attention it can re-route; other families differ in norms, "
            "biases or position encodings and would load silently wrong)")
    # transformers >= 5 writes RoPE settings as rope_parameters = {rope_theta, rope_type, ...}
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise ValueError(f"RoPE scaling {rope} is not supported: only plain RoPE (rope_type 'default')")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported: Mistral/Llama use 'silu'")
    n_heads = hf["num_attention_heads"]
    return MistralConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=hf.get("rope_theta") or rope.get("rope_theta") or 10000.0,
        sliding_window=hf.get("sliding_window") if arch == "MistralForCausalLM" else None,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
        architecture=arch, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        max_position_embeddings=hf.get("max_position_embeddings", 32768))



def config_to_hf(cfg: MistralConfig) -> dict:
    """The inverse of config_from_hf: a config.json that transformers reads back into the same model."""
    hf = {
        "architectures": [cfg.architecture],
        "model_type": "mistral" if cfg.architecture == "MistralForCausalLM" else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "max_position_embeddings": cfg.max_position_embeddings,
    }
    if cfg.architecture == "MistralForCausalLM":
        hf["sliding_window"] = cfg.sliding_window
    else:
        hf |= {"attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias}
    return hf


def safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir} "
                            "(only safetensors checkpoints are read; convert .bin/.pth files first)")


def read_state_dict(model_dir: Path) -> dict[str, Tensor]:
    state = {}
    for file in safetensor_files(model_dir):
        try:
            shard = load_file(file)
        except Exception as e:
            raise ValueError(f"cannot read {file}: {e}. The file is truncated or corrupt; download or "
                             "convert it again") from None
        state |= {k.removeprefix("model."): v for k, v in shard.items()}
    return state


def load_pretrained(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from a Hugging Face folder, a Hub id or a built-in short name.

    The tokenizer is a `tokenizers.Tokenizer` read from tokenizer.json."""
    return load_model_folder(resolve_model_dir(name_or_path), dtype, device)


def load_model_folder(model_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """load_pretrained for a folder already resolved (and checked against its manifest)."""
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json: it is not a Hugging Face model folder")
    cfg = config_from_hf(json.loads(config_file.read_text()))
    with torch.device("meta"):
        model = Mistral(cfg)                           # shapes only, no memory
    state = {k: v.to(device=device, dtype=dtype) for k, v in read_state_dict(model_dir).items()}
    if cfg.tie_embeddings and "embed_tokens.weight" in state:   # one tensor serves both; some files store a copy
        state["lm_head.weight"] = state["embed_tokens.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:                          # missing, unexpected or wrongly shaped tensors
        raise ValueError(f"the weights in {model_dir} do not match its config.json: "
                         f"{' '.join(str(e).split())[:600]}") from None
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.exists():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json (the fast-tokenizer file read by the "
                                "`tokenizers` library)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    if tokenizer.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
        raise ValueError(
            f"tokenizer.json has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but the model's "
            f"embedding has only {cfg.vocab_size} rows: the tokenizer belongs to a different model")
    return model.eval(), tokenizer


def save_pretrained(model: Mistral, tokenizer, out_dir: str | Path, state_dict: dict | None = None):
    """Write config.json, model.safetensors and tokenizer.json in the Hugging Face layout (readable by
    transformers and by load_pretrained). state_dict: what to write instead of model.state_dict() (LoRA
    merges its adapters first). Not atomic by itself: train.py writes into a fresh folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}" if not k.startswith("lm_head") else k: v.detach().contiguous()
             for k, v in (state_dict or model.state_dict()).items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    hf_config = config_to_hf(model.config) | {"torch_dtype": str(state["model.norm.weight"].dtype).removeprefix("torch.")}
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer.save(str(out_dir / "tokenizer.json"))


# ---- Quiet-STaR's own parts --------------------------------------------------------------------------------

def save_quietstar(qs: QuietStar, out_dir: str | Path, tokenizer, state: dict | None = None):
    """The base model in the Hugging Face layout plus quietstar.safetensors (markers, mixing head) and
    quietstar.json (its config) beside it. state: qs's full state dict to write, if not qs.state_dict() (under
    FSDP: gathered; with LoRA: the merged base weights under "model.")."""
    out_dir = Path(out_dir)
    state = qs.state_dict() if state is None else state
    save_pretrained(qs.model, tokenizer, out_dir, {k[6:]: v for k, v in state.items() if k.startswith("model.")})
    parts = {k: v.detach().contiguous() for k, v in state.items() if not k.startswith("model.")}
    save_file(parts, out_dir / QUIETSTAR_WEIGHTS, metadata={"format": "pt"})
    (out_dir / QUIETSTAR_CONFIG).write_text(json.dumps(asdict(qs.config), indent=2))


def load_model(args) -> tuple[QuietStar, Tokenizer]:
    """(QuietStar with fast.py's twins, tokenizer) for a script's --model on its --device, with --thought_len
    applied when given (machinery/cli.add_model_options)."""
    overrides = {} if args.thought_len is None else {"thought_len": args.thought_len}
    qs, tokenizer = load_quietstar(args.model, device=resolve_device(args.device), **overrides)
    return fast.use(qs), tokenizer


def load_quietstar(path: str | Path, dtype=torch.float32, device="cpu", **overrides) -> tuple[QuietStar, Tokenizer]:
    """A model saved by save_quietstar (or a training run's folder: its latest checkpoint); the trained markers
    and mixing head are kept as saved (never re-initialised). A plain Hugging Face folder, a built-in name or a
    Hub id gives fresh markers and a zero mixing head. overrides: QuietStarConfig fields to change."""
    folder = resolve_model_dir(path)
    model, tokenizer = load_model_folder(folder, dtype=dtype, device=device)
    config_file = folder / QUIETSTAR_CONFIG
    saved = json.loads(config_file.read_text()) if config_file.exists() else {}
    saved, known = levers.renamed_settings(saved, old_run=True), {f.name for f in fields(levers.LeverConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown QuietStarConfig fields {sorted(unknown)}; valid: {sorted(known)}")
    config = levers.LeverConfig(**{k: v for k, v in saved.items() if k in known} | overrides)
    qs = levers.build(model, config, tokenizer)            # the paper's QuietStar, or Levers if a lever is saved
    if config_file.exists() or (folder / QUIETSTAR_WEIGHTS).exists():
        load_quietstar_parts(qs, folder)
    return qs, tokenizer


def load_quietstar_parts(qs: QuietStar, folder: Path):
    """The markers and the mixing head from folder/quietstar.safetensors, strictly: both Quiet-STaR files must be
    there, and every tensor must exist with its shape; anything else is an error naming the file and the key."""
    folder = Path(folder)
    for name in (QUIETSTAR_WEIGHTS, QUIETSTAR_CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing (a Quiet-STaR checkpoint has both "
                                    f"{QUIETSTAR_WEIGHTS} and {QUIETSTAR_CONFIG})")
    try:
        saved = load_file(folder / QUIETSTAR_WEIGHTS, device=str(qs.markers.stored.device))
    except Exception as e:
        raise ValueError(f"cannot read {folder / QUIETSTAR_WEIGHTS}: {e}") from None
    saved = {"markers.stored" if k == "markers.scaled" else k: v for k, v in saved.items()}   # its old name
    expected = {k: v for k, v in qs.state_dict().items() if not k.startswith("model.")}
    for key in sorted(expected.keys() | saved.keys()):
        if key not in saved:
            raise ValueError(f"{folder / QUIETSTAR_WEIGHTS} has no tensor {key!r}")
        if key not in expected:
            raise ValueError(f"{folder / QUIETSTAR_WEIGHTS} has an unexpected tensor {key!r}")
        if saved[key].shape != expected[key].shape:
            raise ValueError(f"{folder / QUIETSTAR_WEIGHTS}: {key!r} has shape {tuple(saved[key].shape)}, the "
                             f"model needs {tuple(expected[key].shape)} ({QUIETSTAR_CONFIG} does not match)")
    qs.load_state_dict(saved, strict=False)                      # every non-model key checked above
