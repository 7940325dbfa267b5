"""lmforge: a complete, readable large-language-model stack in PyTorch.

    import lmforge
    lm = lmforge.load("path/to/model-dir")      # lmforge or Hugging Face directory, llama2c .bin, GGUF, Hub id
    print(lm.generate("Once upon a time", max_new_tokens=40))

The public API is what this module exports; everything else may move:

    load(path_or_hub_id) -> LM        Tokenizer, ModelConfig, LM
    export_hf(lm, dir)                export_gguf(lm, file, dtype)      quantize(lm, "int8" | "int4" | "nf4")
    pipeline(task, model)

Importing lmforge has no side effects: no global torch settings, no downloads, no logging setup. The names are
resolved on first use (PEP 562), so `import lmforge` does not import torch.
"""

import importlib

from lmforge.errors import LmforgeError

__version__ = "0.1.0"

_PUBLIC = {
    "load": "lmforge.loader",
    "Tokenizer": "lmforge.tokenizers.bpe",
    "ModelConfig": "lmforge.models.config",
    "LM": "lmforge.lm",
    "export_hf": "lmforge.formats.hf",
    "export_gguf": "lmforge.formats.gguf",
    "quantize": "lmforge.compress.quantize",
    "pipeline": "lmforge.pipelines",  # not lmforge/pipeline.py: importing it would shadow the function
}


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


__all__ = ["LmforgeError", *_PUBLIC, "__version__"]
