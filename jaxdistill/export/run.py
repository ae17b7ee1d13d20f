"""--mode=export: a workdir's latest checkpoint -> `<workdir>/export/`:

  image_encoder.tflite   images float32 [B, H, W, C] normalised -> embedding float32 [B, E]
                         (B = config.export.image_batch_size, default 1)
  text_encoder.tflite    ids int32 [1, L], mask int32 [1, L] -> embedding float32 [1, E]
  tokenizer.json         the run's tokenizer
  manifest.json          signatures, normalisation, versions, config, checksums, parity
                         (int8_full: each tower's calibration: train examples drawn, rewrites)

  python -m jaxdistill.main --config=configs/loopitr.py --workdir=runs/loopitr --mode=export \
      [--config.export.quantization=none|float16|int8|int8_full]

One code path for every run: the network comes from the run's own config.json (store/run.py,
no recipe or teacher is built) and its towers' `embed_image` / `embed_text` (the embedding, [0])
are closed over the params; the export settings come from the command's config. `export_towers` takes params directly (a teacher
exported from an initialisation, in benchmarks/export.py); `run` restores them and calls it.
Files are written into a temporary directory next to export/, checked for parity, then renamed
into place: a failed export (bad workdir, incompatible checkpoint, unconvertible op, missed
parity bar) leaves export/ as it was and no partial files.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time

import jax
import ml_collections
import numpy as np

from jaxdistill.atomic import write_json_atomic
from jaxdistill.data.benchmark import TOKENIZER_FILE, Benchmark, prepare_benchmark
from jaxdistill.data.compositional import IMAGE_MEAN, IMAGE_STD, normalize_images
from jaxdistill.data.tokenizer import save_tokenizer
from jaxdistill.errors import JaxDistillError
from jaxdistill.evaluate.retrieval import embed_in_batches
from jaxdistill.export import ExportError, manifest, parity, tflite
from jaxdistill.models.build import Towers
from jaxdistill.search import MANIFEST, load_export
from jaxdistill.store.run import load_run

EXPORT_DIR = "export"
IMAGE_FILE, TEXT_FILE = "image_encoder.tflite", "text_encoder.tflite"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Exports the latest checkpoint of `workdir` into `<workdir>/export`; returns the manifest."""
  return export_towers(*restore_student(config, workdir), os.path.join(workdir, EXPORT_DIR))


def restore_student(config: ml_collections.ConfigDict, workdir: str
                    ) -> tuple[Towers, dict, ml_collections.ConfigDict, Benchmark, dict]:
  """(towers, params, config, benchmark, source) of the latest checkpoint of `workdir`, the
  first arguments of `export_towers`; config = the run's own, with this command's export and
  eval sections."""
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(checkpoints):
    raise ExportError(f"{checkpoints} does not exist: --workdir must be a training run's directory "
                      f"(train first: --mode=train --workdir={workdir})")
  try:
    run = load_run(workdir, dtype="float32")   # a bfloat16-trained run exports a float32 graph
  except JaxDistillError as e:
    raise ExportError(str(e)) from None
  except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types for bad files
    reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
    raise ExportError(f"the checkpoint in {checkpoints} is unreadable ({reason}): re-train or "
                      "point --workdir at a complete run") from e
  if run.config.data.get("name", "fashion_grid") != "fashion_grid":
    raise ExportError(f"--workdir={workdir} was trained on {run.config.data.name}: --mode=export "
                      "checks parity and calibrates on the bundled benchmark's images and "
                      "normalisation, so it exports benchmark runs only for now")
  run_config = ml_collections.ConfigDict(run.config.to_dict())
  run_config.export, run_config.eval = config.export, config.eval
  bench = prepare_benchmark(run_config, workdir)   # reads the run's tokenizer, writes nothing
  return run.towers, run.params, run_config, bench, {
      "recipe": run.config.get("method", ""), "workdir": run.workdir, "step": run.step}


def export_towers(towers: Towers, params, config: ml_collections.ConfigDict, bench: Benchmark,
                  source: dict, directory: str, parity_images: int = 0) -> dict:
  """Converts both towers with config.export.quantization, writes them, the tokenizer and the
  manifest into `directory` (replacing it atomically) after the parity check on
  config.export.parity_split (its first `parity_images` images and their captions; 0 = all).
  Returns the manifest; raises ExportError, leaving `directory` untouched, on any failure."""
  m, quantization = config.model, config.export.quantization
  image_batch = config.export.image_batch_size
  image_inputs = [tflite.InputSpec("images", (m.image_size, m.image_size, m.channels), "float32")]
  text_inputs = [tflite.InputSpec("ids", (m.max_len,), "int32"),
                 tflite.InputSpec("mask", (m.max_len,), "int32")]
  embed_image = lambda p, images: towers.embed_image(p, images)[0]
  embed_text = lambda p, ids, mask: towers.embed_text(p, ids, mask)[0]
  image_rep = text_rep = None
  calibration = {"image": {}, "text": {}}
  if quantization == "int8_full":
    image_rep, text_rep, drawn = representative_dataset(bench, config.export.representative_size)
    for tower in calibration.values():
      tower.update(drawn, rewrites={})
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}-")
  try:
    t0 = time.time()
    for file, fn, inputs, what, batch, rep, cal in (
        (IMAGE_FILE, embed_image, image_inputs, "image encoder", image_batch, image_rep,
         calibration["image"]),
        (TEXT_FILE, embed_text, text_inputs, "text encoder", 1, text_rep, calibration["text"])):
      _write_bytes(os.path.join(staging, file), tflite.convert(
          fn, params, inputs, quantization, what, batch, rep, cal.get("rewrites")))
    save_tokenizer(bench.tokenizer, os.path.join(staging, TOKENIZER_FILE))
    extra = lambda tower: {"calibration": calibration[tower]} if calibration[tower] else {}
    entries = dict(
        image=manifest.tower(IMAGE_FILE, image_inputs, image_batch, m.embed_dim, normalization={
            "scale": 255.0, "mean": IMAGE_MEAN, "std": IMAGE_STD}, **extra("image")),
        text=manifest.tower(TEXT_FILE, text_inputs, 1, m.embed_dim, tokenizer=TOKENIZER_FILE,
                            max_len=m.max_len, encoding=manifest.TEXT_ENCODING, **extra("text")),
        file_table=manifest.files(staging, (IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE)),
        quantization=quantization, source={**source, "convert_seconds": round(time.time() - t0, 1)},
        config=json.loads(config.to_json_best_effort()))
    write_json_atomic(os.path.join(staging, MANIFEST), manifest.build(**entries))
    result = _parity(load_export(staging), functools.partial(embed_image, params),
                     functools.partial(embed_text, params), bench, config.export.parity_split,
                     quantization, parity_images, config.eval.batch_size)
    print(parity.format_result(result), flush=True)
    write_json_atomic(os.path.join(staging, MANIFEST), manifest.build(**entries, parity=result))
    parity.check(result)
    _publish(staging, directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  print(f"exported {source.get('recipe', 'the student')} ({quantization}) to {directory}: " + ", ".join(
      f"{name} {entry['bytes'] / 2**20:.2f} MiB" for name, entry in entries["file_table"].items()),
      flush=True)
  return manifest.build(**entries, parity=result)


def representative_dataset(bench: Benchmark, size: int, seed: int = 0
                           ) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
  """int8_full's calibration inputs from the benchmark's train split: `size` images drawn with
  `seed` (normalised, [N, H, W, C]) and one caption of each ([N, L] ids and mask). Returns
  ([images], [ids, mask], what was drawn for the manifest)."""
  images = bench.splits["train"].images
  ids, mask = bench.tokens["train"]                  # [N_train, captions, L]
  rng = np.random.default_rng(seed)
  rows = np.sort(rng.choice(len(images), min(size, len(images)), replace=False))
  caption = rng.integers(ids.shape[1], size=len(rows))
  return ([normalize_images(images[rows])], [ids[rows, caption], mask[rows, caption]],
          {"split": "train", "examples": len(rows), "seed": seed})


def _parity(exported, embed_image, embed_text, bench: Benchmark, split: str, quantization: str,
            num_images: int, batch_size: int) -> dict:
  """parity.measure on the split's first `num_images` images (0 = all) and their captions."""
  images = bench.splits[split].images
  ids, mask = bench.tokens[split]
  n = num_images or len(images)
  length = ids.shape[-1]
  images, ids, mask = images[:n], ids[:n].reshape(-1, length), mask[:n].reshape(-1, length)
  caption_to_image = np.repeat(np.arange(n), bench.tokens[split][0].shape[1])
  image_fn, text_fn = jax.jit(embed_image), jax.jit(embed_text)
  jax_image = embed_in_batches(lambda a: image_fn(a["x"]), {"x": normalize_images(images)},
                               batch_size)
  jax_text = embed_in_batches(lambda a: text_fn(a["ids"], a["mask"]), {"ids": ids, "mask": mask},
                              batch_size)
  return parity.measure(exported, quantization, images, ids, mask, caption_to_image,
                        jax_image, jax_text)


def _write_bytes(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def _publish(staging: str, directory: str) -> None:
  """Moves `staging` to `directory`, replacing an older export (two renames, then a delete)."""
  os.chmod(staging, 0o755)   # mkdtemp makes 0o700; an export is for sharing
  for name in os.listdir(staging):
    os.chmod(os.path.join(staging, name), 0o644)
  old = None
  if os.path.exists(directory):
    old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(directory)),
                           prefix=f".{os.path.basename(directory)}-old-")
    os.rename(directory, os.path.join(old, "previous"))
  os.rename(staging, directory)
  if old:
    shutil.rmtree(old, ignore_errors=True)
