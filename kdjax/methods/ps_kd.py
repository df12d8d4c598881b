"""PS-KD: progressive self-knowledge distillation (Kim et al. 2021)."""

METHODS = ()
