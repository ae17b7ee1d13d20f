"""Full-integer int8 export (`export.quantization=int8_full`, export/int8.py): a tiny dual
encoder with a BERT text tower (exact-erf GELU, masked attention, LayerNorms) and a ViT image
tower, exported through `--mode=export`'s path with a representative dataset from the train
split, runs in the LiteRT interpreter with integer tensors between its QUANTIZE input and
DEQUANTIZE output, has the manifest's signatures and stays close to the JAX towers; the jaxpr
rewrites keep the function; the EfficientNet tower's resize is jax.image.resize."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from conftest import recipe_config
from jaxdistill.config import ConfigError, validate
from jaxdistill.data.compositional import normalize_images
from jaxdistill.export import ExportError, int8, parity, tflite
from jaxdistill.export import run as export_run
from jaxdistill.models.build import build_model, towers
from jaxdistill.models.towers import bilinear_resize
from jaxdistill.teachers.workdir import init_workdir

NUM_CHECK = 16
FLOAT_EDGES = {"QUANTIZE", "DEQUANTIZE"}   # float32 in -> int8, int8 -> float32 out


def _config():
  """The tiny preset with a 1-layer BERT text tower (MiniLM's kind, exact-erf GELU)."""
  c = recipe_config("dual", "tiny")
  m = c.model
  m.text_tower, m.text_pool, m.bert_hidden_act = "bert", "mean", "gelu"
  m.text_width, m.text_layers, m.text_heads, m.text_mlp = 32, 1, 2, 64
  m.bert_max_positions = 64
  c.export.quantization = "int8_full"
  c.export.representative_size = 64
  return c


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(workdir, params, manifest): an initialised tiny run exported with int8_full (parity on
  its 64 test images with the R@1 bar lifted: a random tiny model ranks by noise)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _config()
  _, params = init_workdir(config, workdir, seed=3)
  mp = pytest.MonkeyPatch()
  mp.setitem(parity.T2I_R1_MAX_GAP, "int8_full", 100.0)
  try:
    manifest = export_run.run(_config(), workdir)
  finally:
    mp.undo()
  return workdir, params, manifest


def _student(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    model_config = json.load(f)["model"]
  import ml_collections
  return towers(build_model(ml_collections.ConfigDict(model_config)))


def _run(path, **inputs):
  """Each row through the model's serving_default runner (batch 1) -> [N, E]; interpreter."""
  interpreter = Interpreter(model_path=path)
  runner = interpreter.get_signature_runner("serving_default")
  n = len(next(iter(inputs.values())))
  out = np.concatenate([runner(**{k: v[i:i + 1] for k, v in inputs.items()})["embedding"]
                        for i in range(n)])
  return out, interpreter, runner


def _cos(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_int8_full_runs_integer_and_close_to_jax(exported):
  workdir, params, manifest = exported
  out = os.path.join(workdir, "export")
  assert manifest["quantization"] == "int8_full"
  from jaxdistill.data.benchmark import prepare_benchmark
  bench = prepare_benchmark(_config(), workdir)
  images = bench.splits["test"].images[:NUM_CHECK]
  ids, mask = (t[:NUM_CHECK, 0] for t in bench.tokens["test"])
  student = _student(workdir)
  x = normalize_images(images)
  jax_image = np.asarray(student.embed_image(params, jnp.asarray(x))[0])
  jax_text = np.asarray(student.embed_text(params, ids, mask)[0])

  for tower, inputs, reference in (("image", {"images": x}, jax_image),
                                   ("text", {"ids": ids, "mask": mask}, jax_text)):
    spec = manifest[f"{tower}_encoder"]
    got, interpreter, runner = _run(os.path.join(out, spec["file"]), **inputs)
    # The signature is the manifest's: names, shapes, dtypes in and out.
    details = runner.get_input_details()
    assert {s["name"]: (s["shape"], s["dtype"]) for s in spec["inputs"]} == {
        name: (d["shape"].tolist(), np.dtype(d["dtype"]).name) for name, d in details.items()}
    output = runner.get_output_details()["embedding"]
    assert output["shape"].tolist() == spec["output"]["shape"] == [1, 32]
    assert np.dtype(output["dtype"]).name == spec["output"]["dtype"] == "float32"
    # Every op between the float edges is integer: int8 activations and weights, int32 biases,
    # ids and indices, bool masks; float32 only on the signature's own tensors. (Read without
    # the default XNNPack delegate, which replaces the ops it runs by DELEGATE nodes.)
    plain = Interpreter(model_path=os.path.join(out, spec["file"]), experimental_op_resolver_type=
                        OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    plain.allocate_tensors()
    tensors = {d["index"]: d for d in plain.get_tensor_details()}
    float_ops = []
    for op in plain._get_ops_details():
      used = [i for i in (*op["inputs"], *op["outputs"]) if i >= 0]
      dtypes = {np.dtype(tensors[i]["dtype"]).name for i in used}
      if op["op_name"] in FLOAT_EDGES:
        assert "int8" in dtypes, op
      elif dtypes - {"int8", "int32", "bool"}:
        float_ops.append((op["op_name"], sorted(dtypes)))
    assert float_ops == [], float_ops
    n_int8 = sum(np.dtype(d["dtype"]).name == "int8" for d in tensors.values())
    assert n_int8 > 10
    # Close to JAX (a random tiny model: int8 rounding of small weights, not a trained model's
    # parity, which docs/export.md gives on the mobile student).
    cos = _cos(got, reference)
    assert cos.min() > 0.9, (tower, cos.min())
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=0.05)
    assert spec["calibration"]["split"] == "train" and spec["calibration"]["examples"] == 64

  rewrites = manifest["text_encoder"]["calibration"]["rewrites"]
  assert rewrites["erf"] >= 1 and rewrites["sum_of_squares"] >= 1 and rewrites["mask_casts"] == 1
  assert len(rewrites["masked_selects"]) == 1
  p = manifest["parity"]
  assert p["quantization"] == "int8_full" and p["cosine_min_bar"] == parity.COSINE_MIN["int8_full"]
  assert min(p["image_cosine_min"], p["text_cosine_min"]) >= p["cosine_min_bar"]


def test_legalize_keeps_the_function_and_bounds_the_fills(exported):
  """The rewritten text tower equals the original up to the erf approximation (4.7e-4 on
  GELU) and carries no constant beyond FILL_LIMIT any more."""
  workdir, params, _ = exported
  student = _student(workdir)
  from jaxdistill.data.benchmark import prepare_benchmark
  bench = prepare_benchmark(_config(), workdir)
  ids, mask = (t[:, 0] for t in bench.tokens["train"])
  fn = lambda p, i, m: student.embed_text(p, i, m)[0]
  legal, report = int8.legalize(fn, params, [ids[:8], mask[:8]])
  assert report["erf"] >= 1 and len(report["masked_selects"]) == 1
  lo, hi = report["masked_selects"][0]["min"], report["masked_selects"][0]["max"]
  assert np.isfinite([lo, hi]).all() and lo < hi

  test_ids, test_mask = (t[:8, 0] for t in bench.tokens["test"])
  want = np.asarray(jax.jit(fn)(params, test_ids[:1], test_mask[:1]))
  got = np.asarray(jax.jit(legal)(params, test_ids[:1], test_mask[:1]))
  np.testing.assert_allclose(got, want, atol=2e-3)

  def constants(closed):
    for eqn in closed.jaxpr.eqns:
      for v in eqn.invars:
        if hasattr(v, "val"):
          yield np.asarray(v.val)
    yield from (np.asarray(c) for c in closed.consts)
  before = jax.make_jaxpr(fn)(params, test_ids[:1], test_mask[:1])
  after = jax.make_jaxpr(legal)(params, test_ids[:1], test_mask[:1])
  huge = lambda closed: [c for c in constants(closed)
                         if c.dtype.kind == "f" and c.size and np.abs(c).max() >= int8.FILL_LIMIT]
  assert huge(before) and not huge(after)


def test_int8_full_needs_a_representative_dataset():
  spec = [tflite.InputSpec("x", (4,), "float32")]
  with pytest.raises(ExportError, match="int8_full export of the probe needs a representative"):
    tflite.convert(lambda p, x: x * p, jnp.ones(()), spec, "int8_full", "probe")
  config = _config()
  config.export.image_batch_size, config.export.representative_size = 8, 4
  with pytest.raises(ConfigError, match="representative_size=4 must be at least"):
    validate(config, 1, mode="export")


def test_resize_is_jax_image_resize():
  """The EfficientNet tower's bilinear resize (constant matrices, models/towers.py)."""
  x = np.random.default_rng(0).normal(size=(2, 56, 28, 3)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(bilinear_resize, static_argnums=1)(x, 64),
                             jax.image.resize(x, (2, 64, 64, 3), "bilinear"), atol=1e-5)
