"""CS-KD: class-wise self-knowledge distillation (Yun et al. 2020)."""

METHODS = ()
