"""tfds random-access sources (`tfds.data_source`) with `tfds.testing.mock_data`: coco_captions'
Karpathy splits as PairedRecords and through the training and evaluation pipelines, and the
user errors (unknown split, a builder tfds lacks such as Flickr30K, data not prepared)."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jaxdistill.data.real import pipeline, tfds_source  # noqa: E402
from jaxdistill.data.real.image_ops import ImageSpec  # noqa: E402
from jaxdistill.data.real.records import DataError  # noqa: E402
from jaxdistill.data.real.text import TextEncoder  # noqa: E402
from jaxdistill.pretrained.packaged import minilm_dir  # noqa: E402

N = 6
SPEC = ImageSpec(size=24, resize=24)


def test_coco_captions_records_from_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=N):
    source = tfds_source.load_tfds("coco_captions", "test", data_dir=str(tmp_path))
    assert len(source) == N
    records = [source[i] for i in range(N)]
    union = tfds_source.load_tfds("coco_captions", "train+restval", data_dir=str(tmp_path))
    assert len(union) == N
  for record in records:
    assert record.split == "test" and record.error is None
    assert isinstance(record.image, np.ndarray) and record.image.dtype == np.uint8
    assert record.image.ndim == 3 and record.image.shape[-1] == 3
    assert 1 <= len(record.captions) <= 5 and all(isinstance(c, str) for c in record.captions)
    assert isinstance(record.image_id, int) and 0 <= record.image_id < 2**31
    assert record.key                                   # image/filename
  assert len({r.image_id for r in records}) > 1
  with pytest.raises(IndexError):
    source[N]


def test_mock_coco_captions_through_the_pipelines(tmp_path):
  encoder = TextEncoder.from_file(minilm_dir(), max_len=12)
  with tfds.testing.mock_data(num_examples=N):
    source = tfds_source.load_tfds("coco_captions", "train", data_dir=str(tmp_path))
    it = iter(pipeline.train_dataset(source, global_batch_size=3, seed=0, text=encoder,
                                     transform=pipeline.TrainTransform(image=SPEC)))
    batches = [next(it) for _ in range(2)]
    ids = {source[i].image_id for i in range(N)}
    evals = list(pipeline.eval_dataset(source, batch_size=4, image=SPEC))
  assert sorted(np.concatenate([b["image_id"] for b in batches]).tolist()) == sorted(ids)
  for batch in batches:
    assert batch["image"].shape == (3, 24, 24, 3) and batch["text_ids"].shape == (3, 12)
    assert batch["stats"] == {"missing": 0, "corrupt": 0, "no_caption": 0}
  assert len(evals) == 2
  assert np.concatenate([b["valid"] for b in evals]).tolist() == [1] * N + [0, 0]
  assert np.concatenate([b["index"] for b in evals]).tolist() == list(range(N)) + [-1, -1]


def test_unknown_split_and_missing_builder_errors(tmp_path):
  with pytest.raises(DataError, match="unknown split 'validation' of tfds coco_captions: it has "
                                      "train, restval, val, test"):
    tfds_source.load_tfds("coco_captions", "validation", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="no Flickr30K builder.*load_karpathy"):
    tfds_source.load_tfds("flickr30k", "test", data_dir=str(tmp_path))


def test_unprepared_dataset_says_how_to_build_it(tmp_path):
  with pytest.raises(DataError, match=f"not prepared as ArrayRecord under data_dir='{tmp_path}'.*"
                                      "tfds build coco_captions --file_format=array_record"):
    tfds_source.load_tfds("coco_captions", "test", data_dir=str(tmp_path))
  assert not any(tmp_path.iterdir())                    # nothing downloaded or written
