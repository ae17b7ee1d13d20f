r"""Is a 224-px run input-bound? The real-data training pipeline's images/s beside the train
step's examples/s at the same batch, and the two together as the trainer runs them, in one run.

  .venv/bin/python benchmarks/input_pipeline.py                     # 512 synthetic COCO-like JPEGs
  .venv/bin/python benchmarks/input_pipeline.py --num_images=64 --seconds=2 --batch_size=4  # smoke
  .venv/bin/python benchmarks/input_pipeline.py --karpathy_json=/data/coco/dataset_coco.json \
      --image_root=/data/coco                                       # your own Karpathy data

Data: a synthetic fixture (640x480 / 480x640 JPEGs of 1/f-like noise at quality 90, ~150 KB each
like COCO's, and a Karpathy JSON with 5 captions per image), or your Karpathy JSON + image root.
Both are read through `RealData` (config.data.name=karpathy_json) as a training run reads them.

Student: configs/mcad.py:mobile's towers at 224 px (EfficientNet-Lite0, globally pooled, and
MiniLM-L6's first 3 layers with its tokenizer, max_len 36, embed_dim 256) trained by the `dual`
recipe (ITC), built and jitted as the trainer does (train/loop.py build_state + make_train_step);
random weights (step time does not depend on them).

Rows, each timed for at least --seconds after a warm-up batch / step (compilation excluded):
  pipeline   RealData.train_dataset at --batch_size (JPEG decode, RandomResizedCrop to 224, flip,
             normalise, tokenise; prefetch on) per --num_threads value: images/s;
  step       the jitted step on one pipeline batch, re-placed on the device every step as the
             trainer does: examples/s;
  together   the trainer's loop (next batch -> device -> step, one step in flight) with the largest
             --num_threads: what a run on this machine gets when both share its cores.
pipeline / step > 1: the step is the bottleneck; < 1: the run is input-bound. CPU ms per image is
process time over all threads (the fair figure when other jobs share the CPU). The load average
before and after is recorded. Writes --out (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from benchmarks.common import cpu_model, trainer  # noqa: E402
from jaxdistill.atomic import write_json_atomic  # noqa: E402

SIDE = 224
_NOUNS = ("man", "woman", "dog", "cat", "bus", "train", "pizza", "kitchen", "table", "street",
          "horse", "surfboard", "giraffe", "clock", "bench", "laptop", "boat", "field")
_ADJECTIVES = ("small", "large", "red", "white", "young", "old", "wooden", "busy", "empty")
_VERBS = ("sitting on", "standing next to", "walking down", "parked near", "looking at",
          "riding", "lying on", "holding")


def synthetic_jpeg(seed: int, width: int, height: int) -> bytes:
  """A quality-90 JPEG of sum-of-octaves noise (amplitude ~ scale^0.6: smooth regions plus
  texture), ~150 KB at 640x480 like COCO's files."""
  rng = np.random.default_rng(seed)
  pixels = np.zeros((height, width, 3), np.float32)
  for octave in range(1, 9):
    w, h = max(2, width >> (8 - octave)), max(2, height >> (8 - octave))
    noise = rng.normal(size=(h, w, 3)).astype(np.float32)
    layer = [np.asarray(Image.fromarray(noise[..., c], mode="F").resize(
        (width, height), Image.Resampling.BICUBIC)) for c in range(3)]
    pixels += np.stack(layer, -1) / octave ** 0.6
  pixels = np.clip(128 + 50 * (pixels - pixels.mean()) / pixels.std(), 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=90)
  return out.getvalue()


def synthetic_caption(rng: np.random.Generator) -> str:
  pick = lambda words: words[int(rng.integers(len(words)))]
  return (f"A {pick(_ADJECTIVES)} {pick(_NOUNS)} {pick(_VERBS)} a {pick(_ADJECTIVES)} "
          f"{pick(_NOUNS)} in the {pick(_NOUNS)}.")


def write_fixture(root: str, num_images: int) -> tuple[str, str, float]:
  """(dataset_coco.json, image root, mean KB per JPEG): COCO's layout (images/train2014/...), every
  image in split "train", every fourth one portrait (480x640)."""
  folder = os.path.join(root, "images", "train2014")
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)

  def write(i: int) -> int:
    data = synthetic_jpeg(i, *((480, 640) if i % 4 == 3 else (640, 480)))
    with open(os.path.join(folder, f"COCO_train2014_{i:012d}.jpg"), "wb") as f:
      f.write(data)
    return len(data)

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    sizes = list(pool.map(write, range(num_images)))
  entries = [{"filepath": "train2014", "filename": f"COCO_train2014_{i:012d}.jpg", "imgid": i,
              "cocoid": i, "split": "train",
              "sentences": [{"raw": synthetic_caption(rng)} for _ in range(5)]}
             for i in range(num_images)]
  json_path = os.path.join(root, "dataset_coco.json")
  with open(json_path, "w") as f:
    json.dump({"dataset": "coco", "images": entries}, f)
  return json_path, os.path.join(root, "images"), float(np.mean(sizes)) / 1024


def student_config(karpathy_json: str, image_root: str, batch_size: int):
  """configs/dual.py with configs/mcad.py:mobile's towers at 224 px, reading the Karpathy data."""
  from jaxdistill.config import load_config_file
  from jaxdistill.pretrained import tower_configs
  config = load_config_file(os.path.join(REPO, "configs", "dual.py:cpu"))
  tower_configs.efficientnet_lite0(config, "student/", SIDE)
  tower_configs.minilm(config, "student/", 3)
  config.model.bert_hidden_act = "gelu_pytorch_tanh"
  config.model.embed_dim = 256
  config.model.patch_size = SIDE   # one cell: EfficientNet's global average pool
  config.init_from = ()            # random weights: the step's time does not depend on them
  config.batch_size = batch_size
  config.data.update(name="karpathy_json", karpathy_json=karpathy_json, image_root=image_root,
                     image_size=SIDE)
  return config


def time_pipeline(data, config, num_threads: int, seconds: float) -> dict:
  """images/s of RealData.train_dataset with `num_threads` decoding threads, after one batch."""
  from jaxdistill.data.real.pipeline import pop_stats
  config.data.num_threads = num_threads
  batches = iter(data.train_dataset(config, "train", process_index=0, process_count=1))
  next(batches)
  images, wall, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - wall < seconds:
    batch, _ = pop_stats(next(batches))
    images += len(batch["image"])
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  batches.set_state(batches.get_state())   # waits for the prefetched batch: no work left behind
  return {"row": "pipeline", "num_threads": num_threads, "images": images, "seconds": wall,
          "per_s": images / wall, "cpu_ms_per_image": 1000 * cpu / images}


def build_step(data, config, host_batch: dict):
  """(step(state, host batch) -> (state, metrics) as the trainer runs it, initial state,
  parameter count, compile + first-step seconds)."""
  from jaxdistill.data import pipeline
  from jaxdistill.parallel.mesh import make_mesh
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  recipe, built = trainer(config, mesh, pipeline.global_batch_spec(host_batch), data)
  shardings = built["shardings"]
  frozen = jax.device_put(recipe.frozen, shardings["frozen"])
  step = lambda state, batch: built["step"](
      state, pipeline.to_global_batch(batch, shardings["batch"]), frozen)
  state = built["init"]()
  params = sum(x.size for x in jax.tree.leaves(state.params))
  t0 = time.perf_counter()
  state, metrics = step(state, host_batch)
  jax.block_until_ready(metrics)
  return step, state, params, time.perf_counter() - t0


def time_step(step, state, host_batch: dict, seconds: float) -> tuple[dict, object]:
  """examples/s of the step alone on one host batch (at least one step)."""
  steps, wall, cpu = 0, time.perf_counter(), time.process_time()
  while not steps or time.perf_counter() - wall < seconds:
    state, metrics = step(state, host_batch)
    jax.block_until_ready(metrics)
    steps += 1
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  n = steps * len(host_batch["image"])
  return {"row": "step", "steps": steps, "images": n, "seconds": wall, "per_s": n / wall,
          "cpu_ms_per_image": 1000 * cpu / n}, state


def time_together(step, state, data, config, num_threads: int, seconds: float) -> dict:
  """examples/s of the trainer's loop: the pipeline feeds the step, the next batch is made while
  the current step runs (one step in flight), after one warm-up step."""
  from jaxdistill.data.real.pipeline import pop_stats
  config.data.num_threads = num_threads
  batches = iter(data.train_dataset(config, "train", process_index=0, process_count=1))
  state, metrics = step(state, pop_stats(next(batches))[0])
  jax.block_until_ready(metrics)
  steps, wall, cpu = 0, time.perf_counter(), time.process_time()
  while not steps or time.perf_counter() - wall < seconds:
    state, next_metrics = step(state, pop_stats(next(batches))[0])
    jax.block_until_ready(metrics)
    metrics = next_metrics
    steps += 1
  jax.block_until_ready(metrics)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  batches.set_state(batches.get_state())
  n = steps * config.batch_size
  return {"row": "together", "num_threads": num_threads, "steps": steps, "images": n,
          "seconds": wall, "per_s": n / wall, "cpu_ms_per_image": 1000 * cpu / n}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--num_images", type=int, default=512, help="synthetic fixture size")
  ap.add_argument("--data_dir", default="",
                  help="write the synthetic fixture here and keep it (default: a temporary dir)")
  ap.add_argument("--karpathy_json", default="", help="your Karpathy JSON instead of the fixture")
  ap.add_argument("--image_root", default="", help="with --karpathy_json: its image folder")
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--num_threads", default="1,2,4",
                  help="pipeline decoding threads, one row each (4: the trainer's default)")
  ap.add_argument("--seconds", type=float, default=30.0, help="minimum timed seconds per row")
  ap.add_argument("--out", default="runs/bench_input_pipeline.json")
  args = ap.parse_args()
  if bool(args.karpathy_json) != bool(args.image_root):
    ap.error("--karpathy_json and --image_root go together")
  threads = [int(t) for t in args.num_threads.split(",")]

  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    fixture_kb = None
    json_path, image_root = args.karpathy_json, args.image_root
    if not json_path:
      t0 = time.perf_counter()
      json_path, image_root, fixture_kb = write_fixture(args.data_dir or tmp, args.num_images)
      print(f"fixture: {args.num_images} JPEGs, {fixture_kb:.0f} KB mean, "
            f"{time.perf_counter() - t0:.1f} s to write, in {os.path.dirname(json_path)}",
            flush=True)
    from jaxdistill.data.real.dataset import RealData
    from jaxdistill.data.real.pipeline import pop_stats
    config = student_config(json_path, image_root, args.batch_size)
    data = RealData(config, None)
    data.fill_model_inputs(config)   # as the trainer does: vocabulary, 224 px RGB, CLIP constants
    num_train = data.num_train("train")
    print(f"{num_train} training images ({data.train_split}), load average {load_before}",
          flush=True)

    rows = []
    for n in threads:
      rows.append(time_pipeline(data, config, n, args.seconds))
      print(f"  {rows[-1]}", flush=True)
    config.data.num_threads = max(threads)
    host_batch, _ = pop_stats(next(iter(data.train_dataset(config, "train", process_index=0,
                                                           process_count=1))))
    step, state, params, compile_s = build_step(data, config, host_batch)
    step_row, state = time_step(step, state, host_batch, args.seconds)
    rows.append(dict(step_row, params=params, compile_s=compile_s))
    print(f"  {rows[-1]}", flush=True)
    rows.append(time_together(step, state, data, config, max(threads), args.seconds))
    print(f"  {rows[-1]}", flush=True)

  step_per_s = rows[len(threads)]["per_s"]
  for r in rows:
    r["over_step"] = r["per_s"] / step_per_s
  shapes = {k: list(v.shape) for k, v in host_batch.items()}
  results = {"machine": f"{cpu_model()}, {os.cpu_count()} cores",
             "jax": jax.__version__, "device": str(jax.devices()[0]), "args": vars(args),
             "data": {"karpathy_json": args.karpathy_json or "synthetic", "images": num_train,
                      "mean_jpeg_kb": fixture_kb},
             "batch_shapes": shapes, "load_average_before": load_before,
             "load_average_after": os.getloadavg(),
             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write_json_atomic(args.out, results)

  print(f"\n{results['machine']}; jax {jax.__version__}; batch {args.batch_size} at {SIDE} px "
        f"({shapes}); load average {load_before[0]:.1f} -> {results['load_average_after'][0]:.1f}")
  print(f"step: dual (ITC), EfficientNet-Lite0 + MiniLM-L6 first 3 layers, "
        f"{params / 1e6:.1f}M params, compile + first step {compile_s:.1f} s")
  names = {"pipeline": "input pipeline alone (decode, crop 224, flip, normalise, tokenise)",
           "step": "train step alone (jitted, batch re-placed each step)",
           "together": "trainer loop: pipeline feeding the step"}
  print("| row | decoding threads | images/s | CPU ms / image | pipeline / step |")
  print("|---|---|---|---|---|")
  for r in rows:
    rate = f"{r['per_s']:.1f}" if r["per_s"] >= 10 else f"{r['per_s']:.2f}"
    print(f"| {names[r['row']]} | {r.get('num_threads', '-')} | {rate} | "
          f"{r['cpu_ms_per_image']:.1f} | {r['over_step']:.2f} |")
  print(f"results: {args.out}")


if __name__ == "__main__":
  main()
