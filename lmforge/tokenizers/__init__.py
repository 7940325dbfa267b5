"""lmforge.tokenizers (being filled by the structure step)."""
