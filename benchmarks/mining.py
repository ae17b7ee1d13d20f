r"""ScaNN vs exact jnp top-k vs faiss-cpu on a clustered corpus: queries/s at recall@10, index
build time, memory (the mining benchmark of docs/mining.md).

  python benchmarks/mining.py                           # 1M x 256, 10k queries (the target)
  python benchmarks/mining.py --num_corpus=200000       # smaller, for a busy machine

Corpus (`clustered_corpus`): a documented two-level clustered generator standing in for a
trained tower's embeddings: `num_clusters` unit centres, each with 8 sub-centres at distance
~0.5, points at ~0.5 around a sub-centre, all L2-normalised (256-d unit vectors, like
projected, normalised CLIP-style embeddings). Queries come from the same process (held out).
Recall@10 = |approx top-10 ∩ exact top-10| / 10, averaged over queries; the exact top-10 is
`mining/exact.exact_top_k` (its numpy backend on a CPU; the speed of exact search against
plain baselines is `benchmarks/exact_search.py`'s). Each ANN method is swept over its search-time knob
(ScaNN: leaves searched; faiss: nprobe); the table reports every point, and the summary the
fastest point with recall@10 >= --target_recall. Threads: every method uses all cores it sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import tempfile
import time

import numpy as np

from jaxdistill.mining.exact import exact_top_k
from jaxdistill.mining.scann_index import build_index, derive_params, save_index


def clustered_corpus(n: int, dim: int, num_clusters: int, seed: int,
                     chunk: int = 100_000) -> np.ndarray:
  """float32 [n, dim] unit vectors from the two-level generator of the module docstring."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_clusters, dim)) / np.sqrt(dim)
  subs = centres[:, None] + 0.5 * rng.normal(size=(num_clusters, 8, dim)) / np.sqrt(dim)
  subs = subs.reshape(-1, dim).astype(np.float32)
  out = np.empty((n, dim), np.float32)
  for s in range(0, n, chunk):
    m = min(chunk, n - s)
    x = subs[rng.integers(len(subs), size=m)] + 0.5 * rng.normal(size=(m, dim)).astype(
        np.float32) / np.sqrt(dim)
    out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def recall_at_10(approx: np.ndarray, exact: np.ndarray) -> float:
  a, e = approx[:, :10], exact[:, :10]
  return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, e)]))


def rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def dir_mib(path: str) -> float:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


def bench_scann(corpus, queries, exact, k, fractions, reorders):
  params = derive_params(len(corpus), k)
  rss0, t0 = rss_mib(), time.time()
  index = build_index(corpus, params, k)
  build = time.time() - t0
  rss = rss_mib() - rss0
  with tempfile.TemporaryDirectory() as d:
    save_index(index, os.path.join(d, "i"))
    disk = dir_mib(os.path.join(d, "i"))
  index.search(queries[:100], k)   # warm-up
  points = []
  for reorder in reorders:
    for leaves in sorted({max(1, round(f * params.num_leaves)) for f in fractions}):
      t0 = time.time()
      _, ids = index.search(queries, k, leaves_to_search=leaves, reorder=reorder)
      seconds = time.time() - t0
      points.append({"knob": f"leaves_to_search={leaves} reorder={reorder}",
                     "qps": len(queries) / seconds, "recall@10": recall_at_10(ids, exact)})
      print(f"  scann {points[-1]}", flush=True)
  return {"method": "ScaNN tree+AH+reorder", "params": dataclasses.asdict(params), "build_s": build, "rss_mib": rss, "disk_mib": disk, "points": points}


def bench_faiss(corpus, queries, exact, k, factory, nprobes, train_size):
  import faiss
  rss0, t0 = rss_mib(), time.time()
  index = faiss.index_factory(corpus.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
  sample = corpus[np.random.default_rng(1).choice(len(corpus), min(train_size, len(corpus)),
                                                  replace=False)]
  index.train(sample)
  index.add(corpus)
  build = time.time() - t0
  rss = rss_mib() - rss0
  disk = faiss.serialize_index(index).nbytes / 2**20
  ivf = faiss.extract_index_ivf(index)
  points = []
  for nprobe in nprobes:
    ivf.nprobe = nprobe
    t0 = time.time()
    _, ids = index.search(queries, k)
    seconds = time.time() - t0
    points.append({"knob": f"nprobe={nprobe}", "qps": len(queries) / seconds,
                   "recall@10": recall_at_10(ids, exact)})
    print(f"  faiss {factory} {points[-1]}", flush=True)
  return {"method": f"faiss {factory}", "build_s": build, "rss_mib": rss, "disk_mib": disk,
          "points": points}


def best(points, target):
  ok = [p for p in points if p["recall@10"] >= target]
  return max(ok, key=lambda p: p["qps"]) if ok else None


def add_corpus_args(ap: argparse.ArgumentParser) -> None:
  """The corpus / query flags the search benchmarks share (`clustered_corpus`'s sizes, k)."""
  ap.add_argument("--num_corpus", type=int, default=1_000_000)
  ap.add_argument("--num_queries", type=int, default=10_000)
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--num_clusters", type=int, default=2000)
  ap.add_argument("--k", type=int, default=10)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_corpus_args(ap)
  ap.add_argument("--target_recall", type=float, default=0.95)
  ap.add_argument("--scann_fractions", default="0.005,0.01,0.02,0.05")
  ap.add_argument("--scann_reorders", default="100,250")
  ap.add_argument("--faiss_nprobes", default="1,2,4,8,16")
  ap.add_argument("--exact_cache", default="",
                  help="npy of the exact top-k ids (+ .json timing): reused when present")
  ap.add_argument("--faiss", default="IVF{nlist},Flat;IVF{nlist},PQ{m}x4fs,RFlat")
  ap.add_argument("--out", default="runs/bench_mining.json")
  args = ap.parse_args()

  t0 = time.time()
  data = clustered_corpus(args.num_corpus + args.num_queries, args.dim, args.num_clusters, 0)
  corpus, queries = data[:args.num_corpus], np.ascontiguousarray(data[args.num_corpus:])
  print(f"corpus {corpus.shape} queries {queries.shape} generated in {time.time() - t0:.0f} s",
        flush=True)

  if args.exact_cache and os.path.exists(args.exact_cache):
    exact = np.load(args.exact_cache)
    with open(args.exact_cache + ".json") as f:
      exact_s = json.load(f)["seconds"]
  else:
    t0 = time.time()
    _, exact = exact_top_k(queries, corpus, args.k)
    exact_s = time.time() - t0
    if args.exact_cache:
      np.save(args.exact_cache, exact)
      with open(args.exact_cache + ".json", "w") as f:
        json.dump({"seconds": exact_s, "args": vars(args)}, f)
  results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                        "(shared with other jobs)",
             "args": vars(args),
             "exact": {"method": "exact_top_k (numpy backend)", "qps": args.num_queries / exact_s,
                       "seconds": exact_s, "corpus_mib": corpus.nbytes / 2**20},
             "ann": []}
  print(f"exact: {results['exact']}", flush=True)
  nlist = round(np.sqrt(args.num_corpus))
  results["ann"].append(bench_scann(corpus, queries, exact, args.k,
                                    [float(f) for f in args.scann_fractions.split(",")],
                                    [int(r) for r in args.scann_reorders.split(",")]))
  for spec in args.faiss.split(";"):
    factory = spec.format(nlist=nlist, m=args.dim // 2)
    results["ann"].append(bench_faiss(corpus, queries, exact, args.k, factory,
                                      [int(n) for n in args.faiss_nprobes.split(",")],
                                      train_size=max(100 * nlist, 50_000)))
  for r in results["ann"]:
    r["best"] = best(r["points"], args.target_recall)
  results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
  os.replace(args.out + ".tmp", args.out)

  ex = results["exact"]
  print(f"\n{args.num_corpus} x {args.dim} corpus, {args.num_queries} queries, k={args.k}, "
        f"target recall@10 >= {args.target_recall}")
  print("| method | build s | index MiB (disk) | RSS MiB | best point | recall@10 | queries/s | x exact |")
  print("|---|---|---|---|---|---|---|---|")
  print(f"| {ex['method']} | - | {ex['corpus_mib']:.0f} | - | - | 1.000 | {ex['qps']:.0f} | 1.0 |")
  for r in results["ann"]:
    b = r["best"]
    point = (f"{b['knob']} | {b['recall@10']:.3f} | {b['qps']:.0f} | {b['qps'] / ex['qps']:.1f}"
             if b else "none reaches the target | - | - | -")
    print(f"| {r['method']} | {r['build_s']:.0f} | {r['disk_mib']:.0f} | {r['rss_mib']:.0f} | {point} |")


if __name__ == "__main__":
  main()
