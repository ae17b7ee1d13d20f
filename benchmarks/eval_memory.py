r"""Peak memory of the Karpathy-protocol recall over 5,000 images x 25,010 captions (random
512-d unit embeddings, COCO 5k's shape): the dense path (`similarity_matrix` -> `recall_at_k`,
what evaluate/run.py did before) vs the chunked path (`EmbeddingScores` -> `recall_at_k`, what it
does now) at two block sizes. Each configuration runs in its own process.

  .venv/bin/python benchmarks/eval_memory.py                                  # 5,000 x 25,010
  .venv/bin/python benchmarks/eval_memory.py --num_images=500 --num_captions=2501 --dim=64  # smoke

Memory, two measures per configuration:
  peak RSS growth: the process's resident-set high-water mark (Linux /proc/self/status VmHWM;
    everything: numpy arrays, XLA's buffers, allocator caches) during the timed evaluation minus
    the RSS just before it. The evaluation runs once untimed first (XLA compiles every block
    shape), then the high-water mark is reset (`echo 5 > /proc/self/clear_refs`) and it runs
    again. Where the reset is refused the growth is taken from getrusage's ru_maxrss instead
    (then it includes the first run) and the row says so.
  tracemalloc peak: host allocations traced during the timed run (numpy's buffers; XLA's device
    buffers are not traced).
Both the chunked rows' recalls are checked equal to the dense path's. Writes --out (JSON) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def status_kib(key: str) -> int:
  """A `VmRSS` / `VmHWM` line of /proc/self/status, in KiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1])
  raise KeyError(key)


def karpathy_like(num_images: int, num_captions: int, dim: int, seed: int = 0):
  """Unit float32 embeddings img [num_images, dim], txt [num_captions, dim] and caption_to_image
  int32 [num_captions]: 5 captions per image, the remainder to the first images (COCO 5k: 25,010
  captions), shuffled."""
  rng = np.random.default_rng(seed)
  img = rng.standard_normal((num_images, dim), dtype=np.float32)
  txt = rng.standard_normal((num_captions, dim), dtype=np.float32)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  c2i = np.arange(num_captions) % num_images if num_captions < 5 * num_images else np.concatenate(
      [np.repeat(np.arange(num_images), 5), np.arange(num_captions - 5 * num_images) % num_images])
  return img, txt, rng.permutation(c2i).astype(np.int32)


def child(args) -> dict:
  """One configuration (args.child = "dense" | "chunked"), in this process: the measures above."""
  from jaxdistill.evaluate.retrieval import EmbeddingScores, recall_at_k, similarity_matrix

  img, txt, c2i = karpathy_like(args.num_images, args.num_captions, args.dim)
  if args.child == "dense":
    evaluate = lambda: recall_at_k(similarity_matrix(img, txt, args.block_elements), c2i,
                                   block_elements=args.block_elements)
  else:
    scores = EmbeddingScores(img, txt)
    evaluate = lambda: recall_at_k(scores, c2i, block_elements=args.block_elements)
  evaluate()   # compiles every block shape
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    peak_source = "VmHWM after clear_refs"
  except OSError:
    peak_source = "ru_maxrss (includes the untimed first run)"
  before_kib = status_kib("VmRSS")
  tracemalloc.start()
  t0 = time.perf_counter()
  metrics = evaluate()
  seconds = time.perf_counter() - t0
  traced_peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  peak_kib = (status_kib("VmHWM") if peak_source.startswith("VmHWM")
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
  return {"path": args.child, "block_elements": args.block_elements,
          "peak_rss_growth_mib": (peak_kib - before_kib) / 1024,
          "rss_before_mib": before_kib / 1024, "peak_source": peak_source,
          "tracemalloc_peak_mib": traced_peak / 2**20, "seconds": seconds, "metrics": metrics}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--num_images", type=int, default=5000)
  ap.add_argument("--num_captions", type=int, default=25_010)
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--block_elements", default="1048576,4194304",
                  help="the chunked path's two block sizes (scores per query block); the dense "
                       "path uses the larger for its row blocks and ranking")
  ap.add_argument("--out", default="runs/bench_eval_memory.json")
  ap.add_argument("--child", choices=("dense", "chunked"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    args.block_elements = int(args.block_elements)
    print(json.dumps(child(args)))
    return

  from jaxdistill.atomic import write_json_atomic
  blocks = [int(b) for b in args.block_elements.split(",")]
  common = [f"--num_images={args.num_images}", f"--num_captions={args.num_captions}",
            f"--dim={args.dim}"]
  runs = [("dense", max(blocks))] + [("chunked", b) for b in blocks]
  rows = []
  for path, block in runs:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={path}",
                          f"--block_elements={block}", *common],
                         check=True, capture_output=True, text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"  {rows[-1]}", flush=True)
  dense = rows[0]
  for row in rows[1:]:
    row["metrics_equal_dense"] = row["metrics"] == dense["metrics"]
  matrix_mib = args.num_images * args.num_captions * 4 / 2**20
  results = {"args": vars(args), "matrix_mib": matrix_mib, "load_average": os.getloadavg(),
             "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write_json_atomic(args.out, results)

  print(f"\n{args.num_images} images x {args.num_captions} captions x {args.dim}-d: the dense "
        f"float32 matrix is {matrix_mib:.1f} MiB")
  print("| path | block_elements (block MiB) | peak RSS growth MiB | tracemalloc peak MiB | "
        "seconds | recalls equal dense |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['path']} | {r['block_elements']} ({r['block_elements'] * 4 / 2**20:.1f}) | "
          f"{r['peak_rss_growth_mib']:.1f} | {r['tracemalloc_peak_mib']:.1f} | {r['seconds']:.2f} | "
          f"{r.get('metrics_equal_dense', '-')} |")
  if any(not r["peak_source"].startswith("VmHWM") for r in rows):
    print("(peak RSS from ru_maxrss: includes the untimed first run)")
  print(f"results: {args.out}")


if __name__ == "__main__":
  main()
