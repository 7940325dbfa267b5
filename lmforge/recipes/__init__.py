"""Recipes: short functions that compose library parts into one stage of the lifecycle.

A recipe takes one config dataclass (the same fields in YAML, CLI flags and Python, via `lmforge.argconf`), builds
the objects the library needs (tokenizer, data, model) and runs it. The CLI only parses arguments into that
dataclass. Each recipe lives in its own module (`lmforge.recipes.pretrain`, ...) and is imported on demand.
"""
