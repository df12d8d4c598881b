"""The class-paired sampler (CS-KD): same-class partners, deterministic in (seed, step)."""

import numpy as np
import pytest

from kdjax import data
from kdjax.data import pairing

HELD_OUT = 400  # Held-out validation examples: partners must never be one of them.


@pytest.fixture(scope="module")
def paired(data_dir):
  return data.InputPipeline("mnist1d", global_batch_size=32, seed=5, data_dir=data_dir,
                            sampler="class_pairs", validation_examples=HELD_OUT, augment=False)


def test_every_anchor_has_a_different_training_example_of_its_class_as_partner(paired):
  labels = paired.train_labels()
  held_out = set(paired._validation_indices.tolist())  # pylint: disable=protected-access
  assert len(held_out) == HELD_OUT
  for step in (0, 1, 77):
    batch = paired.train_batch(step)
    index, rows = batch["index"], batch[pairing.PARTNER_ROW_KEY]
    np.testing.assert_array_equal(rows, pairing.partner_rows(32))
    anchors, partners = index[:16], index[rows[:16]]
    np.testing.assert_array_equal(partners, index[16:])
    np.testing.assert_array_equal(labels[anchors], labels[partners])
    np.testing.assert_array_equal(batch["labels"][:16], batch["labels"][16:])
    assert np.all(anchors != partners)
    assert not held_out & set(index.tolist())


def test_one_epoch_of_anchors_visits_every_training_example_once(paired):
  steps = (4000 - HELD_OUT) // 16
  anchors = np.concatenate([paired.train_batch(s)["index"][:16] for s in range(steps)])
  trained_on = paired._train_indices  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.sort(anchors), np.sort(trained_on))


def test_pairs_are_a_pure_function_of_seed_and_step(data_dir, paired):
  again = data.InputPipeline("mnist1d", global_batch_size=32, seed=5, data_dir=data_dir,
                             sampler="class_pairs", validation_examples=HELD_OUT, augment=False)
  for step in (3, 1000, 0):  # Any order: a resumed run starts anywhere.
    for key in ("inputs", "labels", "index", pairing.PARTNER_ROW_KEY):
      np.testing.assert_array_equal(again.train_batch(step)[key], paired.train_batch(step)[key])
  assert not np.array_equal(paired.train_batch(0)["index"], paired.train_batch(1)["index"])
  other = data.InputPipeline("mnist1d", global_batch_size=32, seed=6, data_dir=data_dir,
                             sampler="class_pairs", validation_examples=HELD_OUT, augment=False)
  assert not np.array_equal(other.train_batch(0)["index"], paired.train_batch(0)["index"])


def test_two_processes_read_the_rows_of_one_global_batch(data_dir):
  make = lambda **kw: data.InputPipeline("mnist1d", global_batch_size=8, seed=1,
                                         data_dir=data_dir, sampler="class_pairs",
                                         **kw)  # Augmented: each row as in the whole.
  whole = make()
  halves = [make(process_index=i, process_count=2) for i in range(2)]
  for step in (0, 9):
    for key in ("inputs", "labels", "index", pairing.PARTNER_ROW_KEY):
      joined = np.concatenate([h.train_batch(step)[key] for h in halves])
      np.testing.assert_array_equal(joined, whole.train_batch(step)[key], err_msg=key)


def test_partners_are_uniform_over_the_other_members_of_the_class():
  labels = np.array([0, 1, 0, 2, 0, 1, 2, 0, 2, 2])  # Index 9 is held out below.
  train = np.arange(9)
  partners = pairing.ClassPartners(labels, train)
  anchors = np.repeat(train, 2000)
  drawn = np.concatenate([partners.draw(anchors, seed=0, step=s) for s in range(3)])
  anchors = np.tile(anchors, 3)
  for a in train:
    others = [i for i in train if labels[i] == labels[a] and i != a]
    counts = np.array([np.sum(drawn[anchors == a] == o) for o in others])
    assert counts.sum() == 6000  # Only the other members: never itself, never held out (9).
    np.testing.assert_allclose(counts / 6000, 1 / len(others), atol=0.03)
  np.testing.assert_array_equal(partners.draw(train, seed=4, step=2),
                                partners.draw(train, seed=4, step=2))


def test_the_uniform_sampler_carries_no_partners(data_dir):
  # Its batches are today's: tests/test_data.py and the image pipelines' tests check them.
  plain = data.InputPipeline("mnist1d", global_batch_size=16, seed=2, data_dir=data_dir,
                             sampler="uniform")
  assert set(plain.train_batch(4)) == {"inputs", "labels", "index"}


def test_bad_sampler_settings_are_refused(data_dir):
  with pytest.raises(ValueError, match=r"sampler='pairs' is not valid.*; valid values: "
                                       r"class_pairs, uniform\."):
    data.InputPipeline("mnist1d", global_batch_size=16, seed=0, data_dir=data_dir,
                       sampler="pairs")
  with pytest.raises(ValueError, match=r"global_batch_size=15: the 'class_pairs' sampler needs "
                                       r"an even batch size"):
    data.InputPipeline("mnist1d", global_batch_size=15, seed=0, data_dir=data_dir,
                       sampler="class_pairs")
  with pytest.raises(ValueError, match=r"class 1 of 'toy' has a single training example"):
    pairing.ClassPartners(np.array([0, 0, 1, 1]), np.array([0, 1, 2]), dataset="toy")
  with pytest.raises(ValueError, match=r"needs the training labels in memory"):
    pairing.ClassPartners(None, np.arange(3), dataset="imagenet2012")
  with pytest.raises(ValueError, match=r"anchors must be trained-on examples; got held-out "
                                       r"index 3"):
    pairing.ClassPartners(np.array([0, 0, 1, 1]), np.array([0, 1])).draw(np.array([0, 3]),
                                                                          seed=0, step=0)
