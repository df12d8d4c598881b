"""grain's `index_shuffle` for a whole epoch at once, in numpy.

grain (0.2.18) shuffles a `MapDataset` with `index_shuffle(index, max_index, seed, rounds=4)`
(`grain/_src/python/experimental/index_shuffle/index_shuffle.cc`), one C++ call per index:
a cycle-walking Simon block cipher (Beaulieu et al. 2013, "The SIMON and SPECK Families of
Lightweight Block Ciphers"; cycle walking: Black & Rogaway 2002, "Ciphers with Arbitrary
Finite Domains"), as in TensorFlow's `random_index_shuffle.cc` except for the round keys:

- block size `B = max(ceil(log2(max_index)) rounded up to even, 16)` bits, two words of
  `W = B / 2` bits (left = high word, right = low word);
- round keys: NOT TensorFlow's 3-word key with Simon's key schedule, but
  `std::seed_seq{seed}.generate(rounds words)` (uint32, truncated to W bits), `seed` the
  uint32 that `ShuffleMapDataset` passes (`(seed + epoch) % 2**32` for epoch `epoch`);
- each pair of rounds: `left ^= f(right) ^ k[i]; right ^= f(left) ^ k[i+1]` with
  `f(x) = (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)` on W bits;
- cycle walking: encrypt again until the value is `<= max_index`.

Here every index of the epoch goes through the cipher together (uint64 arrays), so a whole
epoch costs a few milliseconds instead of ~10 us an index plus grain's Python overhead. The
result equals grain's index by index, including grain's quirk for `max_index` an even power of
two >= 2**16 (e.g. 65 537 examples): `ceil(log2(max_index))` bits then cannot hold
`max_index`, the cipher reads `max_index` as `0`, and the "permutation" maps both `0` and
`max_index` to the same position (and never yields `max_index`).
"""

import functools
import math

import numpy as np

_MIN_BLOCK_BITS = 16  # index_shuffle.cc's kMinBlockSize.
_UINT32 = 0xFFFFFFFF
# Blocks up to this many bits are encrypted whole once (65 536 values for 16 bits) and the
# cycles walked on that table: a small `max_index` in the minimum 16-bit block needs long walks
# (length 4000: up to ~160 steps; length 2: ~2**15), cheap as table look-ups. Larger blocks hold
# more than a quarter of their domain in range, so encrypting the walking indices again ends
# after a few dozen steps.
_TABLE_MAX_BITS = 16


def seed_seq_generate(seed: int, count: int) -> list:
  """`std::seed_seq{seed}.generate(out, out + count)` ([rand.util.seedseq], C++11), uint32.

  The C++ standard fixes this algorithm, so every standard library gives the same words.
  """
  n = count
  out = [0x8B8B8B8B] * n
  entropy = [seed & _UINT32]
  s = len(entropy)
  t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
  p = (n - t) // 2
  q = p + t
  m = max(s + 1, n)

  def mix(x):
    return (x ^ (x >> 27)) & _UINT32

  for k in range(m):
    r1 = (1664525 * mix(out[k % n] ^ out[(k + p) % n] ^ out[(k - 1) % n])) & _UINT32
    if k == 0:
      r2 = r1 + s
    elif k <= s:
      r2 = r1 + k % n + entropy[k - 1]
    else:
      r2 = r1 + k % n
    r2 &= _UINT32
    out[(k + p) % n] = (out[(k + p) % n] + r1) & _UINT32
    out[(k + q) % n] = (out[(k + q) % n] + r2) & _UINT32
    out[k % n] = r2
  for k in range(m, m + n):
    r3 = (1566083941 * mix((out[k % n] + out[(k + p) % n] + out[(k - 1) % n]) & _UINT32)
          ) & _UINT32
    r4 = (r3 - k % n) & _UINT32
    out[(k + p) % n] ^= r3
    out[(k + q) % n] ^= r4
    out[k % n] = r4
  return out


def block_bits(max_index: int) -> int:
  """The cipher's block size in bits for `max_index` (index_shuffle.cc: double precision
  `ceil(log2(max_index))`, rounded up to even, at least 16)."""
  bits = int(math.ceil(math.log2(float(max_index))))
  return max(bits + bits % 2, _MIN_BLOCK_BITS)


def _round_function(x: np.ndarray, word_bits: int) -> np.ndarray:
  """Simon's f(x) = (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2) on `word_bits`-bit words (uint32)."""
  mask = np.uint32((1 << word_bits) - 1)

  def rotl(r):
    r %= word_bits  # An 8-bit word rotated by 8 is itself (index_shuffle.cc's bitset shifts).
    if not r:
      return x
    return ((x << np.uint32(r)) | (x >> np.uint32(word_bits - r))) & mask

  return (rotl(1) & rotl(8)) ^ rotl(2)


@functools.lru_cache(maxsize=None)
def _round_function_table(word_bits: int) -> np.ndarray:
  """f over every `word_bits`-bit word (<= 16 bits), uint16 [2**word_bits]; read only."""
  table = _round_function(np.arange(1 << word_bits, dtype=np.uint32), word_bits)
  table = table.astype(np.uint16)
  table.flags.writeable = False
  return table


def _encrypt(values: np.ndarray, round_keys, word_bits: int) -> np.ndarray:
  """Simon encryption of uint64 `values` [n] with 2 * `word_bits`-bit blocks; bits above the
  block are dropped as `std::bitset<W>` drops them. Returns uint64 [n]."""
  mask = (1 << word_bits) - 1
  w = np.uint64(word_bits)
  # Words of up to 16 bits: f is a table of at most 65 536 entries and each half round is one
  # gather (3x faster than computing the rotations for the 16-bit blocks of most datasets).
  dtype = np.uint16 if word_bits <= 16 else np.uint32
  left = ((values >> w) & np.uint64(mask)).astype(dtype)
  right = (values & np.uint64(mask)).astype(dtype)
  keys = [dtype(k & mask) for k in round_keys]
  if word_bits <= 16:
    table = _round_function_table(word_bits)
    f = lambda x: table[x]
  else:
    f = lambda x: _round_function(x, word_bits)
  for i in range(0, len(keys), 2):
    left ^= f(right)
    left ^= keys[i]
    right ^= f(left)
    right ^= keys[i + 1]
  return (left.astype(np.uint64) << w) | right.astype(np.uint64)


def _check(num_examples: int, seed: int, rounds: int):
  if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or (
      num_examples < 1):
    raise ValueError(f"index_shuffle: num_examples={num_examples!r} must be a positive "
                     "integer.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
      0 <= seed < 2**32):
    raise ValueError(f"index_shuffle: seed={seed!r} must be an integer in [0, 2**32) "
                     "(grain's uint32 seed).")
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or (
      rounds < 4 or rounds % 2):
    raise ValueError(f"index_shuffle: rounds={rounds!r} must be an even integer >= 4.")


def epoch_permutation(num_examples: int, seed: int, rounds: int = 4) -> np.ndarray:
  """`[index_shuffle(i, num_examples - 1, seed, rounds) for i in range(num_examples)]`.

  With `seed = (shuffle_seed + epoch) % 2**32` this is epoch `epoch` of grain's
  `MapDataset.range(num_examples).shuffle(shuffle_seed)` (its position `epoch * num_examples
  + i` holds `epoch * num_examples + out[i]`).

  Args:
    num_examples: the epoch's length n >= 1.
    seed: grain's per-call uint32 seed, in [0, 2**32).
    rounds: cipher rounds, even and >= 4 (grain's shuffle uses 4).

  Returns:
    [n] int64 positions in [0, n): a permutation except for grain's quirk described in the
    module docstring.
  """
  _check(num_examples, seed, rounds)
  max_index = int(num_examples) - 1
  if max_index == 0:
    return np.zeros(1, np.int64)
  bits = block_bits(max_index)
  word_bits = bits // 2
  round_keys = seed_seq_generate(int(seed), int(rounds))
  domain_mask = np.uint64((1 << bits) - 1)
  indices = np.arange(num_examples, dtype=np.uint64) & domain_mask
  limit = np.uint64(max_index)
  if bits <= _TABLE_MAX_BITS:
    successor = _encrypt(np.arange(1 << bits, dtype=np.uint64), round_keys,
                         word_bits).astype(np.int64)
    return _walk_table(successor, indices.astype(np.int64), max_index)
  out = _encrypt(indices, round_keys, word_bits)
  pending = np.flatnonzero(out > limit)
  while pending.size:
    out[pending] = _encrypt(out[pending], round_keys, word_bits)
    pending = pending[out[pending] > limit]
  return out.astype(np.int64)


def _walk_table(successor: np.ndarray, starts: np.ndarray, max_index: int) -> np.ndarray:
  """For each start, the first value `<= max_index` after it on its cycle of `successor` (the
  cipher over its whole domain, [2**B] int64)."""
  if 32 * (max_index + 1) >= len(successor):
    # At least 1/32 of the domain in range: walks are short (~32 * ln(n) steps at most), so
    # step the unfinished starts one at a time.
    out = successor[starts]
    pending = np.flatnonzero(out > max_index)
    while pending.size:
      out[pending] = successor[out[pending]]
      pending = pending[out[pending] > max_index]
    return out
  # Few values in range (e.g. 2 of 65 536): walks take ~2**B / n steps. Pointer jumping:
  # after j rounds first[v] is v's first in-range successor or, if none lies within 2**j
  # steps, the value 2**j steps on; every start is done within B rounds.
  first = successor
  while (first[starts] > max_index).any():
    first = np.where(first > max_index, first[first], first)
  return first[starts]
