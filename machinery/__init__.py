"""The machinery around the algorithm: command line, checkpoints, run life (locks, signals, resume), torchrun,
Hugging Face files and the Hub, GGUF import, LoRA, the thoughts page, benchmarks. The algorithm files at the top
level (model.py, attention_mask.py, qstar.py, fast.py) never import from here; the scripts (train.py, eval.py,
generate.py) do."""
