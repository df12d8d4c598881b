"""kdjax.data.index_shuffle equals grain's own index_shuffle and shuffled MapDataset order."""

import grain
from grain._src.python.experimental.index_shuffle.python import (
    index_shuffle_module as grain_index_shuffle)
import numpy as np
import pytest

from kdjax import data
from kdjax.data import index_shuffle

# 100 003 examples need an 18-bit block (ceil(log2(100 002)) = 17, rounded up to even).
_LENGTHS = (1, 2, 7, 4000, 50_000, 65_537, 100_003)
_SEEDS = (0, 1, 2**32 - 1, (2**32 - 2 + 3) % 2**32, (7 + 2) % 2**32)  # The last two: epochs.
_SAMPLE = 3000  # Indices compared per (length, seed) beyond the first seed (grain: ~9 us each).


def _grain(indices, num_examples, seed, rounds=4):
  return np.array([grain_index_shuffle.index_shuffle(int(i), num_examples - 1, seed, rounds)
                   for i in indices], np.int64)


@pytest.mark.parametrize("num_examples", _LENGTHS)
@pytest.mark.parametrize("seed", _SEEDS)
def test_equals_grains_index_shuffle_index_by_index(num_examples, seed):
  ours = index_shuffle.epoch_permutation(num_examples, seed)
  assert ours.shape == (num_examples,) and ours.dtype == np.int64
  if seed == 0 or num_examples <= _SAMPLE:
    indices = np.arange(num_examples)  # Every index.
  else:  # A fixed sample, the epoch's last index included (the cycle-walking edge).
    indices = np.random.default_rng(num_examples + seed).choice(num_examples, _SAMPLE,
                                                                replace=False)
    indices = np.append(indices, num_examples - 1)
  np.testing.assert_array_equal(ours[indices], _grain(indices, num_examples, seed))


@pytest.mark.parametrize("rounds", [6, 8])
def test_more_rounds_equal_grains(rounds):
  ours = index_shuffle.epoch_permutation(4000, 3, rounds=rounds)
  np.testing.assert_array_equal(ours, _grain(range(4000), 4000, 3, rounds))
  assert not np.array_equal(ours, index_shuffle.epoch_permutation(4000, 3))


@pytest.mark.parametrize("num_examples", [1, 2, 7, 4000, 50_000, 65_536, 100_003])
def test_is_a_permutation(num_examples):
  ours = index_shuffle.epoch_permutation(num_examples, 5)
  np.testing.assert_array_equal(np.sort(ours), np.arange(num_examples))
  if num_examples > 2:
    assert not np.array_equal(ours, np.arange(num_examples))


def test_reproduces_grains_quirk_when_max_index_is_an_even_power_of_two():
  # 65 537 examples: max_index = 2**16 does not fit the 16-bit block; grain (and so kdjax)
  # reads it as 0, so positions 0 and 65 536 coincide and 65 536 is never produced.
  ours = index_shuffle.epoch_permutation(65_537, 0)
  assert ours[0] == ours[65_536] == grain_index_shuffle.index_shuffle(65_536, 65_536, 0, 4)
  assert ours.max() < 65_536 and len(np.unique(ours)) == 65_536


def test_round_keys_are_std_seed_seq():
  # Printed by `std::seed_seq s{seed}; s.generate(v.begin(), v.end());` (g++ 12, libstdc++).
  assert index_shuffle.seed_seq_generate(0, 4) == [2963817213, 69796629, 1973464570,
                                                   532167439]
  assert index_shuffle.seed_seq_generate(2**32 - 1, 8) == [
      430145308, 2797324639, 1290077591, 3162004185, 4202657598, 3275963129, 1006707735,
      593906588]


@pytest.mark.parametrize("num_examples", [4000, 70_001])
def test_epochs_equal_grains_shuffled_map_dataset(num_examples):
  seed = 2**32 - 2  # Epoch 2's seed wraps around to 0.
  stream = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(None)
  for epoch in range(3):
    positions = epoch * num_examples + np.arange(0, num_examples, 1 + num_examples // 1500)
    expected = np.array([stream[int(p)] for p in positions])
    ours = index_shuffle.epoch_permutation(num_examples, (seed + epoch) % 2**32)
    np.testing.assert_array_equal(ours[positions - epoch * num_examples], expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_examples=0, seed=0), "num_examples=0 must be a positive integer"),
    (dict(num_examples=5, seed=-1), r"seed=-1 must be an integer in \[0, 2\*\*32\)"),
    (dict(num_examples=5, seed=2**32), r"seed=4294967296 must be an integer"),
    (dict(num_examples=5, seed=0, rounds=5), "rounds=5 must be an even integer >= 4"),
    (dict(num_examples=5, seed=0, rounds=2), "rounds=2 must be an even integer >= 4"),
])
def test_bad_arguments_fail_with_a_clear_message(kwargs, match):
  with pytest.raises(ValueError, match=match):
    index_shuffle.epoch_permutation(**kwargs)


@pytest.mark.parametrize("validation_examples", [0, 400])
def test_pipeline_indices_follow_grains_order_for_two_epochs(data_dir, validation_examples):
  seed, batch = 11, 384  # 384 does not divide the epoch: batches straddle epoch boundaries.
  pipeline = data.InputPipeline("mnist1d", global_batch_size=batch, seed=seed,
                                data_dir=data_dir, augment=False,
                                validation_examples=validation_examples)
  kept = pipeline.num_train_examples - validation_examples
  steps = -(-2 * kept // batch)  # Covers the first two epochs.
  got = np.concatenate([pipeline.train_batch(step)["index"] for step in range(steps)])
  stream = grain.MapDataset.range(kept).shuffle(seed=seed).repeat(None)
  order = np.array([stream[i] for i in range(steps * batch)])
  validation = pipeline._validation_indices  # pylint: disable=protected-access
  train_indices = np.setdiff1d(np.arange(pipeline.num_train_examples), validation)
  assert len(train_indices) == kept
  np.testing.assert_array_equal(got, train_indices[order])
