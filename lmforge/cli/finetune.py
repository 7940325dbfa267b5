"""`lmforge finetune {classify,ner,qa,sft,dpo,reward,ppo,grpo,prompt-tune}` and `lmforge classify`.

    lmforge finetune classify runs/demo --data SMSSpamCollection --out runs/spam --epochs 3
    lmforge finetune sft runs/demo --data instruction-data.json --out runs/sft --max-steps 200 --lora-r 8
    lmforge finetune dpo runs/sft --data instruction-data-with-preference.json --out runs/dpo --beta 0.1
    lmforge finetune reward runs/sft --data instruction-data-with-preference.json --out runs/rm
    lmforge finetune ppo runs/sft --reward runs/rm --data instruction-data.json --out runs/ppo --lora-r 8
    lmforge finetune grpo runs/arith --reward arithmetic --out runs/grpo
    lmforge finetune prompt-tune runs/demo --data instruction-data.json --out runs/pt --num-virtual-tokens 20
    lmforge classify runs/spam "You have won a prize, call now"

Every field of a recipe's config dataclass is a flag and a YAML key (`--config recipe.yaml`); flags win over YAML.
"""

from __future__ import annotations

import argparse
import json

from lmforge import argconf

RECIPES = {
    "classify": ("lmforge.recipes.encoder_finetune", "EncoderClassifyConfig", "run_classify",
                 "train a text classifier (decoder: head on the last token; encoder: on [CLS], pairs too)"),
    "ner": ("lmforge.recipes.encoder_finetune", "NERConfig", "run_ner", "train an encoder to tag words (BIO NER/POS)"),
    "qa": ("lmforge.recipes.encoder_finetune", "QAConfig", "run_qa", "train an encoder for extractive QA (SQuAD)"),
    "sft": ("lmforge.recipes.sft", "SFTConfig", "run_sft",
            "instruction fine-tuning on Alpaca or chat-messages data (loss on responses only)"),
    "dpo": ("lmforge.recipes.dpo", "DPOConfig", "run_dpo", "direct preference optimization on chosen/rejected pairs"),
    "reward": ("lmforge.recipes.rlhf", "RewardConfig", "run_reward",
               "train a reward model (scalar head on the last token) on chosen/rejected pairs"),
    "ppo": ("lmforge.recipes.rlhf", "PPOConfig", "run_ppo",
            "PPO against a reward (a reward model directory, or arithmetic/length): value head, KL to the reference"),
    "grpo": ("lmforge.recipes.rlhf", "GRPOConfig", "run_grpo",
             "GRPO against a reward: groups of samples per prompt, no value model, KL to the reference"),
    "prompt-tune": ("lmforge.recipes.prompt_tune", "PromptTuneConfig", "run_prompt_tune",
                    "learn a soft prompt with the model frozen (PEFT prompt-tuning layout)"),
}


def _recipe(name: str):
    import importlib

    module, cls, fn, _ = RECIPES[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, fn)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a model: classify, ner, qa, sft, dpo, reward, ppo, grpo, "
                                                   "prompt-tune (LoRA optional)",
                              description="Fine-tune a model directory; writes a model directory, a PEFT adapter "
                                          "(--lora-r), a reward model or a soft prompt.")
    sub = p.add_subparsers(dest="recipe", metavar="RECIPE")
    for name, (_, _, _, help_) in RECIPES.items():
        cls, _ = _recipe(name)
        r = sub.add_parser(name, help=help_, description=help_)
        r.add_argument("model", metavar="MODEL", help="base model directory (lmforge or Hugging Face)")
        r.add_argument("--config", "-c", help="YAML file of config fields")
        argconf.add_arguments(r, cls, skip=("model",))
        r.set_defaults(func=cmd_finetune, recipe_name=name)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    c = subparsers.add_parser("classify", help="classify texts with a model from `lmforge finetune classify`",
                              description="Print the predicted label and its probability for each text.")
    c.add_argument("model", metavar="MODEL", help="classifier directory")
    c.add_argument("texts", nargs="+", metavar="TEXT", help="text(s) to classify")
    c.add_argument("--json", action="store_true", help="print all class probabilities as JSON lines")
    c.set_defaults(func=cmd_classify)


def cmd_finetune(args: argparse.Namespace) -> int:
    cls, run = _recipe(args.recipe_name)
    cfg = argconf.from_cli(cls, args, args.config, model=args.model)
    run(cfg)
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from lmforge.finetune.classifier import load_classifier, predict
    from lmforge.finetune.common import pad_id
    from lmforge.formats.bert import is_encoder_dir

    if is_encoder_dir(args.model):  # a model from `lmforge finetune classify ENCODER`
        return _classify_encoder(args)
    lm, clf, cfg = load_classifier(args.model)
    probs = predict(clf, lm.tokenizer, args.texts, cfg.get("max_length") or lm.config.block_size,
                    pad_id=pad_id(lm.tokenizer))
    for text, p in zip(args.texts, probs):
        k = int(p.argmax())
        if args.json:
            print(json.dumps({"text": text, "label": clf.labels[k],
                              "probabilities": {lab: round(float(q), 6) for lab, q in zip(clf.labels, p)}}))
        else:
            print(f"{clf.labels[k]}\t{float(p[k]):.4f}" + (f"\t{text}" if len(args.texts) > 1 else ""))
    return 0


def _classify_encoder(args: argparse.Namespace) -> int:
    from lmforge.tasks.common import load_encoder
    from lmforge.tasks.text_classification import text_classification

    lm = load_encoder(args.model, task="text classification")
    for text, res in zip(args.texts, text_classification(lm, list(args.texts), top_k=None)):
        if args.json:
            print(json.dumps({"text": text, "label": res[0]["label"],
                              "probabilities": {d["label"]: round(d["score"], 6) for d in res}}))
        else:
            print(f"{res[0]['label']}\t{res[0]['score']:.4f}" + (f"\t{text}" if len(args.texts) > 1 else ""))
    return 0
