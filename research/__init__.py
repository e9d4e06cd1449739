"""The research around Quiet-STaR: levers beyond the paper (levers.py) and the instruments that ask whether a
thought helps by what it says (content.py). The algorithm's files (model, attention_mask, qstar, fast, data) never
import this folder; train.py and eval.py do."""
