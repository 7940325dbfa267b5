"""lmforge.agents (being filled by the structure step)."""
