"""Tokenizers: text to token ids and back.

| module            | what                                                                                      |
|-------------------|-------------------------------------------------------------------------------------------|
| `bpe`             | byte-level BPE (GPT-2's scheme): training, encoding, tokenizer.json; `HFTokenizer` for other tokenizer.json files |
| `basic`           | the teaching tokenizers: one token per word, one per character                           |
| `llama2c`         | llama2.c's SentencePiece-score tokenizer `.bin`                                           |
| `tiktoken_file`   | OpenAI's `.tiktoken` rank files (cl100k_base, o200k_base, ...) as byte-level BPE          |
| `compare`         | how several tokenizers cut the same text: pieces, token counts, characters per token      |
| `chat_template`   | rendering chat messages to the text a model was trained on (Jinja, as Hugging Face does)  |
| `wordpiece`       | BERT's WordPiece (encoders)                                                               |
| `unigram`         | SentencePiece's Unigram (T5)                                                              |

`load_tokenizer(path)` (and `Tokenizer.load`) reads any of them from a file or a model directory.
"""

from lmforge.tokenizers.basic import CharTokenizer, WordTokenizer  # registers the word/char kinds with the loader
from lmforge.tokenizers.bpe import HFTokenizer, Tokenizer, load_tokenizer
from lmforge.tokenizers.tiktoken_file import load_tiktoken  # registers .tiktoken files with the loader

__all__ = ["Tokenizer", "HFTokenizer", "WordTokenizer", "CharTokenizer", "load_tokenizer", "load_tiktoken"]
