"""Language-model decoding: sampling filters, generation with a KV cache, speculative decoding.

`generate_fn` / `sample_token` are traceable (a train step can call them inside jit);
`generate` and `speculative_decode` are the jitted entry points.
"""

from kdjax.lm.generate import GenerateOutput, generate, generate_fn
from kdjax.lm.sampling import SamplingConfig, filter_logits, sample_token
from kdjax.lm.speculative import (SpeculativeOutput, SpeculativeResult, decoding_statistics,
                                  expected_speedup, measure_cost_ratio, speculative_decode,
                                  speculative_generate, speculative_generate_fn)

__all__ = ["GenerateOutput", "generate", "generate_fn", "SamplingConfig", "filter_logits",
           "sample_token", "SpeculativeOutput", "SpeculativeResult", "decoding_statistics",
           "expected_speedup", "measure_cost_ratio", "speculative_decode", "speculative_generate",
           "speculative_generate_fn"]
