"""lmforge: a complete, readable large-language-model stack in PyTorch.

    import lmforge
    lm = lmforge.load("path/to/model-dir")      # lmforge or Hugging Face directory, llama2c .bin, GGUF, Hub id
    print(lm.generate("Once upon a time", max_new_tokens=40))

Importing lmforge has no side effects: no global torch settings, no downloads, no logging setup.
"""

from lmforge.errors import LmforgeError

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import lmforge` stays cheap, `lmforge.load` pulls in torch-heavy modules
    if name == "load":
        from lmforge.formats.native import load

        return load
    if name == "Tokenizer":
        from lmforge.tokenizers.bpe import Tokenizer

        return Tokenizer
    if name == "ModelConfig":
        from lmforge.models.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


__all__ = ["LmforgeError", "load", "Tokenizer", "ModelConfig", "__version__"]
