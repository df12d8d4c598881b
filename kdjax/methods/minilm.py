"""MiniLM: self-attention and value-relation distillation (Wang et al. 2020, 2021)."""

METHODS = ()
