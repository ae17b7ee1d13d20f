r"""Exact top-k search speed, side by side in one run, on the clustered corpus of
`benchmarks/mining.py`: jaxdistill's `exact_top_k` (numpy backend: BLAS matmul + group-bound
selection; and its jax backend, the jitted `lax.scan` that was the only path before), the two
plain baselines (numpy matmul + `np.argpartition`, and a jitted matmul + `lax.top_k`, per
`--chunk`-row corpus chunk, merged on the host), numpy's matmul alone per chunk (a floor: no
selection at all) and ScaNN (the mining index; recall@10 against the exact lists).

  .venv/bin/python benchmarks/exact_search.py                      # 1M x 256, 10k queries
  .venv/bin/python benchmarks/exact_search.py --num_corpus=20000 --num_queries=500   # smoke run

Every method runs over the same queries in blocks of `--query_block`, after one warm-up block
(compilation, BLAS threads); each row reports queries/s from wall time and CPU milliseconds per
query (process time, all threads: the fair figure when other jobs share the CPU), and the
fraction of queries whose top-k ids equal `exact_top_k`'s (ScaNN: neighbour recall@10). The load
average before and after is recorded. Writes --out (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxdistill.atomic import write_json_atomic  # noqa: E402
from jaxdistill.mining.exact import exact_top_k, neighbor_recall  # noqa: E402
from jaxdistill.mining.scann_index import build_index, derive_params  # noqa: E402
from mining import add_corpus_args, clustered_corpus  # noqa: E402  (benchmarks/mining.py)

METHODS = ("exact_numpy", "exact_jax_scan", "numpy_argpartition", "jit_top_k", "numpy_matmul",
           "scann")


def merge_lists(scores: list[np.ndarray], ids: list[np.ndarray], k: int):
  """Per-chunk top-k lists [Qb, k] each -> the best k by (score desc, id asc): ([Qb, k], [Qb, k])."""
  s, i = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
  order = np.lexsort((i, -s), axis=1)[:, :k]
  return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def in_blocks(per_block, block_size):
  """fn(queries [Q, D]) -> ids [Q, k] | None, calling per_block on blocks of block_size rows (the
  last one padded, so jitted shapes compile once)."""
  def run(queries):
    out = []
    for q0 in range(0, len(queries), block_size):
      block = queries[q0:q0 + block_size]
      rows = len(block)
      result = per_block(np.pad(block, ((0, block_size - rows), (0, 0))))
      if result is not None:
        out.append(result[1][:rows])
    return np.concatenate(out) if out else None
  return run


def numpy_argpartition(corpus, k, chunk):
  """Baseline: numpy (BLAS) matmul per chunk + np.argpartition top-k, merged per query block."""
  def per_block(block):
    scores, ids = [], []
    for c0 in range(0, len(corpus), chunk):
      s = block @ corpus[c0:c0 + chunk].T
      top = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]
      scores.append(np.take_along_axis(s, top, 1))
      ids.append(top + c0)
    return merge_lists(scores, ids, k)
  return per_block


def numpy_matmul(corpus, chunk):
  """Floor: the matmuls alone (no top-k); returns nothing comparable."""
  def per_block(block):
    for c0 in range(0, len(corpus), chunk):
      block @ corpus[c0:c0 + chunk].T
  return per_block


def jit_top_k(corpus, k, chunk):
  """Baseline: jitted matmul (default precision: float32 on a CPU) + lax.top_k per chunk, the
  chunks placed on the device once, lists merged on the host."""
  chunks = [jnp.asarray(corpus[c0:c0 + chunk]) for c0 in range(0, len(corpus), chunk)]
  top = jax.jit(lambda q, x: jax.lax.top_k(q @ x.T, k))

  def per_block(block):
    scores, ids = [], []
    for c0, x in zip(range(0, len(corpus), chunk), chunks):
      s, i = top(block, x)
      scores.append(np.asarray(s))
      ids.append(np.asarray(i) + c0)
    return merge_lists(scores, ids, k)
  return per_block


def timed(fn, queries, warmup):
  """fn(queries) after fn(queries[:warmup]) (compilation, threads) -> (result, wall s, CPU s)."""
  fn(queries[:warmup])
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn(queries)
  return result, time.perf_counter() - wall, time.process_time() - cpu


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_corpus_args(ap)
  ap.add_argument("--chunk", type=int, default=100_000, help="corpus rows per baseline chunk")
  ap.add_argument("--query_block", type=int, default=1024)
  ap.add_argument("--corpus_block", type=int, default=16384, help="exact_top_k's corpus_block")
  ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {METHODS}")
  ap.add_argument("--scann_leaves", default="5,0",
                  help="ScaNN leaves searched per point (0 = derive_params' default)")
  ap.add_argument("--scann_reorder", type=int, default=100)
  ap.add_argument("--out", default="runs/bench_exact_search.json")
  args = ap.parse_args()
  methods = args.methods.split(",")
  unknown = set(methods) - set(METHODS)
  if unknown:
    ap.error(f"unknown methods {sorted(unknown)}: use {METHODS}")

  load_before = os.getloadavg()
  data = clustered_corpus(args.num_corpus + args.num_queries, args.dim, args.num_clusters, 0)
  corpus, queries = data[:args.num_corpus], np.ascontiguousarray(data[args.num_corpus:])
  del data
  k, qb = args.k, args.query_block
  print(f"corpus {corpus.shape}, {len(queries)} queries, k={k}, load average {load_before}",
        flush=True)

  exact = lambda backend: lambda q: exact_top_k(q, corpus, k, query_block=qb,
                                                corpus_block=args.corpus_block, backend=backend)[1]
  runners = {"exact_numpy": exact("numpy"), "exact_jax_scan": exact("jax"),
             "numpy_argpartition": lambda q: in_blocks(numpy_argpartition(corpus, k, args.chunk), qb)(q),
             "numpy_matmul": lambda q: in_blocks(numpy_matmul(corpus, args.chunk), qb)(q)}
  if "jit_top_k" in methods:   # places the chunks on the device: only when asked for
    runners["jit_top_k"] = in_blocks(jit_top_k(corpus, k, args.chunk), qb)
  names = {"exact_numpy": "exact_top_k, numpy backend (BLAS matmul + thresholded selection)",
           "exact_jax_scan": "exact_top_k, jax backend (jitted lax.scan, running top_k)",
           "numpy_argpartition": f"numpy matmul + np.argpartition per {args.chunk}-row chunk",
           "jit_top_k": f"jitted matmul + lax.top_k per {args.chunk}-row chunk",
           "numpy_matmul": f"numpy matmul alone per {args.chunk}-row chunk (no top-k: a floor)"}

  reference = None   # exact_top_k's ids when it runs (it runs first), else the first exact list
  rows = []
  for name in [m for m in METHODS if m in methods and m != "scann"]:
    ids, wall, cpu = timed(runners[name], queries, min(qb, len(queries)))
    if reference is None and ids is not None:
      reference = ids
    row = {"method": name, "what": names[name], "qps": len(queries) / wall, "seconds": wall,
           "cpu_ms_per_query": 1000 * cpu / len(queries)}
    if ids is not None:
      row["same_ids_as_exact"] = float(np.mean(np.all(ids == reference, axis=1)))
    rows.append(row)
    print(f"  {row}", flush=True)

  if "scann" in methods:
    params = derive_params(len(corpus), k)
    t0 = time.perf_counter()
    index = build_index(corpus, params, k)
    build_s = time.perf_counter() - t0
    index.search(queries[:100], k)   # warm-up
    for leaves in [int(x) for x in args.scann_leaves.split(",")]:
      leaves = leaves or params.num_leaves_to_search
      wall, cpu = time.perf_counter(), time.process_time()
      _, ids = index.search(queries, k, leaves_to_search=leaves, reorder=args.scann_reorder)
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
      row = {"method": "scann", "qps": len(queries) / wall, "seconds": wall,
             "cpu_ms_per_query": 1000 * cpu / len(queries), "build_s": build_s,
             "what": f"ScaNN, {params.num_leaves} leaves, {min(leaves, params.num_leaves)} "
                     f"searched, AH + reorder {args.scann_reorder}"}
      if reference is not None:
        row["recall@10_vs_exact"] = neighbor_recall(ids[:, :10], reference[:, :10])
      rows.append(row)
      print(f"  {row}", flush=True)

  by_name = {r["method"]: r for r in rows if r["method"] != "scann"}
  results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
             "args": vars(args), "load_average_before": load_before,
             "load_average_after": os.getloadavg(),
             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write_json_atomic(args.out, results)

  ratio = lambda r, base: (f"{r['qps'] / by_name[base]['qps']:.2f}" if base in by_name else "-")
  print(f"\n{len(corpus)} x {args.dim} corpus, {len(queries)} queries, k={k}, load average "
        f"{load_before[0]:.1f} -> {results['load_average_after'][0]:.1f}")
  print("| method | queries/s | CPU ms / query | x numpy+argpartition | x jit+top_k | x exact_top_k "
        "| same top-k as exact_top_k (ScaNN: recall@10) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    agree = r.get("same_ids_as_exact", r.get("recall@10_vs_exact"))
    print(f"| {r['what']} | {r['qps']:.1f} | {r['cpu_ms_per_query']:.2f} | "
          f"{ratio(r, 'numpy_argpartition')} | {ratio(r, 'jit_top_k')} | {ratio(r, 'exact_numpy')} | "
          f"{'-' if agree is None else f'{agree:.4f}'} |")
  print(f"results: {args.out}")


if __name__ == "__main__":
  main()
