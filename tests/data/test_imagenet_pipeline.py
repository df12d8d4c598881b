"""The ImageNet path (variable-size JPEG records, inception crop / centre crop) on a small
generated set written by TFDS to array_record, through the real pipeline."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax.data import augment, catalog


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """12 train / 5 validation random JPEG images of different sizes, 1000 classes: the
  features of TFDS's imagenet2012."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12, 0),
            "validation": self._generate_examples(5, 1)}

  def _generate_examples(self, count, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(count):
      height, width = int(rng.integers(180, 400)), int(rng.integers(180, 400))
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
          buffer, "JPEG")
      yield i, {"image": buffer.getvalue(), "label": int(rng.integers(0, 1000))}


@pytest.fixture
def tiny_imagenet(monkeypatch, tmp_path):
  spec = catalog.DatasetSpec(
      **{**catalog.DATASETS["imagenet2012"].__dict__, "tfds_name": "tiny_imagenet",
         "train_examples": 12, "local_builder": lambda: TinyImagenet})
  monkeypatch.setitem(catalog.DATASETS, "tiny_imagenet", spec)
  return str(tmp_path / "data")


def test_imagenet_records_decode_crop_and_normalise(tiny_imagenet):
  from kdjax.data import InputPipeline
  pipeline = InputPipeline("tiny_imagenet", global_batch_size=4, seed=0, data_dir=tiny_imagenet)
  batch = pipeline.train_batch(1)
  assert batch["inputs"].shape == (4, 224, 224, 3) and batch["inputs"].dtype == np.float32
  np.testing.assert_array_equal(batch["inputs"], pipeline.train_batch(1)["inputs"])
  assert not np.array_equal(batch["inputs"], pipeline.train_batch(2)["inputs"])
  assert abs(float(batch["inputs"].mean())) < 1.0 and 0.5 < float(batch["inputs"].std()) < 2.5
  evals = list(pipeline.eval_batches(4))
  assert sum(int(b["mask"].sum()) for b in evals) == 5
  assert all(b["inputs"].shape == (4, 224, 224, 3) for b in evals)
  # Two processes, each reading its half, see exactly the rows of the one-process batch.
  halves = [InputPipeline("tiny_imagenet", global_batch_size=4, seed=0, data_dir=tiny_imagenet,
                          process_index=p, process_count=2).train_batch(1) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), batch["inputs"])


def test_centre_crop_is_the_middle_of_the_shorter_side_resized_to_256():
  # A 300 x 600 image whose columns count 0..599: resized to 256 x 512, its centre 224 columns
  # are the original's columns around 300 (scale 600/512), whatever the rows hold.
  columns = np.tile(np.linspace(0, 255, 600).astype(np.uint8)[None, :, None], (300, 1, 3))
  crop = augment.resize_and_center_crop([columns], size=224, resize=256)[0]
  assert crop.shape == (224, 224, 3)
  left_source = (512 - 224) / 2 * 600 / 512  # 168.75 original columns cut on the left.
  expected_first = 255 * (left_source / 599)
  assert abs(int(crop[112, 0, 0]) - expected_first) <= 2
  assert abs(int(crop[112, 223, 0]) - 255 * ((left_source + 224 * 600 / 512) / 599)) <= 2


def test_inception_crop_covers_the_scale_range_and_flips_half():
  rng = np.random.default_rng(0)
  image = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (256, 1, 3))
  crops = augment.inception_crop_and_flip([image] * 64, np.random.default_rng(3), size=32)
  assert crops.shape == (64, 32, 32, 3)
  increasing = crops[:, 16, -1, 0] > crops[:, 16, 0, 0]
  assert 16 < int(increasing.sum()) < 48  # About half are flipped.
  spans = np.abs(crops[:, 16, -1, 0].astype(int) - crops[:, 16, 0, 0].astype(int))
  assert spans.min() < 80 < 180 < spans.max()  # Small and large crops both occur.
  # No crop fits an extreme aspect ratio: the fallback centre crop is used, never an error.
  thin = rng.integers(0, 256, (4, 400, 3), dtype=np.uint8)
  assert augment.inception_crop_and_flip([thin], np.random.default_rng(0), size=8).shape == \
      (1, 8, 8, 3)
