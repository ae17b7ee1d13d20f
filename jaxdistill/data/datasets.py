"""The dataset of a run, chosen by config.data.name: the bundled benchmark ("fashion_grid",
data/benchmark.py) or a real one (data/real/dataset.py). Both answer `fill_model_inputs`,
`train_dataset`, `num_train`, `eval_split`, `train_sample`, `tokenizer`, `vocab_size` and
`special_ids`."""

from __future__ import annotations

import ml_collections

from jaxdistill.data.benchmark import NAME as BENCHMARK, Benchmark, prepare_benchmark
from jaxdistill.data.real.dataset import NAMES as REAL_NAMES, RealData

NAMES = (BENCHMARK,) + REAL_NAMES


def prepare_data(config: ml_collections.ConfigDict, workdir: str | None) -> Benchmark | RealData:
  """config.data's dataset, with the workdir's tokenizer (written there by the run's first start)."""
  if config.data.get("name", BENCHMARK) == BENCHMARK:
    return prepare_benchmark(config, workdir)
  return RealData(config, workdir)


def train_split_name(config: ml_collections.ConfigDict) -> str:
  """The split a run trains on: config.data.train_split, "" = the dataset's ("train"; Karpathy
  COCO: "train+restval")."""
  return config.data.get("train_split", "") or "train"
