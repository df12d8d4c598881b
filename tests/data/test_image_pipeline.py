"""The image path (TFDS Image feature, PNG, no TensorFlow) on a small generated CIFAR-like set,
through the real pipeline and a BatchNorm ResNet in the train loop."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax.data import catalog


class TinyCifar(tfds.core.GeneratorBasedBuilder):
  """48 train / 20 test random 32x32 RGB images, PNG encoded with pillow, 10 classes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(48, 0), "test": self._generate_examples(20, 1)}

  def _generate_examples(self, count, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(count):
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
      yield i, {"image": buffer.getvalue(), "label": int(rng.integers(0, 10))}


@pytest.fixture
def tiny_cifar(monkeypatch, tmp_path):
  spec = catalog.DatasetSpec(
      tfds_name="tiny_cifar", input_key="image", label_key="label", num_classes=10,
      input_shape=(32, 32, 3), local_builder=lambda: TinyCifar,
      preprocess=catalog.DATASETS["cifar10"].preprocess)
  monkeypatch.setitem(catalog.DATASETS, "tiny_cifar", spec)
  return str(tmp_path / "data")


def test_images_decode_and_augment_without_tensorflow(tiny_cifar):
  from kdjax.data import InputPipeline
  pipeline = InputPipeline("tiny_cifar", global_batch_size=8, seed=0, data_dir=tiny_cifar)
  batch = pipeline.train_batch(3)
  assert batch["inputs"].shape == (8, 32, 32, 3) and batch["inputs"].dtype == np.float32
  np.testing.assert_array_equal(batch["inputs"], pipeline.train_batch(3)["inputs"])
  assert abs(float(batch["inputs"].mean())) < 1.5  # Normalised, not raw 0-255 pixels.
  assert sum(int(b["mask"].sum()) for b in pipeline.eval_batches(8)) == 20


def test_resnet_distillation_runs_on_generated_images(tiny_cifar, tmp_path):
  from configs import common
  from kdjax.train import run_suite
  config = common.base_config()
  config.dataset, config.num_classes, config.data_dir = "tiny_cifar", 10, tiny_cifar
  config.student.model, config.teacher.model = "resnet8", "resnet8"
  config.global_batch_size, config.eval_batch_size = 8, 10
  config.num_steps, config.log_every_steps = 3, 1
  config.eval_every_steps = config.checkpoint_every_steps = 3
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.05
  # AT distils conv maps (stages 1-3) and logits. A kd run here added ~12 s of compiling; the
  # KD step on a ResNet-8 student is test_benchmark.py's, KD on real data test_quickstart's.
  config.suite, config.progress = "teacher,at", False
  summary = run_suite(config, str(tmp_path / "work"), num_devices=1)
  assert set(summary["runs"]) == {"teacher", "at"}
  for run in ("at",):
    assert np.isfinite(summary["runs"][run]["final_train_loss"])
