"""The offline teacher feature cache (jaxdistill/teachers/cache.py): round trip keyed by image id,
the cross-encoder bank, resume after an interruption (in-process failure and SIGKILL of
--mode=cache_teacher) equal to an uninterrupted run, never a half-written cache visible."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdistill.data.pipeline import eval_arrays
from jaxdistill.teachers.cache import CacheError, FeatureCache, cache_split
from jaxdistill.teachers.workdir import from_workdir
from tests.test_teachers import tiny_run  # noqa: F401 - the shared session fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, BATCH, TOP_N = 24, 8, 4
ARRAYS = ("image_ids", "image_emb", "text_emb", "valid", "i2t_index", "i2t_score", "t2i_index",
          "t2i_score")


@pytest.fixture(scope="module")
def setup(tiny_run):
  workdir, _, bench, _ = tiny_run
  split = bench.splits["test"]
  data = dict(images=eval_arrays(split, *bench.tokens["test"])["image"][:N],
              captions=split.captions[:N], image_ids=split.image_ids[:N])
  val_images = eval_arrays(bench.splits["val"], *bench.tokens["val"])["image"]
  return workdir, from_workdir(str(workdir)), data, val_images


def _cache(teacher, data, out_dir, cross="same", top_n=TOP_N, log=lambda line: None):
  return cache_split(teacher, teacher if cross == "same" else cross, **data, out_dir=str(out_dir),
                     batch_size=BATCH, top_n=top_n, log=log)


def test_round_trip_keyed_by_id(setup, tmp_path):
  _, teacher, data, _ = setup
  cache = FeatureCache(_cache(teacher, data, tmp_path / "test"))
  assert sorted(os.listdir(tmp_path)) == ["test"]          # no partial directory left behind
  assert cache.meta["invalid_rows"] == 0 and cache.has_bank
  ids = data["image_ids"][[5, 0, 17]]
  got = cache.lookup(ids)
  ids_, mask_ = teacher.tokenize([t for caps in data["captions"] for t in caps])
  images = data["images"][[5, 0, 17]]
  np.testing.assert_allclose(got["image_emb"], teacher.embed_images(teacher.params, images), atol=1e-5)
  text_rows = (np.array([5, 0, 17])[:, None] * 5 + np.arange(5)).reshape(-1)
  want_txt = teacher.embed_texts(teacher.params, ids_[text_rows], mask_[text_rows])
  np.testing.assert_allclose(got["text_emb"].reshape(15, -1), want_txt, atol=1e-5)
  # The bank: each image's top-N captions by teacher similarity, scored by the cross teacher.
  all_txt = cache.text_emb.reshape(N * 5, -1)
  sim = got["image_emb"] @ all_txt.T
  np.testing.assert_array_equal(got["i2t_index"], np.argsort(-sim, axis=1)[:, :TOP_N])
  cand = got["i2t_index"].reshape(-1)
  # P(match): the sigmoid of the ITM log-odds, every pair through the whole network
  want_scores = jax.nn.sigmoid(teacher.match_scores(teacher.params, np.repeat(images, TOP_N, axis=0),
                                                    ids_[cand], mask_[cand]))
  np.testing.assert_allclose(got["i2t_score"].reshape(-1), want_scores, atol=1e-5)
  t2i_rows = np.array([3, 40, 89])
  want_t2i = jax.nn.sigmoid(teacher.match_scores(
      teacher.params, data["images"][cache.t2i_index[t2i_rows].reshape(-1)],
      np.repeat(ids_[t2i_rows], TOP_N, axis=0), np.repeat(mask_[t2i_rows], TOP_N, axis=0)))
  np.testing.assert_allclose(cache.t2i_score[t2i_rows].reshape(-1), want_t2i, atol=1e-5)
  assert cache.t2i_index.shape == (N * 5, TOP_N) and np.all(cache.t2i_index < N)
  with pytest.raises(KeyError, match="image id 123456789 is not in the teacher cache"):
    cache.lookup([123456789])
  i2t_only = FeatureCache(cache_split(teacher, teacher, **data, out_dir=str(tmp_path / "i2t" / "test"),
                                      batch_size=BATCH, top_n=TOP_N, bank=("i2t",), log=lambda line: None))
  np.testing.assert_array_equal(i2t_only.i2t_score, cache.i2t_score)
  assert "t2i_score" not in i2t_only.meta["arrays"]
  # The same bank read by offline CPRD (methods/cprd.py load_bank): P(match) as stored.
  from jaxdistill.config import ConfigError
  from jaxdistill.methods.cprd import load_bank
  bank = load_bank(str(tmp_path / "test"), data["image_ids"], 5)
  np.testing.assert_array_equal(bank["i2t_scores"], cache.i2t_score)
  np.testing.assert_array_equal(bank["t2i_keys"], cache.t2i_index)
  with pytest.raises(ConfigError, match="cprd.bank_dir=.*another train split"):
    load_bank(str(tmp_path / "test"), data["image_ids"] + 1, 5)
  with pytest.raises(ConfigError, match="no i2t \\+ t2i cross bank"):
    load_bank(str(tmp_path / "i2t" / "test"), data["image_ids"], 5)
  from jaxdistill.errors import JaxDistillError
  with pytest.raises(JaxDistillError, match="no finished teacher cache at .*/nowhere"):
    load_bank(str(tmp_path / "nowhere"), data["image_ids"], 5)


def test_interrupted_run_resumes_to_the_same_cache(setup, tmp_path):
  _, teacher, data, _ = setup
  reference = FeatureCache(_cache(teacher, data, tmp_path / "reference" / "test"))
  calls = {"n": 0}

  def failing(params, *inputs):   # dies in the middle of the t2i phase
    calls["n"] += 1
    if calls["n"] > 5:
      raise RuntimeError("injected failure")
    return teacher.pair_outputs(params, *inputs)

  out = tmp_path / "resumed" / "test"
  with pytest.raises(RuntimeError, match="injected"):
    _cache(teacher, data, out, cross=dataclasses.replace(teacher, pair_outputs=failing))
  assert not out.exists()                                   # nothing visible under the final name
  with pytest.raises(CacheError, match="unfinished cache"):
    FeatureCache(str(out))
  progress = json.loads((out.parent / ".test.partial" / "progress.json").read_text())
  assert progress["done"]["embed"] == N and progress["done"]["i2t"] == N
  assert 0 < progress["done"]["t2i"] < N * 5
  with pytest.raises(CacheError, match="delete"):   # other settings never continue this partial cache
    _cache(teacher, data, out, top_n=2)
  lines = []
  resumed = FeatureCache(_cache(teacher, data, out, log=lines.append))
  assert any("resuming t2i" in line for line in lines)
  assert sorted(os.listdir(out.parent)) == ["test"]
  for name in ARRAYS:
    np.testing.assert_array_equal(getattr(resumed, name), getattr(reference, name), err_msg=name)


def test_non_finite_rows_are_skipped_and_counted(setup, tmp_path):
  _, teacher, data, _ = setup
  images = data["images"].copy()
  images[3] = np.nan
  cache = FeatureCache(_cache(teacher, dict(data, images=images), tmp_path / "test", cross=None))
  assert cache.meta["invalid_rows"] == 1 and not cache.has_bank
  assert not cache.valid[3] and cache.valid.sum() == N - 1
  assert np.all(cache.image_emb[3] == 0) and np.all(np.isfinite(cache.image_emb))


def test_sigkill_then_rerun_of_cache_teacher_mode(setup, tmp_path):
  workdir, teacher, _, val_images = setup
  out = tmp_path / "student"
  command = [sys.executable, "-m", "jaxdistill.main", "--config=configs/loopitr.py:tiny",
             f"--workdir={out}", "--mode=cache_teacher", "--config.teacher_cache.teacher=offline",
             "--config.teachers.offline.kind=workdir", f"--config.teachers.offline.path={workdir}",
             "--config.teacher_cache.batch_size=8", "--config.teacher_cache.top_n=4",
             "--config.teacher_cache.splits=val"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  progress = out / "teacher_cache" / ".val.partial" / "progress.json"
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if progress.exists() and json.loads(progress.read_text())["done"]["i2t"] > 0:
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.stdout.read()
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert not (out / "teacher_cache" / "val").exists()
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "resuming" in done.stdout, done.stdout
  assert sorted(os.listdir(out / "teacher_cache")) == ["val"]
  cache = FeatureCache(str(out / "teacher_cache" / "val"))
  assert cache.meta["invalid_rows"] == 0 and cache.valid.all()
  rows = [0, 7, 31]
  np.testing.assert_allclose(cache.image_emb[rows],
                             teacher.embed_images(teacher.params, val_images[rows]), atol=1e-5)
