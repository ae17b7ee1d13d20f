"""`python -m jaxdistill.search` on a real export (tiny LoopITR towers from an initialisation,
exported through the same `export_towers` as a checkpoint) and a folder of the test split's
images as PNG files: no JAX or TensorFlow in its process, its top-10 hits for 20 captions equal
to what the JAX towers rank, unreadable images skipped and counted, clear errors (one line,
exit status 2) for bad arguments, a corrupt index, model file or manifest."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import recipe_config
from jaxdistill.data.benchmark import prepare_benchmark
from jaxdistill.data.compositional import normalize_images
from jaxdistill.evaluate.retrieval import recall_at_k
from jaxdistill.export.run import export_towers
from jaxdistill.models.build import build_model, init_params, towers
from jaxdistill.search import SearchError, load_export, load_index, sha256, top_k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_QUERIES = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(export dir, image dir, bench, JAX image emb [64, E], JAX text emb [320, E])."""
  root = tmp_path_factory.mktemp("search")
  config = recipe_config("loopitr")
  bench = prepare_benchmark(config, str(root))
  config.model.vocab_size = bench.vocab_size
  model = build_model(config.model)
  student = towers(model)
  params = init_params(model, config.model, jax.random.PRNGKey(3))
  export_towers(student, params, config, bench, {"recipe": "loopitr"}, str(root / "export"),
                parity_images=8)
  images = root / "images"
  images.mkdir()
  for i, image in enumerate(bench.splits["test"].images):
    Image.fromarray(image).save(images / f"{i:03d}.png")
  ids, mask = (t.reshape(-1, t.shape[-1]) for t in bench.tokens["test"])
  images_normalized = normalize_images(bench.splits["test"].images)
  jax_image = np.asarray(student.embed_image(params, images_normalized)[0])
  jax_text = np.asarray(student.embed_text(params, ids, mask)[0])
  return str(root / "export"), str(images), bench, jax_image, jax_text


def _search(*args):
  done = subprocess.run([sys.executable, "-m", "jaxdistill.search", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  return done.returncode, done.stdout, done.stderr


def test_search_without_jax_matches_jax_ranking(setup, tmp_path):
  export_dir, image_dir, bench, jax_image, jax_text = setup
  index = str(tmp_path / "index.npz")
  code, out, err = _search("index", f"--export_dir={export_dir}", f"--images={image_dir}",
                           f"--index={index}")
  assert code == 0, err
  assert "indexed 64 images (0 unreadable" in out
  # 20 captions spread over the split: caption (i % 5) of image 3i.
  rows = [3 * i * 5 + i % 5 for i in range(NUM_QUERIES)]
  captions = [bench.splits["test"].captions[r // 5][r % 5] for r in rows]
  code, out, err = _search("query", f"--export_dir={export_dir}", f"--index={index}", "--k=10",
                           *captions)
  assert code == 0, err
  answers = [json.loads(line) for line in out.splitlines()]
  assert [a["query"] for a in answers] == captions
  hits = [f"{r // 5:03d}.png" in [x["path"] for x in a["results"]] for r, a in zip(rows, answers)]

  # What JAX predicts: each caption's own image among its top 10 of the JAX scores.
  scores = jax_text[rows] @ jax_image.T
  jax_hits = [int(np.sum(s > s[r // 5])) < 10 for r, s in zip(rows, scores)]
  assert sum(h != j for h, j in zip(hits, jax_hits)) <= 1
  p = recall_at_k(jax_image @ jax_text.T, np.repeat(np.arange(64), 5), ks=(10,))["t2i_r10"] / 100
  assert abs(np.mean(hits) - p) <= 3 * np.sqrt(p * (1 - p) / NUM_QUERIES) + 1 / NUM_QUERIES


def test_search_imports_no_jax_or_tensorflow(setup, tmp_path):
  export_dir, image_dir, bench, _, _ = setup
  index = str(tmp_path / "index.npz")
  program = (
      "import sys\n"
      "from jaxdistill import search\n"
      f"assert search._main(['index', '--export_dir={export_dir}', '--images={image_dir}', "
      f"'--index={index}']) == 0\n"
      f"assert search._main(['query', '--export_dir={export_dir}', '--index={index}', "
      "'a bag']) == 0\n"
      "heavy = ('jax', 'jaxlib', 'tensorflow', 'flax')\n"
      "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
      "print('HEAVY', bad)\n")
  done = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert "HEAVY []" in done.stdout


def test_unreadable_images_are_skipped_and_counted(setup, tmp_path):
  export_dir, image_dir, _, _, _ = setup
  folder = tmp_path / "images"
  shutil.copytree(image_dir, folder)
  (folder / "broken.png").write_bytes(b"not a png")
  (folder / "notes.txt").write_text("not an image")
  code, out, _ = _search("index", f"--export_dir={export_dir}", f"--images={folder}",
                         f"--index={tmp_path / 'index.npz'}")
  assert code == 0 and "indexed 64 images (1 unreadable, skipped)" in out


def test_clear_errors(setup, tmp_path):
  export_dir, image_dir, _, _, _ = setup
  code, _, err = _search("index", f"--export_dir={tmp_path / 'none'}", f"--images={image_dir}",
                         f"--index={tmp_path / 'i.npz'}")
  assert code == 2 and err.startswith("error: ") and "manifest.json does not exist" in err
  code, _, err = _search("query", f"--export_dir={export_dir}", f"--index={tmp_path / 'i.npz'}",
                         "x")
  assert code == 2 and "index" in err and "does not exist" in err
  assert not os.path.exists(tmp_path / "i.npz")

  tampered = tmp_path / "export"
  shutil.copytree(export_dir, tampered)
  with open(tampered / "tokenizer.json", "a") as f:
    f.write(" ")
  with pytest.raises(SearchError, match="tokenizer.json is missing or differs from its checksum"):
    load_export(str(tampered))


def _one_error_line(*args) -> str:
  """The single `error: ...` line of a search run that must fail with exit status 2."""
  code, out, err = _search(*args)
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
  assert out == ""
  return lines[0]


def _rewrite_manifest(export_dir, edit) -> None:
  path = os.path.join(export_dir, "manifest.json")
  with open(path) as f:
    manifest = json.load(f)
  edit(manifest)
  with open(path, "w") as f:
    json.dump(manifest, f)


@pytest.mark.parametrize("args,needle", [
    (["--k=-3", "a bag"], "--k=-3 must be at least 1"),
    (["--k=0", "a bag"], "--k=0 must be at least 1"),
    ([""], "query 1 is empty"),
    (["a bag", "   "], "query 2 is empty"),
])
def test_bad_query_arguments(setup, tmp_path, args, needle):
  export_dir = setup[0]
  line = _one_error_line("query", f"--export_dir={export_dir}", f"--index={tmp_path / 'i.npz'}",
                         *args)
  assert needle in line


def test_truncated_index(setup, tmp_path):
  export_dir, image_dir, _, _, _ = setup
  index = tmp_path / "index.npz"
  assert _search("index", f"--export_dir={export_dir}", f"--images={image_dir}",
                 f"--index={index}")[0] == 0
  data = index.read_bytes()
  index.write_bytes(data[:len(data) // 2])
  line = _one_error_line("query", f"--export_dir={export_dir}", f"--index={index}", "a bag")
  assert f"index {index} is not a readable index" in line and "rebuild it" in line


@pytest.mark.parametrize("cut", [False, True])
def test_tflite_that_is_not_a_flatbuffer(setup, tmp_path, cut):
  """A model file whose checksum matches the manifest but which LiteRT cannot read: overwritten
  with other bytes, or truncated."""
  export = tmp_path / "export"
  shutil.copytree(setup[0], export)
  model = export / "text_encoder.tflite"
  data = model.read_bytes()
  model.write_bytes(data[:len(data) // 3] if cut else b"\x00not a flatbuffer" * 64)
  _rewrite_manifest(export, lambda m: m["files"]["text_encoder.tflite"].update(
      sha256=sha256(str(model))))
  line = _one_error_line("query", f"--export_dir={export}", f"--index={tmp_path / 'i.npz'}",
                         "a bag")
  assert f"{model} is not a TFLite model" in line and "re-export" in line


def _drop(*key):
  def edit(manifest):
    node = manifest
    for part in key[:-1]:
      node = node[part]
    del node[key[-1]]
  return edit


@pytest.mark.parametrize("edit,needle", [
    (_drop("files"), "has no files:"),
    (_drop("text_encoder", "max_len"), "has no text_encoder.max_len:"),
    (_drop("image_encoder", "normalization"), "has no image_encoder.normalization.scale:"),
    (_drop("image_encoder", "inputs", 0), "has no image_encoder.inputs[0].name:"),
    (_drop("files", "tokenizer.json"), "has no files.tokenizer.json.sha256:"),
])
def test_manifest_missing_keys(setup, tmp_path, edit, needle):
  export = tmp_path / "export"
  shutil.copytree(setup[0], export)
  _rewrite_manifest(export, edit)
  with pytest.raises(SearchError, match="it is not a complete export manifest; re-export") as info:
    load_export(str(export))
  assert needle in str(info.value)


def test_manifest_missing_key_on_the_command_line(setup, tmp_path):
  export = tmp_path / "export"
  shutil.copytree(setup[0], export)
  _rewrite_manifest(export, _drop("image_encoder", "file"))
  line = _one_error_line("query", f"--export_dir={export}", f"--index={tmp_path / 'i.npz'}", "x")
  assert "manifest.json has no image_encoder.file" in line


def test_index_from_another_model_is_refused(setup, tmp_path):
  export_dir, image_dir, _, _, _ = setup
  index = tmp_path / "index.npz"
  assert _search("index", f"--export_dir={export_dir}", f"--images={image_dir}",
                 f"--index={index}")[0] == 0
  with np.load(index) as data:
    np.savez(index, embeddings=data["embeddings"], paths=data["paths"], image_model="0" * 64)
  with pytest.raises(SearchError, match="another image model"):
    load_index(str(index), load_export(export_dir))


def test_top_k_hand_worked():
  embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], np.float32)
  indices, scores = top_k(embeddings, np.array([[0.0, 1.0], [1.0, 0.0]], np.float32), k=2)
  assert indices.tolist() == [[1, 2], [0, 2]]
  np.testing.assert_allclose(scores, [[1.0, 0.8], [1.0, 0.6]], rtol=1e-6)
  assert top_k(embeddings, embeddings[:1], k=10)[0].shape == (1, 4)   # k capped at N
