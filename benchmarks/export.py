"""Exported student vs teacher: size on disk, per-image and per-text latency (LiteRT, 1 and 2
threads, p50 / p95), and the phone's end-to-end query (text -> top-10 over a 100k-image index).

  .venv/bin/python benchmarks/export.py --student_workdir=runs/loopitr [--quantization=none]
  # the mobile student (configs/mcad.py:mobile), every quantization, no teacher:
  .venv/bin/python benchmarks/export.py --student_workdir=runs/mobile_gt \
      --quantization=none,float16,int8,int8_full --teacher=false --out=runs/export_benchmark_mobile

Student: the latest checkpoint of --student_workdir (e.g. the cpu preset), read back with its own
config.json (export/run.py `restore_student`). Teacher: the paper preset's LoopITR towers
(ViT-B-sized 12-layer image tower, 6-layer 768-wide text tower; models/build.py) from a random
initialisation — size and latency do not depend on the weights — or, with --teacher_workdir, a
trained run read back as the student is. Both go through `export_towers(towers, params, ...)`
(one code path, parity checked; the random teacher's on 20 test images). Paper 000 Table 3
(Leaner-and-Faster's T and S):
  .venv/bin/python benchmarks/export.py --student_workdir=runs/lf_short_full_s0/student_text \
      --teacher_workdir=runs/teacher_dual --search_check=false --out=runs/export_benchmark_lf
Latency: one signature-runner call with batch 1, as the app makes it, after warm-up. End to end:
`jaxdistill.search` (tokenizer + text model + exact top-10 by numpy) over the test split's image
embeddings replicated to --index_size with N(0, 0.01^2) noise and re-normalised.
Targets (paper 000 Table 3, paper 001 Table 5): student text >= 3x and image >= 2x faster,
student size <= 35% of the teacher's; end-to-end p50 < 8 ms on a 2-core CPU. Paper 001 Table 5's
mobile student (MobileViTv2 + TinyBERT, on a phone): ~8 ms per query over 100,000 images and
~24.6 ms per image indexed; printed beside the measured figures (PAPER_001_TABLE_5).
--quantization takes a comma-separated list (none | float16 | int8 | int8_full): one export,
parity and timing per entry, results_<q>.json each and one summary table (summary.md).
Search check: the test split's images written as PNGs, indexed and queried with 20 of its
captions by `python -m jaxdistill.search` (subprocesses); hits (own image in the top 10) vs the
JAX t2i R@10 on the split stored by the export's parity check.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STUDENT = flags.DEFINE_string("student_workdir", "runs/loopitr", "Trained student run (cpu preset).")
_QUANT = flags.DEFINE_list("quantization", ["none"], "Comma-separated: none | float16 | int8 | "
                          "int8_full, each for both models.")
_TEACHER = flags.DEFINE_bool("teacher", True, "Also export and time the paper-preset teacher.")
_TEACHER_WORKDIR = flags.DEFINE_string(
    "teacher_workdir", "", "A trained run to export and time as the teacher instead of the "
    "random paper-preset LoopITR towers, e.g. runs/teacher_dual (paper 000 Table 3's T).")
_SEARCH = flags.DEFINE_bool("search_check", True, "Index the test images and query 20 captions "
                            "with python -m jaxdistill.search (subprocesses).")
_OUT = flags.DEFINE_string("out", "runs/export_benchmark", "Where the exports and results go.")
_ITERS = flags.DEFINE_integer("iters", 200, "Timed calls per student model and setting.")
_TEACHER_ITERS = flags.DEFINE_integer("teacher_iters", 30, "Timed calls per teacher model.")
_INDEX = flags.DEFINE_integer("index_size", 100_000, "Images in the end-to-end index.")
_QUERIES = flags.DEFINE_integer("queries", 300, "Timed end-to-end queries.")


PAPER_001_TABLE_5 = {"query over 100,000 images, ms": 8.0, "image indexed, ms": 24.6}


def _config(preset: str, quantization: str):
  from jaxdistill.config import load_config_file
  config = load_config_file(os.path.join(REPO, "configs", f"loopitr.py:{preset}"))
  config.export.quantization = quantization
  return config


def _student_bench(student_workdir: str):
  """The student run's benchmark: its own data settings (config.json) and tokenizer."""
  from jaxdistill.data.benchmark import prepare_benchmark
  from jaxdistill.store.run import load_run_config
  return prepare_benchmark(load_run_config(student_workdir, "--student_workdir"), student_workdir)


def _export_run(workdir: str, directory: str, quantization: str):
  from jaxdistill.export import run as export_run
  return export_run.export_towers(
      *export_run.restore_student(_config("cpu", quantization), workdir), directory)


def _export_student(directory: str, quantization: str):
  return _export_run(_STUDENT.value, directory, quantization)


def _export_teacher(directory: str, quantization: str):
  if _TEACHER_WORKDIR.value:
    return _export_run(_TEACHER_WORKDIR.value, directory, quantization)
  import jax
  from jaxdistill.data.benchmark import prepare_benchmark
  from jaxdistill.export.run import export_towers
  from jaxdistill.models.build import build_model, init_params, towers
  config = _config("paper", quantization)
  bench = prepare_benchmark(config, None)
  config.model.vocab_size = bench.vocab_size
  model = build_model(config.model)
  params = jax.jit(lambda key: init_params(model, config.model, key))(jax.random.PRNGKey(0))
  return export_towers(towers(model), params, config, bench,
                       {"recipe": config.method, "init": "random"}, directory, parity_images=20)


def _percentiles(seconds: list[float]) -> dict:
  import numpy as np
  ms = 1000 * np.asarray(seconds)
  return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def _latency(path: str, inputs: dict, threads: int, iters: int) -> dict:
  """p50 / p95 of one batch-1 signature-runner call (after 5 warm-up calls)."""
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_path=path, num_threads=threads)
  runner = interpreter.get_signature_runner("serving_default")
  for _ in range(5):
    runner(**inputs)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    runner(**inputs)
    times.append(time.perf_counter() - t0)
  return _percentiles(times)


def _model_inputs(directory: str, manifest: dict, which: str) -> dict:
  """Batch-1 inputs: a random normalised image, or a caption of the benchmark's grammar."""
  import numpy as np
  import tokenizers
  from jaxdistill.data.tokenizer import encode
  specs = manifest[f"{which}_encoder"]["inputs"]
  if which == "image":
    return {s["name"]: np.random.default_rng(0).normal(size=s["shape"]).astype(np.float32)
            for s in specs}
  tokenizer = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
  ids, mask = encode(tokenizer, ["a white sneaker above a black bag, with a shirt on the right"],
                     manifest["text_encoder"]["max_len"])
  return {specs[0]["name"]: ids, specs[1]["name"]: mask}


def _end_to_end(export_dir: str, student_workdir: str) -> dict:
  import numpy as np
  from jaxdistill.search import load_export, top_k
  split = _student_bench(student_workdir).splits["test"]
  exported = load_export(export_dir, num_threads=2)
  base = exported.embed_images(split.images)
  rng = np.random.default_rng(0)
  reps = -(-_INDEX.value // len(base))
  index = np.tile(base, (reps, 1))[:_INDEX.value]
  index = index + rng.normal(scale=0.01, size=index.shape).astype(np.float32)
  index /= np.linalg.norm(index, axis=1, keepdims=True)
  captions = [c for caps in split.captions for c in caps][:_QUERIES.value]
  for caption in captions[:10]:
    top_k(index, exported.embed_texts([caption]), 10)
  total, encode, scan = [], [], []
  for caption in captions:
    t0 = time.perf_counter()
    query = exported.embed_texts([caption])
    t1 = time.perf_counter()
    top_k(index, query, 10)
    t2 = time.perf_counter()
    total.append(t2 - t0), encode.append(t1 - t0), scan.append(t2 - t1)
  return {"index_size": len(index), "embed_dim": int(index.shape[1]), "queries": len(captions),
          "total": _percentiles(total), "tokenize+text model": _percentiles(encode),
          "top-10 scan": _percentiles(scan)}


def _search_check(export_dir: str, student_workdir: str, num_queries: int = 20) -> dict:
  import numpy as np
  from PIL import Image
  split = _student_bench(student_workdir).splits["test"]
  folder = os.path.join(_OUT.value, "test_images")
  os.makedirs(folder, exist_ok=True)
  for i, image in enumerate(split.images):
    Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.png"))
  stride = len(split.images) // num_queries
  rows = [(stride * q, q % 5) for q in range(num_queries)]
  index = os.path.join(_OUT.value, "test_index.npz")
  search = [sys.executable, "-m", "jaxdistill.search"]
  subprocess.run(search + ["index", f"--export_dir={export_dir}", f"--images={folder}",
                           f"--index={index}"], check=True)
  out = subprocess.run(search + ["query", f"--export_dir={export_dir}", f"--index={index}",
                                 "--k=10", *[split.captions[i][c] for i, c in rows]],
                       check=True, capture_output=True, text=True).stdout
  hits = [f"{i:04d}.png" in [r["path"] for r in json.loads(line)["results"]]
          for (i, _), line in zip(rows, out.splitlines())]
  with open(os.path.join(export_dir, "manifest.json")) as f:
    p = json.load(f)["parity"]["t2i_r10_jax"] / 100
  return {"queries": num_queries, "hits": int(sum(hits)), "expected_from_jax": p * num_queries,
          "binomial_sd": float(np.sqrt(num_queries * p * (1 - p)))}


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  summary = []
  for quantization in _QUANT.value:
    results = _benchmark(quantization)
    with open(os.path.join(_OUT.value, f"results_{quantization}.json"), "w") as f:
      json.dump(results, f, indent=2)
    print(_markdown(results), flush=True)
    summary.append(results)
  table = _summary(summary)
  with open(os.path.join(_OUT.value, "summary.md"), "w") as f:
    f.write(table + "\n")
  print(table)


def _benchmark(quantization: str) -> dict:
  """Export (+ parity), sizes and latencies of the student (and teacher) for one quantization."""
  results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                        f"load average {os.getloadavg()[0]:.1f} at start",
             "quantization": quantization, "models": {},
             "paper_001_table_5": PAPER_001_TABLE_5}
  exports = [("student", _export_student)] + ([("teacher", _export_teacher)] if _TEACHER.value
                                              else [])
  for name, export in exports:
    directory = os.path.join(_OUT.value, f"{name}_{quantization}")
    t0 = time.time()
    manifest = export(directory, quantization)
    entry = results["models"][name] = {
        "export_seconds": round(time.time() - t0, 1),
        "bytes": {f: e["bytes"] for f, e in manifest["files"].items()},
        "parity": {k: manifest["parity"][k] for k in (
            "num_images", "num_texts", "image_cosine_min", "image_cosine_mean", "text_cosine_min",
            "text_cosine_mean", "t2i_r1_jax", "t2i_r1_tflite", "i2t_r1_jax", "i2t_r1_tflite",
            "cosine_min_bar", "t2i_r1_max_gap", "passed")}}
    iters = _ITERS.value if name == "student" else _TEACHER_ITERS.value
    for which in ("image", "text"):
      path = os.path.join(directory, f"{which}_encoder.tflite")
      inputs = _model_inputs(directory, manifest, which)
      for threads in (1, 2):
        entry[f"{which}_{threads}t"] = _latency(path, inputs, threads, iters)
  student_dir = os.path.join(_OUT.value, f"student_{quantization}")
  if _SEARCH.value:
    results["search_check"] = _search_check(student_dir, _STUDENT.value)
  results["end_to_end"] = _end_to_end(student_dir, _STUDENT.value)
  if "teacher" in results["models"]:
    s, t = results["models"]["student"], results["models"]["teacher"]
    size = lambda m: m["bytes"]["image_encoder.tflite"] + m["bytes"]["text_encoder.tflite"]
    results["ratios"] = {
        "student/teacher size": size(s) / size(t),
        **{f"{which} speed-up ({threads}t, p50)":
           t[f"{which}_{threads}t"]["p50_ms"] / s[f"{which}_{threads}t"]["p50_ms"]
           for which in ("image", "text") for threads in (1, 2)}}
  results["load_average_end"] = os.getloadavg()[0]
  return results


def _summary(runs: list[dict]) -> str:
  """One row per quantization of the student: size, latency, parity; paper 001 Table 5 beside."""
  lines = ["| student | image + text MiB | image p50 / p95 ms (1t) | image (2t) | text p50 / p95 "
           "ms (1t) | text (2t) | query over the 100k index p50 / p95 ms | cosine min image / "
           "text | t2i R@1 TFLite vs JAX | parity |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in runs:
    m, e = r["models"]["student"], r["end_to_end"]["total"]
    p = m["parity"]
    cell = lambda k: f"{m[k]['p50_ms']:.2f} / {m[k]['p95_ms']:.2f}"
    lines.append(
        f"| {r['quantization']} | {m['bytes']['image_encoder.tflite'] / 2**20:.2f} + "
        f"{m['bytes']['text_encoder.tflite'] / 2**20:.2f} | {cell('image_1t')} | "
        f"{cell('image_2t')} | {cell('text_1t')} | {cell('text_2t')} | {e['p50_ms']:.2f} / "
        f"{e['p95_ms']:.2f} | {p['image_cosine_min']:.4f} / {p['text_cosine_min']:.4f} | "
        f"{p['t2i_r1_tflite']:.2f} vs {p['t2i_r1_jax']:.2f} | "
        f"{'passed' if p['passed'] else 'FAILED'} |")
  paper = PAPER_001_TABLE_5
  lines.append(f"| paper 001 Table 5 (phone) | | {paper['image indexed, ms']} per image | | | | "
               f"~{paper['query over 100,000 images, ms']:.0f} per query | | | |")
  return "\n".join(lines)


def _markdown(r: dict) -> str:
  lines = [f"Machine: {r['machine']}; quantization {r['quantization']}.", "",
           "| model | image MiB | text MiB | image p50/p95 ms (1t) | image (2t) | text p50/p95 ms (1t) | text (2t) |",
           "|---|---|---|---|---|---|---|"]
  for name, m in r["models"].items():
    cell = lambda k: f"{m[k]['p50_ms']:.2f} / {m[k]['p95_ms']:.2f}"
    lines.append(f"| {name} | {m['bytes']['image_encoder.tflite'] / 2**20:.2f} | "
                 f"{m['bytes']['text_encoder.tflite'] / 2**20:.2f} | {cell('image_1t')} | "
                 f"{cell('image_2t')} | {cell('text_1t')} | {cell('text_2t')} |")
  qps = lambda m, k: f"{1000 / m[k]['p50_ms']:.0f}"
  lines += ["", "Queries per second (batch 1, 1 / p50): " + "; ".join(
      f"{name} image {qps(m, 'image_1t')} (1t), {qps(m, 'image_2t')} (2t), text "
      f"{qps(m, 'text_1t')} (1t), {qps(m, 'text_2t')} (2t)" for name, m in r["models"].items())]
  lines += ["", *(f"- {k}: {v:.3f}" for k, v in r.get("ratios", {}).items())]
  e = r["end_to_end"]
  lines += ["", f"End to end ({e['queries']} queries, {e['index_size']} x {e['embed_dim']} index, 2 threads): "
            + "; ".join(f"{k} p50 {v['p50_ms']:.2f} ms, p95 {v['p95_ms']:.2f} ms"
                        for k, v in e.items() if isinstance(v, dict))]
  if "search_check" not in r:
    return "\n".join(lines)
  c = r["search_check"]
  lines += ["", f"Search check: {c['hits']}/{c['queries']} captions find their image in the top 10; "
            f"JAX R@10 predicts {c['expected_from_jax']:.1f} (binomial sd {c['binomial_sd']:.1f})."]
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
