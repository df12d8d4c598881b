"""MNIST-1D through TFDS (array_record) and the deterministic grain pipeline."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import data


def test_mnist1d_split_sizes_and_records_match_the_generator(data_dir):
  from mnist1d.data import get_dataset_args, make_dataset
  arrays = make_dataset(get_dataset_args())
  train = tfds.data_source("mnist1d", split="train", data_dir=data_dir)
  test = tfds.data_source("mnist1d", split="test", data_dir=data_dir)
  assert (len(train), len(test)) == (4000, 1000)
  for i in (0, 17, 3999):
    record = train[i]
    index = int(record["index"])
    np.testing.assert_allclose(record["signal"], arrays["x"][index].astype(np.float32))
    assert record["label"] == arrays["y"][index]
  assert train[0]["signal"].shape == (40,)


def test_train_batches_are_a_pure_function_of_seed_and_step(data_dir):
  a = data.InputPipeline("mnist1d", global_batch_size=64, seed=3, data_dir=data_dir)
  b = data.InputPipeline("mnist1d", global_batch_size=64, seed=3, data_dir=data_dir)
  for step in (0, 5, 1000):
    for key in ("inputs", "labels"):
      np.testing.assert_array_equal(a.train_batch(step)[key], b.train_batch(step)[key])
  assert not np.array_equal(a.train_batch(0)["inputs"], a.train_batch(1)["inputs"])
  other_seed = data.InputPipeline("mnist1d", global_batch_size=64, seed=4, data_dir=data_dir)
  assert not np.array_equal(a.train_batch(0)["labels"], other_seed.train_batch(0)["labels"])


def test_one_epoch_visits_every_example_once(data_dir):
  pipeline = data.InputPipeline("mnist1d", global_batch_size=100, seed=0, data_dir=data_dir,
                                augment=False)
  signals = np.concatenate([pipeline.train_batch(s)["inputs"] for s in range(40)])
  assert len(np.unique(signals, axis=0)) == 4000


@pytest.mark.parametrize("augment", [False, True])
def test_process_shards_partition_the_global_batch(data_dir, augment):
  whole = data.InputPipeline("mnist1d", global_batch_size=64, seed=1, data_dir=data_dir,
                             augment=augment)
  halves = [data.InputPipeline("mnist1d", global_batch_size=64, seed=1, data_dir=data_dir,
                               process_index=i, process_count=2, augment=augment)
            for i in range(2)]
  for step in (0, 9):
    joined = np.concatenate([h.train_batch(step)["inputs"] for h in halves])
    np.testing.assert_array_equal(joined, whole.train_batch(step)["inputs"])


def test_eval_batches_cover_the_split_once_with_padding_masked(data_dir):
  pipeline = data.InputPipeline("mnist1d", global_batch_size=64, seed=0, data_dir=data_dir)
  batches = list(pipeline.eval_batches(300))
  assert [b["inputs"].shape[0] for b in batches] == [300] * 4
  assert sum(int(b["mask"].sum()) for b in batches) == 1000
  assert not batches[-1]["mask"][100:].any()
  kept = np.concatenate([b["inputs"][b["mask"]] for b in batches])
  assert len(np.unique(kept, axis=0)) == 1000


def test_a_held_out_validation_set_is_fixed_and_never_trained_on(data_dir):
  pipelines = [data.InputPipeline("mnist1d", global_batch_size=100, seed=seed,
                                  data_dir=data_dir, validation_examples=400) for seed in (0, 1)]
  trained = np.concatenate([pipelines[0].train_batch(step)["index"] for step in range(36)])
  assert len(np.unique(trained)) == 3600  # One epoch of the 3600 kept examples.
  held_out = np.setdiff1d(np.arange(4000), trained)
  assert len(held_out) == 400
  for pipeline in pipelines:  # The same 400 examples whatever the seed.
    batches = list(pipeline.eval_batches(300, split="validation"))
    assert sum(int(b["mask"].sum()) for b in batches) == 400
  whole = data.InputPipeline("mnist1d", global_batch_size=100, seed=0, data_dir=data_dir,
                             augment=False)
  rows = np.concatenate([b["inputs"][b["mask"]] for b in
                         pipelines[1].eval_batches(300, split="validation")])
  reference = np.concatenate([whole._train.gather(held_out)["signal"]])  # Unaugmented rows.
  np.testing.assert_array_equal(rows, reference)
  with pytest.raises(ValueError, match=r"validation_examples=4000 must be in \[0, 4000\)"):
    data.InputPipeline("mnist1d", global_batch_size=100, seed=0, data_dir=data_dir,
                       validation_examples=4000)


def test_augmentation_changes_inputs_but_not_labels(data_dir):
  plain = data.InputPipeline("mnist1d", global_batch_size=32, seed=0, data_dir=data_dir,
                             augment=False).train_batch(2)
  augmented = data.InputPipeline("mnist1d", global_batch_size=32, seed=0,
                                 data_dir=data_dir).train_batch(2)
  np.testing.assert_array_equal(plain["labels"], augmented["labels"])
  assert not np.allclose(plain["inputs"], augmented["inputs"])


def test_unprepared_real_tfds_dataset_fails_fast_with_instructions(tmp_path):
  start = time.perf_counter()
  with pytest.raises(data.DatasetNotPreparedError, match=r"tfds build cifar100"):
    data.InputPipeline("cifar100", global_batch_size=8, seed=0, data_dir=str(tmp_path))
  assert time.perf_counter() - start < 30  # No download retries.


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match=r"valid datasets: cifar10, cifar100, digits, imagenet2012, mnist, mnist1d"):
    data.get_dataset_spec("imagenet21k")


def test_cifar_augmentation_is_seeded():
  from kdjax.data import augment
  images = np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32)
  a = augment.random_crop_and_flip(images, np.random.default_rng(7))
  b = augment.random_crop_and_flip(images, np.random.default_rng(7))
  np.testing.assert_array_equal(a, b)
  assert a.shape == images.shape
  halves = [augment.random_crop_and_flip(images[i * 2:(i + 1) * 2], np.random.default_rng(7),
                                         rows=(i * 2, 4)) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), a)
