"""lmforge.rag (being filled by the structure step)."""
