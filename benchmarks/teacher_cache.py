"""Step time of a distillation step with the teacher run online vs read from the feature cache,
side by side in one run.

  .venv/bin/python benchmarks/teacher_cache.py [--teacher_workdir=runs/teacher_cross] [--steps=10]

Without --teacher_workdir the teacher is an untrained network of configs/teacher.py's size
(256 wide, 4 layers per tower; step time does not depend on the weights).

The student is the CPU-preset LoopITR network's dual towers; its step (forward, backward, AdamW)
computes ITC (paper 003 eq. 2-3) + KL from the dual teacher's in-batch similarity distribution
(paper 000 stage 2 / MCAD's L_CLIP) + LoopITR's listwise distillation (paper 003 eq. 5-7) of the
cross teacher's positive logits over each image's positive and m hard in-batch negatives.
  online: the teacher embeds the batch and its cross encoder scores the B * (1 + m) pairs.
  cached: the teacher's embeddings come from the cache; the cross scores are looked up in the
    cache's top-N bank (paper 002 §3.2.2); a candidate missing from the bank is left out of the
    softmaxes (CPRD's "invalid negative"), a missing positive takes the row's best bank score.
The cached row includes the host-side cache lookup. Prints a markdown table and the ratio.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TEACHER = flags.DEFINE_string("teacher_workdir", "", "Workdir of a trained LoopITR run; "
                               "'' = an untrained configs/teacher.py network.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per row (after 2 warm-up steps).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 256, "Train images cached (the bank is built for these).")
_TOP_N = flags.DEFINE_integer("top_n", 8, "Bank size per image (paper 002 §3.2.2's N).")
_NEGATIVES = flags.DEFINE_integer("negatives", 4, "m hard in-batch negatives per image.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax's per-save INFO lines
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from jaxdistill.config import load_config_file
  from jaxdistill.data.benchmark import prepare_benchmark
  from jaxdistill.data.pipeline import eval_arrays
  from jaxdistill.losses.contrastive import contrastive_loss
  from jaxdistill.losses.distillation import kl_divergence, listwise_distillation
  from jaxdistill.methods.loopitr import choose_negatives
  from jaxdistill.models.build import build_model, init_params, towers
  from jaxdistill.teachers.cache import FeatureCache, cache_split
  from jaxdistill.teachers.workdir import from_workdir, init_workdir

  # The random-init cpu model the recorded rows measured (the cpu preset before MiniLM towers).
  config = load_config_file(os.path.join(REPO, "configs", "loopitr.py:scratch"))
  config.data.num_train = _NUM_TRAIN.value
  b, m, workdir = _BATCH.value, _NEGATIVES.value, tempfile.mkdtemp(prefix="teacher_cache_bench_")
  teacher_dir = _TEACHER.value or os.path.join(workdir, "teacher")
  if _TEACHER.value:
    bench = prepare_benchmark(config, workdir)
  else:   # same data settings, so the same benchmark and tokenizer as the student's
    big = load_config_file(os.path.join(REPO, "configs", "teacher.py:cpu"))
    big.data.num_train = _NUM_TRAIN.value
    bench, _ = init_workdir(big, teacher_dir)
  config.model.vocab_size = bench.vocab_size
  split = bench.splits["train"]
  n = len(split.image_ids)
  images = eval_arrays(split, *bench.tokens["train"])["image"]
  ids, mask = bench.tokens["train"]
  teacher = from_workdir(teacher_dir)
  t_ids, t_mask = teacher.tokenize([t for caps in split.captions for t in caps])
  t0 = time.perf_counter()
  cache = FeatureCache(cache_split(teacher, teacher, images=images, captions=split.captions,
                                   image_ids=split.image_ids, out_dir=os.path.join(workdir, "train"),
                                   batch_size=64, top_n=_TOP_N.value, bank=("i2t",), log=print))
  cache_seconds = time.perf_counter() - t0

  model = build_model(config.model)
  params = init_params(model, config.model, jax.random.PRNGKey(0))
  net = towers(model)
  tx = optax.adamw(1e-4)

  def student(p, batch):
    img, _ = net.embed_image(p, batch["image"])
    txt, _ = net.embed_text(p, batch["ids"], batch["mask"])
    return img @ txt.T, net.temperature(p)

  def online_targets(batch, negatives):
    tp = teacher.params
    t_sim = teacher.embed_images(tp, batch["image"]) @ teacher.embed_texts(tp, batch["t_ids"], batch["t_mask"]).T
    cand = jnp.concatenate([jnp.arange(b)[:, None], negatives], 1)            # [B, 1+m]
    scores = teacher.match_scores(tp, jnp.repeat(batch["image"], m + 1, axis=0),
                                  batch["t_ids"][cand.reshape(-1)], batch["t_mask"][cand.reshape(-1)])
    return t_sim, scores.reshape(b, m + 1), jnp.ones((b, m + 1), bool)

  def cached_targets(batch, negatives):
    t_sim = batch["t_image_emb"] @ batch["t_text_emb"].T
    rows = batch["caption_row"][jnp.concatenate([jnp.arange(b)[:, None], negatives], 1)]  # [B, 1+m]
    hit = rows[:, :, None] == batch["bank_index"][:, None, :]                            # [B, 1+m, N]
    found = hit.any(-1)
    scores = jnp.sum(jnp.where(hit, batch["bank_score"][:, None, :], 0.0), -1)
    scores = scores.at[:, 0].set(jnp.where(found[:, 0], scores[:, 0], batch["bank_score"].max(-1)))
    return t_sim, scores, found.at[:, 0].set(True)

  def make_step(targets):
    def loss_fn(p, batch):
      sim, tau = student(p, batch)
      l_itc, _ = contrastive_loss(sim / tau, sim.T / tau, jnp.arange(b))
      same = batch["image_row"][:, None] == batch["image_row"][None, :]
      negatives = choose_negatives(sim, same, m, "hard", jax.random.PRNGKey(0))
      t_sim, t_scores, valid = targets(batch, negatives)
      l_kd, _ = kl_divergence(sim, t_sim, tau)
      student_cand = jnp.take_along_axis(sim, jnp.concatenate([jnp.arange(b)[:, None], negatives], 1), 1)
      l_list, _ = listwise_distillation(student_cand, t_scores, tau, valid=valid)
      return l_itc + l_kd + l_list

    @jax.jit
    def step(p, opt, batch):
      loss, grads = jax.value_and_grad(loss_fn)(p, batch)
      updates, opt = tx.update(grads, opt, p)
      return optax.apply_updates(p, updates), opt, loss
    return step

  rng = np.random.default_rng(0)

  def host_batch(cached: bool):
    r = rng.choice(n, b, replace=False)
    c = rng.integers(ids.shape[1], size=b)
    batch = {"image": images[r], "ids": ids[r, c], "mask": mask[r, c], "image_row": r}
    if cached:
      got = cache.lookup(split.image_ids[r])
      batch.update(t_image_emb=got["image_emb"], t_text_emb=got["text_emb"][np.arange(b), c],
                   bank_index=got["i2t_index"], bank_score=got["i2t_score"],
                   caption_row=(r * ids.shape[1] + c).astype(np.int32))
    else:
      flat = r * ids.shape[1] + c
      batch.update(t_ids=t_ids[flat], t_mask=t_mask[flat])
    return batch

  results = {}
  for name, targets, cached in (("online teacher", online_targets, False),
                                ("cached teacher", cached_targets, True)):
    step = make_step(targets)
    p, opt = params, tx.init(params)
    t0 = time.perf_counter()
    p, opt, loss = step(p, opt, host_batch(cached))
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    p, opt, loss = step(p, opt, host_batch(cached))
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
      p, opt, loss = step(p, opt, host_batch(cached))
    jax.block_until_ready(loss)
    results[name] = dict(step_s=(time.perf_counter() - t0) / _STEPS.value, compile_s=compile_s)

  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree)) / 1e6
  print(f"\nteacher {_TEACHER.value or 'untrained configs/teacher.py:cpu'} "
        f"({size(teacher.params):.2f}M params), student {size(params):.2f}M params, "
        f"batch {b}, m={m}, bank top-{cache.meta['top_n']}; cache of {n} images built in "
        f"{cache_seconds:.1f} s; {jax.device_count()} {jax.devices()[0].platform} device(s)\n")
  print("| teacher | s/step | examples/s | compile s |\n|---|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | {r['step_s']:.3f} | {b / r['step_s']:.1f} | {r['compile_s']:.1f} |")
  ratio = results["online teacher"]["step_s"] / results["cached teacher"]["step_s"]
  print(f"\ncached step is {ratio:.2f}x faster than the online-teacher step")


if __name__ == "__main__":
  app.run(main)
