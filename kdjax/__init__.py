"""kdjax: knowledge distillation in JAX/Flax.

Import what you need from the subpackages; importing `kdjax` itself pulls in nothing heavy:

    from kdjax import losses          # pure jax.numpy loss functions
    from kdjax import models          # Flax modules returning Output(logits, features)
"""

__version__ = "0.1.0"
