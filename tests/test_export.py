"""TFLite export of a trained tiny LoopITR run: real .tflite files run by ai_edge_litert against the
JAX towers (cosine computed here with numpy), the manifest against the files and interpreters,
and the failures (missing workdir, incompatible or corrupt checkpoint, unconvertible op, missed
parity bar) leaving no partial files."""

import dataclasses
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from conftest import recipe_config
from jaxdistill import methods
from jaxdistill.config import ConfigError, validate
from jaxdistill.data.benchmark import prepare_benchmark
from jaxdistill.data.compositional import IMAGE_MEAN, IMAGE_STD
from jaxdistill.export import ExportError, parity
from jaxdistill.export import run as export_run
from jaxdistill.models.build import build_model, init_params, towers
from jaxdistill.store.checkpoint import Checkpointer
from jaxdistill.store.run import STUDENT

NUM_CHECK = 16   # test images (and their first captions) embedded here independently
QUANTIZATIONS = ("none", "float16", "int8")


def _config(quantization="none"):
  c = recipe_config("loopitr")
  c.train.num_steps = 2
  c.train.checkpoint_every = 2
  c.export.quantization = quantization
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  methods.train(_config(), workdir)
  return workdir


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
  """quantization -> (manifest, a copy of its export/); float16 with an image batch of 4."""
  out = {}
  for quantization in QUANTIZATIONS:
    config = _config(quantization)
    config.export.image_batch_size = 4 if quantization == "float16" else 1
    manifest = export_run.run(config, trained)
    assert _leftovers(trained) == []
    copy = tmp_path_factory.mktemp(quantization) / "export"
    shutil.copytree(os.path.join(trained, "export"), copy)
    out[quantization] = manifest, str(copy)
  return out


def _leftovers(workdir):
  return sorted(n for n in os.listdir(workdir) if n.startswith(".export"))


def _reference(workdir):
  """JAX embeddings of NUM_CHECK test images and their first captions, with inputs, computed
  from the raw checkpoint and the model built here from the test's config (not the export's
  restore path; normalisation written out: (x/255 - mean) / std)."""
  config = _config()
  bench = prepare_benchmark(config, workdir)
  config.model.vocab_size = bench.vocab_size
  student = towers(build_model(config.model))
  checkpointer = Checkpointer(workdir)
  params = checkpointer.restore_raw(2)["params"][STUDENT]
  checkpointer.close()
  images = bench.splits["test"].images[:NUM_CHECK]
  x = ((images.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD)[..., None]
  ids, mask = (t[:NUM_CHECK, 0] for t in bench.tokens["test"])
  return (x, ids, mask, np.asarray(student.embed_image(params, jnp.asarray(x))[0]),
          np.asarray(student.embed_text(params, ids, mask)[0]))


def _tflite(path, batch, **inputs):
  interpreter = Interpreter(model_path=path)
  runner = interpreter.get_signature_runner("serving_default")
  n = len(next(iter(inputs.values())))
  return np.concatenate([runner(**{k: v[i:i + batch] for k, v in inputs.items()})["embedding"]
                         for i in range(0, n, batch)]), interpreter, runner


def _cos(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("quantization,bar", [("none", 0.9999), ("float16", 0.999), ("int8", 0.99)])
def test_export_parity(trained, exports, quantization, bar):
  manifest, out = exports[quantization]
  batch = 4 if quantization == "float16" else 1
  assert sorted(os.listdir(out)) == ["image_encoder.tflite", "manifest.json", "text_encoder.tflite",
                                     "tokenizer.json"]
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f) | {"created_utc": None} == manifest | {"created_utc": None}
  for name, entry in manifest["files"].items():
    data = open(os.path.join(out, name), "rb").read()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
  assert manifest["quantization"] == quantization and manifest["source"]["step"] == 2

  x, ids, mask, jax_image, jax_text = _reference(trained)
  # (the interpreters must outlive their runners)
  tfl_image, image_interpreter, runner = _tflite(os.path.join(out, "image_encoder.tflite"), batch,
                                                 images=x)
  tfl_text, text_interpreter, text_runner = _tflite(os.path.join(out, "text_encoder.tflite"), 1,
                                                    ids=ids, mask=mask)
  assert _cos(tfl_image, jax_image).min() >= bar
  assert _cos(tfl_text, jax_text).min() >= bar
  np.testing.assert_allclose(np.linalg.norm(tfl_text, axis=-1), 1.0, atol=1e-3)   # L2-normalised

  # The manifest's signatures are the interpreters' own.
  spec = manifest["image_encoder"]
  details = runner.get_input_details()["images"]
  assert list(details["shape"]) == spec["inputs"][0]["shape"] == [batch, 56, 56, 1]
  assert details["dtype"] == np.float32 and spec["inputs"][0]["dtype"] == "float32"
  output_shape = runner.get_output_details()["embedding"]["shape"].tolist()
  assert output_shape == spec["output"]["shape"] == [batch, 32]
  assert spec["normalization"] == {"scale": 255.0, "mean": IMAGE_MEAN, "std": IMAGE_STD}
  text_details = text_runner.get_input_details()
  assert [list(text_details[s["name"]]["shape"]) for s in manifest["text_encoder"]["inputs"]] == \
      [[1, 32], [1, 32]]
  assert manifest["versions"]["tensorflow-cpu"] == "2.20.0"
  assert manifest["config"]["export"]["quantization"] == quantization

  # The stored parity: the whole test split (64 images, 320 captions), every bar met.
  p = manifest["parity"]
  assert p["passed"] and p["num_images"] == 64 and p["num_texts"] == 320
  assert min(p["image_cosine_min"], p["text_cosine_min"]) >= bar == p["cosine_min_bar"]
  if quantization == "int8":
    assert abs(p["t2i_r1_tflite"] - p["t2i_r1_jax"]) <= 1.0


def test_quantized_models_are_smaller(exports):
  size = {q: exports[q][0]["files"]["image_encoder.tflite"]["bytes"] for q in QUANTIZATIONS}
  assert size["int8"] < 0.6 * size["none"] and size["float16"] < 0.75 * size["none"]


def test_missing_workdir_is_one_clear_error(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(ExportError, match="does not exist.*train first"):
    export_run.run(_config(), str(missing))
  assert not missing.exists()
  # A directory with checkpoints/ but no run config: store.run's error, through restore_student.
  (tmp_path / "bare" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ExportError, match="holds no config.json"):
    export_run.restore_student(_config(), str(tmp_path / "bare"))
  assert not (tmp_path / "bare" / "export").exists() and _leftovers(tmp_path / "bare") == []


def test_incompatible_checkpoint_leaves_export_untouched(trained, exports, tmp_path):
  """The network is built from the run's own config.json: one that does not fit the run's
  checkpoint (embed_dim 16 vs 32) is one ExportError naming the param and both shapes."""
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  before = (workdir / "export" / "manifest.json").read_text()
  run_config = json.loads((workdir / "config.json").read_text())
  run_config["model"]["embed_dim"] = 16
  (workdir / "config.json").write_text(json.dumps(run_config))
  with pytest.raises(ExportError, match=r"checkpoint .*/2: param .*'image_projection'.* has "
                     r"shape \(32,\), expected \(16,\): this run's model config must match"):
    export_run.run(_config(), str(workdir))
  assert (workdir / "export" / "manifest.json").read_text() == before
  assert _leftovers(workdir) == []


def test_corrupt_checkpoint_is_one_clear_error(trained, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "export", ignore_errors=True)
  latest = workdir / "checkpoints" / "2" / "state"
  for root, _, names in os.walk(latest):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(ExportError, match="unreadable"):
    export_run.run(_config(), str(workdir))
  assert not (workdir / "export").exists() and _leftovers(workdir) == []


def test_unconvertible_op_and_missed_parity_leave_nothing(trained, tmp_path, monkeypatch):
  config = _config()
  bench = prepare_benchmark(config, trained)
  config.model.vocab_size = bench.vocab_size
  model = build_model(config.model)
  student = towers(model)
  params = init_params(model, config.model, jax.random.PRNGKey(1))
  out = tmp_path / "export"
  sorting = dataclasses.replace(student, embed_image=lambda p, x, rngs=None: (
      jnp.sort(student.embed_image(p, x)[0], axis=-1), None))
  with pytest.raises(ExportError, match="cannot convert the image encoder.*unsupported ops.*sort"):
    export_run.export_towers(sorting, params, config, bench, {}, str(out))
  assert os.listdir(tmp_path) == []

  monkeypatch.setitem(parity.COSINE_MIN, "none", 1.5)   # a bar no export can meet
  with pytest.raises(ExportError, match="fails parity: image cosine min"):
    export_run.export_towers(student, params, config, bench, {}, str(out), parity_images=8)
  assert os.listdir(tmp_path) == []


def test_parity_figures_hand_worked():
  np.testing.assert_allclose(parity.cosine(np.array([[1.0, 0.0], [3.0, 4.0]]),
                                           np.array([[1.0, 1.0], [6.0, 8.0]])), [2 ** -0.5, 1.0])
  result = {"quantization": "int8", "image_cosine_min": 0.995, "text_cosine_min": 0.98,
            "t2i_r1_jax": 40.0, "t2i_r1_tflite": 38.5, "cosine_min_bar": 0.99,
            "t2i_r1_max_gap": 1.0}
  assert parity.failures(result) == [
      "text cosine min 0.980000 < 0.99", "t2i R@1 38.50 vs JAX 40.00 (gap 1.50 > 1.0 points)"]
  assert parity.failures(result | {"text_cosine_min": 0.991, "t2i_r1_tflite": 39.0}) == []


def test_config_rejects_unknown_quantization():
  config = _config("int4")
  with pytest.raises(ConfigError, match="export.quantization='int4'.*none, float16, int8"):
    validate(config, num_devices=8)
