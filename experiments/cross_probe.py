r"""Can a cross encoder learn binding on a run's frozen towers? (issue 12, docs/results.md)

Trains a LoopITR run's cross encoder (or a variant of it) with ITM alone on the cached token
outputs of the run's trained, frozen towers, so that a step costs only the cross encoder, and
reports on **val**: the cross encoder's binding probe, its accuracy against the dual encoder's
hardest wrong image, and text->image R@1 after re-ranking the dual top-k of the first caption of
each image, by the cross score alone and by cross + dual score (ALBEF's re-ranking sum,
config.eval.rerank_score). The towers are the run's; nothing here changes them. With one image
token per grid cell it first prints how well a linear probe reads a cell's position and item
from its token.

  python experiments/cross_probe.py runs/loopitr_itc --steps=1500 --batch=32 --lr=1e-4 \
      --negatives=hard [--random_steps=500] [--model=cross_gate=True ...] [--init=run|scratch]

--negatives: ITM negatives per positive pair, one text per image and one image per text: hard
  (uniform over the dual encoder's top-8 wrong items in the whole train split) or random;
  --random_steps=N uses random negatives for the first N steps (a curriculum), then hard.
--model KEY=VALUE: overrides of the run's config.model (the cross encoder's kind, width, gate,
  ITM pooling, ...); the params that keep their name and shape come from the run
  (--init=run, so MiniLM's layers keep the checkpoint's values), the others are initialised.
--init=scratch: every cross-encoder param initialised anew.
Token caches go to <workdir>/cross_probe_cache (float16; computed once, ~3 min).
"""

from __future__ import annotations

import argparse
import ast
import os
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdistill.data.benchmark import prepare_benchmark
from jaxdistill.data.compositional import CAPTIONS_PER_IMAGE
from jaxdistill.data.pipeline import eval_arrays
from jaxdistill.evaluate.binding import binding_accuracy
from jaxdistill.evaluate.retrieval import embed_in_batches
from jaxdistill.losses.matching import itm_loss
from jaxdistill.models.build import build_model, init_params
from jaxdistill.models.loopitr import LoopITRModel
from jaxdistill.store.run import load_run

TOWER_PARAMS = ("dual",)   # always the run's
NOT_TRAINED = TOWER_PARAMS + ("mlm_head",)   # the rest (cross, itm_head, ...) is trained by ITM
HARD_POOL = 8              # hard negatives: uniform over the dual's top-8 wrong items
EMBED_BATCH = 256


def _tokens(run, split_arrays: dict, cache: str) -> dict[str, np.ndarray]:
  """The run's frozen tower outputs of one split: image/text embeddings and tokens (float16
  tokens on disk at `cache`, reused)."""
  if os.path.exists(cache):
    with np.load(cache) as f:
      return dict(f)
  p = run.params
  image = jax.jit(lambda x: run.towers.embed_image(p, x))
  text = jax.jit(lambda i, m: run.towers.embed_text(p, i, m))
  img_emb, img_tok = embed_in_batches(lambda a: image(a["image"]),
                                      {"image": split_arrays["image"]}, EMBED_BATCH)
  out = {"img_emb": img_emb, "img_tok": img_tok.astype(np.float16)}
  for name in [k for k in split_arrays if k.endswith("_ids")]:
    prefix = name[:-len("_ids")]
    emb, tok = embed_in_batches(lambda a: text(a["i"], a["m"]),
                                {"i": split_arrays[name], "m": split_arrays[prefix + "_mask"]},
                                EMBED_BATCH)
    out.update({f"{prefix}_emb": emb, f"{prefix}_tok": tok.astype(np.float16),
                f"{prefix}_mask": split_arrays[prefix + "_mask"]})
  tmp = cache + ".tmp.npz"
  np.savez(tmp, **out)
  os.replace(tmp, cache)
  return out


def _hard_pool(query: np.ndarray, keys: np.ndarray, same: np.ndarray, k: int) -> np.ndarray:
  """For each query row, the k keys of highest dot product among those where `same` (a
  [Q] -> [K] positive relation, given as per-query key-group ids) does not hold: int32 [Q, k]."""
  out = np.empty((len(query), k), np.int32)
  for s in range(0, len(query), 4096):
    sim = query[s:s + 4096] @ keys.T
    sim[same[s:s + 4096]] = -np.inf
    out[s:s + 4096] = np.argpartition(-sim, k, axis=1)[:, :k]
  return out


def _linear_probe_accuracy(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                           classes: int) -> float:
  """Ridge-regression (1e-2) linear probe onto one-hot targets: val accuracy of its argmax."""
  a = np.c_[x, np.ones(len(x))]
  w = np.linalg.solve(a.T @ a + 1e-2 * np.eye(a.shape[1]), a.T @ np.eye(classes)[y])
  return float(np.mean((np.c_[x_val, np.ones(len(x_val))] @ w).argmax(1) == y_val))


def what_the_cell_tokens_say(cached: dict, bench) -> str:
  """How well a linear probe reads each non-empty cell's position (chance 25%) and item class
  (chance 10%) from the image tower's cell tokens (tokens 1..4; a 28-px patch is one cell),
  trained on train, measured on val: what a cross encoder can read from a single token."""
  def cells(split):
    tok = cached[split]["img_tok"][:, 1:].astype(np.float32)
    layout = bench.splits[split].layouts.reshape(-1)
    keep = layout >= 0
    return (tok.reshape(-1, tok.shape[-1])[keep], np.tile(np.arange(4), len(tok))[keep],
            layout[keep])
  x, pos, item = cells("train")
  xv, posv, itemv = cells("val")
  return (f"cell tokens, linear probe on val: position {_linear_probe_accuracy(x, pos, xv, posv, 4):.1%}"
          f" (chance 25%), item class {_linear_probe_accuracy(x, item, xv, itemv, 10):.1%} (chance 10%)")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdir")
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--warmup", type=int, default=50)
  ap.add_argument("--negatives", choices=("hard", "random"), default="hard")
  ap.add_argument("--random_steps", type=int, default=0)
  ap.add_argument("--model", nargs="*", default=[])
  ap.add_argument("--init", choices=("run", "scratch"), default="run")
  ap.add_argument("--eval_every", type=int, default=250)
  ap.add_argument("--rerank_k", type=int, default=4)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  if not 0 <= args.warmup < args.steps:
    ap.error(f"--warmup={args.warmup} must be below --steps={args.steps}")

  run = load_run(args.workdir)
  bench = prepare_benchmark(run.config, args.workdir)
  cache_dir = os.path.join(args.workdir, "cross_probe_cache")
  os.makedirs(cache_dir, exist_ok=True)
  t0 = time.time()
  cached = {}
  for split in ("train", "val"):
    arrays = eval_arrays(bench.splits[split], *bench.tokens[split])
    arrays = {"image": arrays["image"], "cap_ids": arrays["text_ids"], "cap_mask": arrays["text_mask"]}
    if split == "val":
      true_ids, true_mask, false_ids, false_mask = bench.probe_tokens[split]
      arrays.update(true_ids=true_ids, true_mask=true_mask, false_ids=false_ids, false_mask=false_mask)
    cached[split] = _tokens(run, arrays, os.path.join(cache_dir, f"{split}.npz"))
  print(f"token caches ready in {time.time() - t0:.0f} s", flush=True)
  if run.config.model.patch_size * 2 == run.config.model.image_size:   # one token per cell
    print(what_the_cell_tokens_say(cached, bench), flush=True)

  # The network: the run's model config with the overrides; params named and shaped as the
  # run's keep its values (--init=run) — the towers always do, they are only read from the cache.
  mc = dict(run.config.model)
  for item in args.model:
    key, value = item.split("=", 1)
    try:
      mc[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      mc[key] = value
  model = build_model(mc)
  fresh = flax.traverse_util.flatten_dict(init_params(model, ml_collections.ConfigDict(mc),
                                                      jax.random.PRNGKey(args.seed)))
  old = flax.traverse_util.flatten_dict(run.params)
  taken = []
  for path, value in fresh.items():
    if path in old and old[path].shape == value.shape and (
        path[0] in TOWER_PARAMS or args.init == "run"):
      fresh[path] = jnp.asarray(old[path])
      taken.append(path)
  params = flax.traverse_util.unflatten_dict(fresh)
  frozen = {k: v for k, v in params.items() if k in NOT_TRAINED}
  trained = {k: v for k, v in params.items() if k not in NOT_TRAINED}
  n_trained = sum(x.size for x in jax.tree_util.tree_leaves(trained))
  n_kept = sum(1 for p in taken if p[0] not in TOWER_PARAMS)
  print(f"cross encoder: {n_trained:,} trained params, {n_kept} tensors from the run", flush=True)

  tr, va = cached["train"], cached["val"]
  n_img = len(tr["img_emb"])
  cap_img = np.repeat(np.arange(n_img), CAPTIONS_PER_IMAGE)
  t0 = time.time()
  # Hard pools: per caption its top-8 wrong images; per image its top-8 wrong captions.
  hard_img = _hard_pool(tr["cap_emb"], tr["img_emb"],
                        cap_img[:, None] == np.arange(n_img)[None], HARD_POOL)
  hard_cap = _hard_pool(tr["img_emb"], tr["cap_emb"],
                        np.arange(n_img)[:, None] == cap_img[None], HARD_POOL)
  print(f"hard pools in {time.time() - t0:.0f} s", flush=True)

  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps)
  opt = optax.adamw(schedule, weight_decay=0.02)
  opt_state = opt.init(trained)

  def logits(trained, img_tok, txt_tok, txt_mask):
    return model.apply({"params": {**frozen, **trained}}, txt_tok.astype(jnp.float32), txt_mask,
                       img_tok.astype(jnp.float32), method=LoopITRModel.match_logits)

  @jax.jit
  def step(trained, opt_state, img_tok, txt_tok, txt_mask, labels):
    def loss_fn(t):
      loss, parts = itm_loss(logits(t, img_tok, txt_tok, txt_mask), labels)
      return loss, parts
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    updates, opt_state = opt.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss, parts, optax.global_norm(grads)

  score = jax.jit(lambda t, i, x, m: logits(t, i, x, m)[:, 0])

  def scores(t, img_rows, tok, mask, img_tok):
    return embed_in_batches(lambda a: score(t, a["img"], a["tok"], a["mask"]),
                            {"img": img_tok[img_rows], "tok": tok, "mask": mask}, EMBED_BATCH)

  n_val = len(va["img_emb"])
  first = np.arange(n_val) * CAPTIONS_PER_IMAGE           # the first caption of each val image
  val_sim = va["cap_emb"][first] @ va["img_emb"].T          # [n_val captions, n_val images]
  topk = np.argsort(-val_sim, axis=1)[:, :args.rerank_k]
  dual_r1 = np.mean(topk[:, 0] == np.arange(n_val))
  wrong = val_sim.copy()
  wrong[np.arange(n_val), np.arange(n_val)] = -np.inf
  val_hard = wrong.argmax(1)                                # the dual's hardest wrong image
  dual_bind = binding_accuracy(np.sum(va["img_emb"] * va["true_emb"], -1),
                               np.sum(va["img_emb"] * va["false_emb"], -1))

  def evaluate(t, full: bool) -> dict:
    rows = np.arange(n_val)
    bind = binding_accuracy(scores(t, rows, va["true_tok"], va["true_mask"], va["img_tok"]),
                            scores(t, rows, va["false_tok"], va["false_mask"], va["img_tok"]))
    pos = scores(t, rows, va["cap_tok"][first], va["cap_mask"][first], va["img_tok"])
    neg = scores(t, val_hard, va["cap_tok"][first], va["cap_mask"][first], va["img_tok"])
    out = {"binding": bind, "vs_hardest": 100 * float(np.mean(pos > neg))}
    if full:
      cand = topk.reshape(-1)
      caps = np.repeat(first, args.rerank_k)
      s = scores(t, cand, va["cap_tok"][caps], va["cap_mask"][caps], va["img_tok"])
      s = s.reshape(n_val, args.rerank_k)
      for name, fused in (("cross", s), ("cross+dual", s + np.take_along_axis(val_sim, topk, 1))):
        best = topk[np.arange(n_val), fused.argmax(1)]
        out[f"rerank@{args.rerank_k}_{name}_t2i_r1"] = 100 * float(np.mean(best == np.arange(n_val)))
    return out

  print(f"val (first caption per image): dual t2i R@1 {100 * dual_r1:.1f}, dual binding "
        f"{dual_bind:.1f}", flush=True)
  rng = np.random.default_rng(args.seed)
  n_cap = len(cap_img)
  t_start, b = time.time(), args.batch
  labels = jnp.concatenate([jnp.zeros(b, jnp.int32), jnp.ones(2 * b, jnp.int32)])
  for i in range(1, args.steps + 1):
    caps = rng.choice(n_cap, b, replace=False)
    imgs = cap_img[caps]
    hard = args.negatives == "hard" and i > args.random_steps
    if hard:
      neg_img = hard_img[caps, rng.integers(0, HARD_POOL, b)]
      neg_cap = hard_cap[imgs, rng.integers(0, HARD_POOL, b)]
    else:
      neg_img = (imgs + rng.integers(1, n_img, b)) % n_img
      neg_cap = (cap_img[caps] * CAPTIONS_PER_IMAGE + rng.integers(CAPTIONS_PER_IMAGE, n_cap, b)) % n_cap
    img_rows = np.concatenate([imgs, neg_img, imgs])
    cap_rows = np.concatenate([caps, caps, neg_cap])
    trained, opt_state, loss, parts, gnorm = step(
        trained, opt_state, tr["img_tok"][img_rows], tr["cap_tok"][cap_rows],
        tr["cap_mask"][cap_rows], labels)
    if i % 50 == 0 or i == args.steps:
      elapsed = time.time() - t_start
      print(f"step {i}/{args.steps} {'hard' if hard else 'random'} itm {float(loss):.4f} "
            f"acc {float(parts['itm_acc']):.3f} |g| {float(gnorm):.3f} "
            f"{elapsed / i:.2f} s/step, ETA {elapsed / i * (args.steps - i) / 60:.1f} min", flush=True)
    if i % args.eval_every == 0 or i == args.steps:
      print(f"  val @ {i}: {evaluate(trained, full=i == args.steps)}", flush=True)
  print(f"done: {args.steps} steps in {(time.time() - t_start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
  main()
