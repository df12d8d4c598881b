"""The one output type every kdjax model returns."""

from typing import Dict, NamedTuple

import jax


class Output(NamedTuple):
  """A classifier's output.

  Attributes:
    logits: [B, num_classes] (or [B, T, V] for sequence models).
    features: tap name -> array: NHWC / NWC for conv maps, [B, D] for embeddings.
      Always contains 'embedding', the penultimate (pre-logit) vector.
  """
  logits: jax.Array
  features: Dict[str, jax.Array]
