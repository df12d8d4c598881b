"""The language-model data path: pydoc corpus, tokenizers, packed token windows."""

import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import data
from kdjax.data import lm_pipeline, pydoc_tfds, sources, text_catalog, tokenization

BYTE = tokenization.ByteTokenizer()


@pytest.fixture(scope="module")
def pydoc_dir(tmp_path_factory):
  """A data_dir with pydoc_topics generated once for this module."""
  directory = str(tmp_path_factory.mktemp("tfds_text"))
  sources.ensure_prepared(text_catalog.get_text_dataset_spec("pydoc"), directory)
  return directory


def _split_documents(data_dir, split):
  """topic -> text of one split, read straight from TFDS."""
  source = tfds.data_source("pydoc_topics", split=split, data_dir=data_dir)
  return {r["topic"].decode(): r["text"].decode() for r in source.__getitems__(range(len(source)))}


def _byte_stream(texts):
  """Independent reference: [BOS] utf-8 bytes [EOS] per document, concatenated."""
  out = []
  for text in texts:
    out += [BYTE.bos_id] + list(text.encode("utf-8")) + [BYTE.eos_id]
  return np.array(out)


def _stream_from_windows(tokens, targets, mask):
  """Rebuilds the stream from windows in order: each window's tokens, then its last target."""
  pieces = []
  for row_tokens, row_targets, row_mask in zip(tokens, targets, mask):
    window = np.concatenate([row_tokens, row_targets[-1:]])
    real = np.concatenate([[row_mask.any()], row_mask])  # tokens[0] is real iff any target.
    pieces.append(window[real])
  return np.concatenate(pieces)


def test_pydoc_splits_are_disjoint_by_topic_and_cover_every_topic(pydoc_dir):
  from pydoc_data.topics import topics
  train, evaluation = (_split_documents(pydoc_dir, s) for s in ("train", "eval"))
  assert not set(train) & set(evaluation)
  assert set(train) | set(evaluation) == set(topics)
  for name, text in {**train, **evaluation}.items():
    assert text == topics[name]
  eval_chars = sum(map(len, evaluation.values()))
  assert 0.07 < eval_chars / sum(map(len, topics.values())) <= 0.1
  # The split is a function of the topic names alone.
  assert pydoc_tfds.split_topics(topics) == (sorted(train), sorted(evaluation))


def test_byte_tokenizer_round_trips_non_ascii_and_drops_specials():
  text = "naïve café → 日本語 🐍\n\tend"
  ids = BYTE.encode(text)
  assert ids == list(text.encode("utf-8")) and max(ids) < 256
  assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id, BYTE.pad_id]) == text
  assert BYTE.decode([0xE6, 0x97]) == "\ufffd"  # Truncated UTF-8 is replaced, not raised.
  np.testing.assert_array_equal(BYTE.encode_batch([text])[0], ids)
  assert (BYTE.vocab_size, BYTE.pad_id, BYTE.bos_id, BYTE.eos_id) == (259, 256, 257, 258)


def test_get_tokenizer_refuses_unknown_names_and_incomplete_bpe_arguments(tmp_path):
  with pytest.raises(ValueError,
                     match=r"Unknown tokenizer 'wordpiece'; valid tokenizers: byte, bpe"):
    tokenization.get_tokenizer("wordpiece")
  with pytest.raises(ValueError, match=r"vocab_size=300 with tokenizer 'byte'"):
    tokenization.get_tokenizer("byte", vocab_size=300)
  with pytest.raises(ValueError, match=r"'bpe' needs vocab_size and a directory"):
    tokenization.get_tokenizer("bpe", vocab_size=512)
  with pytest.raises(ValueError, match=r"no texts to train"):
    tokenization.get_tokenizer("bpe", vocab_size=512, directory=str(tmp_path))
  with pytest.raises(ValueError, match=r"vocab_size=100 .* integer >= 259"):
    tokenization.BPETokenizer.train(["abc"], 100)


@pytest.fixture(scope="module")
def bpe_512(pydoc_dir, tmp_path_factory):
  """A BPE tokenizer (vocab 512) trained on pydoc's training split, and its directory."""
  directory = str(tmp_path_factory.mktemp("bpe512"))
  texts = lm_pipeline.read_documents(text_catalog.get_text_dataset_spec("pydoc"), "train",
                                     pydoc_dir)
  return tokenization.train_or_load(directory, texts, 512), directory


def test_bpe_trains_saves_reloads_identically_and_refuses_another_size(bpe_512, pydoc_dir):
  trained, directory = bpe_512
  assert trained.vocab_size == 512
  assert os.path.exists(os.path.join(directory, "tokenizer.json"))
  reloaded = tokenization.get_tokenizer("bpe", vocab_size=512, directory=directory)
  assert tokenization.fingerprint(reloaded) == tokenization.fingerprint(trained)
  text = "def naïve(x):\n    return x ** 2  # 日本 🐍"
  assert reloaded.encode(text) == trained.encode(text)
  assert reloaded.decode(trained.encode(text)) == text
  assert trained.decode([trained.bos_id] + trained.encode(text) + [trained.eos_id]) == text
  assert len({trained.pad_id, trained.bos_id, trained.eos_id}) == 3
  # Merges learned: pydoc's own text takes far fewer tokens than bytes.
  sample = max(_split_documents(pydoc_dir, "train").values(), key=len)
  ids = trained.encode(sample)
  assert max(ids) < 512 and len(ids) < 0.6 * len(sample.encode())
  with pytest.raises(ValueError, match=r"has vocab_size=512, not the requested 1024"):
    tokenization.train_or_load(directory, ["unused"], 1024)


def test_fingerprints_tell_tokenizers_apart(bpe_512, pydoc_dir):
  trained, _ = bpe_512
  other_text = tokenization.BPETokenizer.train(
      list(_split_documents(pydoc_dir, "eval").values()), 512)
  prints = {tokenization.fingerprint(t) for t in (BYTE, trained, other_text)}
  assert len(prints) == 3
  assert tokenization.fingerprint(tokenization.ByteTokenizer()) == tokenization.fingerprint(BYTE)


def _pipeline(data_dir, **kwargs):
  kwargs = {"global_batch_size": 8, "seed": 0, "sequence_length": 64, **kwargs}
  return data.LMInputPipeline("pydoc", data_dir=data_dir, **kwargs)


def test_eval_windows_pack_the_split_stream_once_with_padding_masked(pydoc_dir):
  pipeline = _pipeline(pydoc_dir)
  evaluation = _split_documents(pydoc_dir, "eval")
  reference = _byte_stream([evaluation[name] for name in sorted(evaluation)])
  batches = list(pipeline.eval_batches(40))
  tokens, targets, mask = (np.concatenate([b[k] for b in batches])
                           for k in ("tokens", "targets", "mask"))
  assert tokens.shape == (40 * len(batches), 64) and tokens.dtype == np.int32
  assert targets.dtype == np.int32 and mask.dtype == bool
  # Targets are the tokens shifted by one within each window.
  np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])
  # Every stream token once, in order; padding exactly where the mask is False.
  np.testing.assert_array_equal(_stream_from_windows(tokens, targets, mask), reference)
  windows = -(-len(reference) // 65)
  assert pipeline.num_eval_examples == windows and mask[:windows].sum() == len(reference) - windows
  assert not mask[windows:].any()  # Whole padding rows of the last batch.
  last = windows - 1
  real_targets = len(reference) - last * 65 - 1
  assert mask[last].sum() == real_targets and (targets[last][~mask[last]] == BYTE.pad_id).all()
  assert pipeline.spec.num_classes == 259 and pipeline.spec.input_shape == (64,)
  assert pipeline.spec.input_kind == "tokens" and pipeline.spec.input_dtype == np.int32


def test_one_epoch_of_training_windows_rebuilds_the_training_stream(pydoc_dir):
  pipeline = _pipeline(pydoc_dir, global_batch_size=1, sequence_length=512)
  train = _split_documents(pydoc_dir, "train")
  reference = _byte_stream([train[name] for name in sorted(train)])
  n = pipeline.num_train_examples
  assert n == -(-len(reference) // 513)
  batches = [pipeline.train_batch(step) for step in range(n)]
  index = np.concatenate([b["index"] for b in batches])
  assert sorted(index) == list(range(n))  # Every window exactly once per epoch.
  order = np.argsort(index)
  tokens, targets, mask = (np.concatenate([b[k] for b in batches])[order]
                           for k in ("tokens", "targets", "mask"))
  np.testing.assert_array_equal(_stream_from_windows(tokens, targets, mask), reference)


def test_train_batches_are_a_pure_function_of_seed_and_step(pydoc_dir):
  a, b = _pipeline(pydoc_dir, seed=3), _pipeline(pydoc_dir, seed=3)
  for step in (0, 7, 5000):
    for key in ("tokens", "targets", "mask", "index"):
      np.testing.assert_array_equal(a.train_batch(step)[key], b.train_batch(step)[key])
  resumed = next(b.train_batches(start_step=7))
  np.testing.assert_array_equal(resumed["tokens"], a.train_batch(7)["tokens"])
  assert not np.array_equal(a.train_batch(0)["index"], a.train_batch(1)["index"])
  assert not np.array_equal(a.train_batch(0)["index"], _pipeline(pydoc_dir, seed=4)
                            .train_batch(0)["index"])


def test_two_processes_rows_compose_the_global_batch(pydoc_dir):
  whole = _pipeline(pydoc_dir, seed=1)
  halves = [_pipeline(pydoc_dir, seed=1, process_index=i, process_count=2) for i in range(2)]
  for step in (0, 11):
    parts = [h.train_batch(step) for h in halves]
    assert parts[0]["tokens"].shape == (4, 64)
    for key in ("tokens", "targets", "mask", "index"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                    whole.train_batch(step)[key])
  for whole_batch, *parts in zip(whole.eval_batches(40), *(h.eval_batches(40) for h in halves)):
    for key in ("tokens", "mask"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole_batch[key])


def test_validation_windows_are_fixed_and_never_trained_on(pydoc_dir):
  pipelines = [_pipeline(pydoc_dir, seed=s, global_batch_size=10, sequence_length=256,
                         validation_examples=100) for s in (0, 1)]
  n = pipelines[0].num_train_examples
  kept = n - 100
  assert pipelines[0].num_validation_examples == 100
  trained = np.concatenate([pipelines[0].train_batch(s)["index"] for s in range(kept // 10)])
  held_out = np.setdiff1d(np.arange(n), trained)
  assert len(np.unique(trained)) == len(trained) == kept - kept % 10
  whole = _pipeline(pydoc_dir, global_batch_size=n, sequence_length=256)
  every_window = whole.train_batch(0)
  by_index = every_window["tokens"][np.argsort(every_window["index"])]
  for pipeline in pipelines:  # The same windows whatever the seed.
    rows = np.concatenate([b["tokens"][b["mask"].any(1)]
                           for b in pipeline.eval_batches(30, split="validation")])
    assert len(rows) == 100
    assert set(held_out) >= set(pipeline._validation_indices)
    np.testing.assert_array_equal(rows, by_index[pipeline._validation_indices])
  with pytest.raises(ValueError, match=rf"validation_examples={n} must be in \[0, {n}\)"):
    _pipeline(pydoc_dir, sequence_length=256, validation_examples=n)


def test_too_long_sequence_length_names_both_numbers(pydoc_dir):
  tokens = sum(len(t.encode()) + 2 for t in _split_documents(pydoc_dir, "eval").values())
  with pytest.raises(ValueError, match=rf"sequence_length=100000 .*'eval'.* its {tokens} tokens "
                                       rf".*sequence_length <= {tokens - 1}"):
    _pipeline(pydoc_dir, sequence_length=100_000)
  _pipeline(pydoc_dir, global_batch_size=1, sequence_length=tokens - 1)  # Exactly one window.


def test_bad_pipeline_arguments_fail_before_reading(tmp_path):
  empty = str(tmp_path)  # Nothing prepared here: a read would generate or fail differently.
  cases = [({"tokenizer": "bpe", "vocab_size": 512}, r"tokenizer='bpe' needs tokenizer_dir"),
           ({"tokenizer": "chars"}, r"tokenizer='chars'; valid tokenizers: byte, bpe"),
           ({"sequence_length": 0}, r"sequence_length=0 must be a positive integer"),
           ({"global_batch_size": 6, "process_count": 4}, r"global_batch_size=6 .* 4"),
           ({"in_memory": False}, r"in_memory=False")]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      _pipeline(empty, **kwargs)
  assert os.listdir(empty) == []
  with pytest.raises(ValueError, match=r"valid text datasets: lm1b, pydoc, tiny_shakespeare"):
    data.LMInputPipeline("wikitext", global_batch_size=8, seed=0, sequence_length=8)


def test_dataset_catalog_finds_text_datasets_and_lists_all_names():
  assert data.get_dataset_spec("pydoc").tfds_name == "pydoc_topics"
  assert data.get_dataset_spec("lm1b").input_kind == "tokens"
  with pytest.raises(ValueError, match=r"valid datasets: cifar10, .*mnist1d; text datasets: "
                                       r"lm1b, pydoc, tiny_shakespeare"):
    data.get_dataset_spec("wikitext")


def test_prompts_are_seeded_prefixes_of_eval_windows(pydoc_dir):
  pipeline = _pipeline(pydoc_dir)
  prompts = pipeline.prompts("eval", 6, 16, seed=0)
  assert prompts.shape == (6, 16) and prompts.dtype == np.int32
  np.testing.assert_array_equal(prompts, pipeline.prompts("eval", 6, 16, seed=0))
  assert not np.array_equal(prompts, pipeline.prompts("eval", 6, 16, seed=1))
  windows = np.concatenate([b["tokens"][:, :16] for b in pipeline.eval_batches(40)])
  for prompt in prompts:
    assert (windows == prompt).all(1).any()
  assert (prompts != BYTE.pad_id).all()
  with pytest.raises(ValueError, match=r"prompt_length=65 must be in \[1, sequence_length=64\]"):
    pipeline.prompts("eval", 1, 65, seed=0)
  with pytest.raises(ValueError, match=r"num=100000 prompts"):
    pipeline.prompts("eval", 100_000, 16, seed=0)


def test_bpe_pipeline_trains_its_tokenizer_on_the_training_split_only(pydoc_dir, bpe_512,
                                                                      tmp_path):
  pipeline = _pipeline(pydoc_dir, tokenizer="bpe", vocab_size=512, tokenizer_dir=str(tmp_path))
  trained_on_train, _ = bpe_512  # Trained on the training documents alone (fixture).
  assert tokenization.fingerprint(pipeline.tokenizer) == tokenization.fingerprint(
      trained_on_train)
  assert pipeline.spec.num_classes == 512
  evaluation = _split_documents(pydoc_dir, "eval")
  reference = []
  for name in sorted(evaluation):
    reference += [1] + trained_on_train.encode(evaluation[name]) + [2]
  batches = list(pipeline.eval_batches(16))
  tokens, targets, mask = (np.concatenate([b[k] for b in batches])
                           for k in ("tokens", "targets", "mask"))
  np.testing.assert_array_equal(_stream_from_windows(tokens, targets, mask), reference)
  reused = _pipeline(pydoc_dir, tokenizer="bpe", vocab_size=512, tokenizer_dir=str(tmp_path))
  np.testing.assert_array_equal(reused.train_batch(3)["tokens"], pipeline.train_batch(3)["tokens"])


@pytest.mark.parametrize("dataset", ["tiny_shakespeare", "lm1b"])
def test_unprepared_real_text_dataset_fails_fast_with_instructions(dataset, tmp_path):
  start = time.perf_counter()
  name = text_catalog.get_text_dataset_spec(dataset).tfds_name
  with pytest.raises(data.DatasetNotPreparedError, match=rf"tfds build {name} .*array_record"):
    data.LMInputPipeline(dataset, global_batch_size=8, seed=0, sequence_length=8,
                         data_dir=str(tmp_path))
  assert time.perf_counter() - start < 30  # No download retries.


class KdjaxTestText(tfds.core.GeneratorBasedBuilder):
  """A stand-in for a real `tfds build` text dataset (tiny_shakespeare's layout)."""

  VERSION = tfds.core.Version("1.0.0")
  DOCUMENTS = {"train": ["First Citizen:\nBefore we proceed any further, hear me speak.\n",
                         "All:\nSpeak, speak.\n", "Ünïcödé line — ok\n"],
               "validation": ["MENENIUS:\nWhat work's, my countrymen, in hand?\n"],
               "test": ["Second Citizen:\nWould you proceed especially against Caius?\n"]}

  def _info(self):
    features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(docs) for split, docs in self.DOCUMENTS.items()}

  def _generate_examples(self, documents):
    for i, text in enumerate(documents):
      yield i, {"text": text}


def test_a_prepared_real_text_dataset_goes_through_the_tfds_path(tmp_path, monkeypatch):
  directory = str(tmp_path)
  KdjaxTestText(data_dir=directory, file_format="array_record").download_and_prepare()
  spec = text_catalog.TextDatasetSpec(tfds_name="kdjax_test_text", eval_split="test")
  assert spec.local_builder is None  # As tiny_shakespeare / lm1b: read via tfds.data_source.
  monkeypatch.setitem(text_catalog.TEXT_DATASETS, "test_text", spec)
  pipeline = data.LMInputPipeline("test_text", global_batch_size=2, seed=0, sequence_length=16,
                                  data_dir=directory)
  source = tfds.data_source("kdjax_test_text", split="train", data_dir=directory)
  texts = [source[i]["text"].decode() for i in range(len(source))]  # The source's own order.
  assert sorted(texts) == sorted(KdjaxTestText.DOCUMENTS["train"])
  reference = _byte_stream(texts)
  n = pipeline.num_train_examples
  assert n == -(-len(reference) // 17)
  batches = [pipeline.train_batch(step) for step in range(-(-n // 2))]
  tokens, targets, mask, index = (np.concatenate([b[k] for b in batches])
                                  for k in ("tokens", "targets", "mask", "index"))
  first = np.unique(index, return_index=True)[1]  # One epoch, then the next one begins.
  assert len(first) == n
  rebuilt = _stream_from_windows(tokens[first], targets[first], mask[first])
  np.testing.assert_array_equal(rebuilt, reference)
  eval_text = KdjaxTestText.DOCUMENTS["test"][0]
  assert pipeline.num_eval_tokens == len(eval_text.encode()) + 2
