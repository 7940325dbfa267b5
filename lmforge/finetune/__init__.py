"""Fine-tuning: data and losses (library parts) and the recipes that compose them with the one training loop.

    data.py        records, Alpaca / chat templates, response-only masks, padding and packing, preference pairs
    losses.py      response cross-entropy, sequence log-probs, DPO
    metrics.py     accuracy / precision / recall / F1, confusion matrix, ROUGE-L
    classifier.py  a class head on the last real token; save/load with labels
    classify.py, sft.py, dpo.py, prompt_tune.py   the recipes: a config dataclass and one function each
"""
