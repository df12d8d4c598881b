"""TF-KD: teacher-free knowledge distillation (Yuan et al. 2020)."""

METHODS = ()
