"""Train-step throughput of jaxdistill's dual encoder against open_clip's CLIP, side by side and
alternating in one run on this CPU, plus the jaxdistill step's achieved FLOP/s against a matmul
peak measured in the same run.

  # in its own venv (pyproject's `throughput` extra: PyPI's CUDA torchvision breaks transformers'
  # torch models next to the CPU torch): python3 -m venv .venv-throughput &&
  # .venv-throughput/bin/pip install -c constraints.txt -e '.[throughput]'
  .venv-throughput/bin/python benchmarks/throughput.py [--steps=5] [--rounds=5] [--batches=32,128,256] \
      [--vit_b_batch=8] [--rows=cpu32,cpu128,cpu256,vit_b16] [--profile_dir=DIR] [--xla_dump_dir=DIR]

Rows: the cpu preset's student (configs/dual.py:cpu) at each of --batches, and a ViT-B/16-sized
student (jaxdistill/config.py clip_vit_b16_towers) at --vit_b_batch. jaxdistill: the trainer's
step (train/loop.py build_state + train/step.py make_train_step, the dual recipe's ITC loss,
AdamW). open_clip (PyPI open-clip-torch): an open_clip.model.CLIP with the same towers (widths,
depths, heads, MLP, patch, image size and channels, vocab, context length, embed dim, pooling),
its own open_clip.loss.ClipLoss and torch.optim.AdamW with the config's lr / betas / weight decay
(decay on matrices only, as jaxdistill). Where open_clip has no equivalent option the module is
swapped for the same computation (the cpu preset's per-patch conv stem and its "concat" image
pooling); the remaining differences (parameter counts printed side by side): jaxdistill's patch
conv and vision projection have a bias, open_clip's position table has a row for the class token,
flax's GELU is the tanh approximation (torch: exact), and jaxdistill's text tower applies its
padding mask (all ones here) while open_clip's has no mask (no_causal_mask=True).

Per row: both models are built and warmed up (jax: compile + 1 step; torch: 2 steps), then
--rounds rounds of [--steps jax steps, --steps torch steps]; reported: median examples/s of each
and jax / torch. FLOP/s: XLA's cost analysis of the compiled step (flops) / median step time;
peak: the faster of a float32 jnp.dot and a numpy (BLAS) matmul of --peak_n x --peak_n, best of
a few. Both frameworks use every core: XLA's CPU client its default (all cores), torch
set_num_threads(os.cpu_count()). --profile_dir writes a jax.profiler trace of a few jaxdistill
steps per row and prints the XLA ops taking the most time; --xla_dump_dir dumps the HLO (the
step: module_*.jit_step_fn.cpu_after_optimizations.txt, where the profile's fusion names are).
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import statistics
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:   # run as a script: benchmarks/ is a plain directory
  sys.path.insert(0, REPO)
from benchmarks import memory_levers  # noqa: E402  (defines --vit_b_batch, reused here)
from benchmarks.common import cpu_model, synthetic_batch, trainer  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps of each framework per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds (jax steps, torch steps) per row.")
_BATCHES = flags.DEFINE_list("batches", ["32", "128", "256"], "Batches of the cpu-preset rows.")
_VIT_B_BATCH = memory_levers._VIT_B_BATCH   # --vit_b_batch: batch of the ViT-B/16-sized row
_ROWS = flags.DEFINE_list("rows", [], "Subset of rows to run (cpu<batch>, vit_b16); [] = all.")
_PEAK_N = flags.DEFINE_integer("peak_n", 2048, "Side of the square float32 matmuls of the peak.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of a few "
                                   "jaxdistill steps per row here and print the top XLA ops.")
_XLA_DUMP_DIR = flags.DEFINE_string("xla_dump_dir", "", "Dump XLA's HLO (text) here.")

HEADER = ("| student | batch | jaxdistill params | open_clip params | jaxdistill ex/s | "
          "open_clip ex/s | ratio | jaxdistill step GFLOP | achieved GFLOP/s | "
          "% of matmul peak |")
COLUMNS = len(HEADER.strip("|").split("|"))


# ---------------------------------------------------------------------------------- config ---

def row_config(student: str, batch: int):
  """configs/dual.py:cpu, or its ViT-B/16-sized student (config.clip_vit_b16_towers), at
  `batch`."""
  from jaxdistill.config import clip_vit_b16_towers, load_config_file
  config = load_config_file(os.path.join(REPO, "configs", "dual.py:cpu"))
  if student == "vit_b16":
    clip_vit_b16_towers(config.model)
  elif student != "cpu":
    raise ValueError(f"unknown student {student!r}: cpu | vit_b16")
  config.batch_size = batch
  return config


# ------------------------------------------------------------------------------------- jax ---

def build_jax(config, host_batch) -> dict:
  """The trainer's jitted step (benchmarks/common.py `trainer`) on one device:
  {"step": state -> state (runs one step, blocks), "params", "flops", "compile_s"}."""
  import jax
  from jaxdistill.data import pipeline
  from jaxdistill.parallel.mesh import make_mesh

  mesh = make_mesh(devices=jax.devices()[:1])
  recipe, built = trainer(config, mesh, pipeline.global_batch_spec(host_batch))
  shardings = built["shardings"]
  state = built["init"]()
  batch = pipeline.to_global_batch(host_batch, shardings["batch"])
  frozen = jax.device_put(recipe.frozen, shardings["frozen"])
  t0 = time.perf_counter()
  compiled = built["step"].lower(state, batch, frozen).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", float("nan")))
  params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch, frozen)
    jax.block_until_ready(metrics)
    return metrics

  return {"step": step, "params": params, "flops": flops, "compile_s": compile_s}


# ----------------------------------------------------------------------------------- torch ---

def import_open_clip():
  """open_clip's CLIP, its config classes and ClipLoss.

  open_clip.utils imports torchvision, whose PyPI 0.28.0 wheel (the one for torch 2.13.0) is a
  CUDA build: its C++ ops library links libtorch_cuda / libc10_cuda, absent from the CPU torch,
  so it does not load, and torchvision/_meta_registrations.py then fails registering fake
  kernels for torchvision::nms / qnms, which nothing defined. Defining those two operator
  schemas (no kernels) lets torchvision's Python import; nothing here calls a torchvision op
  (open_clip's ViT and text towers are plain torch)."""
  import importlib.util

  import torch
  spec = importlib.util.find_spec("torchvision")
  if spec is not None and spec.submodule_search_locations:
    so = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    loaded = False
    if so:
      try:
        torch.ops.load_library(so[0])
        loaded = True
      except OSError:
        pass
    if not loaded and not hasattr(torch.ops.torchvision, "nms"):
      lib = torch.library.Library("torchvision", "DEF")
      lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      import_open_clip.keep = lib   # the schemas live as long as the Library object
  import open_clip
  from open_clip.loss import ClipLoss
  from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
  return open_clip, CLIP, CLIPVisionCfg, CLIPTextCfg, ClipLoss


def _torch_conv_stem(channels: int, hidden: int, patch: int):
  """models/vit.py ConvPatchStem in torch, as open_clip's conv1 ([B, C, H, W] ->
  [B, D, rows, cols]): per patch, conv 3x3 s2 (D/4) -> GELU -> conv 3x3 s2 (D/2) -> GELU ->
  Linear(D). Padding: flax "SAME" with stride 2 on an even side pads (0, 1)."""
  from torch import nn
  from torch.nn import functional as F

  class ConvPatchStem(nn.Module):
    def __init__(self):
      super().__init__()
      w0, w1 = max(1, hidden // 4), max(1, hidden // 2)
      self.conv0 = nn.Conv2d(channels, w0, 3, stride=2)
      self.conv1 = nn.Conv2d(w0, w1, 3, stride=2)
      side = patch
      for _ in range(2):
        side = -(-side // 2)
      self.to_hidden = nn.Linear(w1 * side * side, hidden)

    @staticmethod
    def _same(x):
      h = x.shape[-1]
      total = max((-(-h // 2) - 1) * 2 + 3 - h, 0)
      lo = total // 2
      return F.pad(x, (lo, total - lo, lo, total - lo))

    def forward(self, x):
      b, c, h, w = x.shape
      rows, cols = h // patch, w // patch
      x = x.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
      x = x.reshape(b * rows * cols, c, patch, patch)
      x = F.gelu(self.conv0(self._same(x)))
      x = F.gelu(self.conv1(self._same(x)))
      x = self.to_hidden(x.flatten(1))
      return x.reshape(b, rows, cols, hidden).permute(0, 3, 1, 2)

  return ConvPatchStem()


def build_open_clip_model(config):
  """open_clip.model.CLIP with the towers of config.model (see the module docstring)."""
  import torch
  from torch import nn
  _, CLIP, CLIPVisionCfg, CLIPTextCfg, _ = import_open_clip()
  m = config.model
  if m.image_tower != "vit" or m.text_tower != "transformer" or m.text_pool != "cls":
    raise ValueError("the open_clip twin covers the vit image tower and transformer text tower "
                     "with cls text pooling")
  vision = CLIPVisionCfg(layers=m.vision_layers, width=m.vision_width,
                         head_width=m.vision_width // m.vision_heads,
                         mlp_ratio=m.vision_mlp / m.vision_width, patch_size=m.patch_size,
                         image_size=m.image_size, no_ln_pre=True, pool_type="tok")
  text = CLIPTextCfg(context_length=m.max_len, vocab_size=m.vocab_size, width=m.text_width,
                     heads=m.text_heads, layers=m.text_layers,
                     mlp_ratio=m.text_mlp / m.text_width, no_causal_mask=True,
                     pool_type="first", proj_bias=True)
  model = CLIP(m.embed_dim, vision, text, init_logit_scale=math.log(1 / m.temperature_init),
               output_dict=True)
  visual = model.visual
  if m.stem == "conv":
    visual.conv1 = _torch_conv_stem(m.channels, m.vision_width, m.patch_size)
  elif m.channels != 3:   # open_clip's patch conv is fixed to 3 input channels
    visual.conv1 = nn.Conv2d(m.channels, m.vision_width, m.patch_size, stride=m.patch_size,
                             bias=False)
  if m.image_pool == "concat":   # the P patch tokens (after ln_post), concatenated
    num_patches = (m.image_size // m.patch_size) ** 2
    visual._global_pool = lambda x: (x[:, 1:].reshape(x.shape[0], -1), x[:, 1:])
    visual.proj = nn.Parameter(m.vision_width ** -0.5 * torch.randn(
        num_patches * m.vision_width, m.embed_dim))
  return model


def build_torch(config, host_batch) -> dict:
  """{"step": runs one open_clip train step, "params"}: CLIP forward, ClipLoss, backward,
  AdamW (lr / betas / weight decay of config.optim, decay on matrices only)."""
  import torch
  _, _, _, _, ClipLoss = import_open_clip()
  torch.manual_seed(0)
  model = build_open_clip_model(config).train()
  o = config.optim
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=o.learning_rate, betas=(o.b1, o.b2), eps=1e-8)
  loss_fn = ClipLoss()
  images = torch.from_numpy(host_batch["image"]).permute(0, 3, 1, 2).contiguous()
  ids = torch.from_numpy(host_batch["text_ids"]).long()

  def step():
    out = model(images, ids)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())

  params = int(sum(p.numel() for p in model.parameters()))
  return {"step": step, "params": params}


# ------------------------------------------------------------------------------ measurement ---

def matmul_peak(n: int, reps: int = 3) -> dict:
  """Best-of-`reps` GFLOP/s of a float32 n x n matmul: {"jax": .., "numpy": ..}."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
  flop = 2.0 * n ** 3
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  dot = jax.jit(jnp.dot)
  dot(ja, jb).block_until_ready()
  best = {"jax": math.inf, "numpy": math.inf}
  np.dot(a, b)
  for _ in range(reps):
    t0 = time.perf_counter()
    dot(ja, jb).block_until_ready()
    best["jax"] = min(best["jax"], time.perf_counter() - t0)
    t0 = time.perf_counter()
    np.dot(a, b)
    best["numpy"] = min(best["numpy"], time.perf_counter() - t0)
  return {k: flop / s / 1e9 for k, s in best.items()}


def _timed(step, steps: int) -> float:
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - t0) / steps


def run_row(student: str, batch: int, steps: int, rounds: int, peak_gflops: float,
            profile_dir: str = "") -> dict:
  """Builds both, warms up, alternates `rounds` x (steps jax, steps torch); the row's dict."""
  config = row_config(student, batch)
  host_batch = synthetic_batch(config)
  jx = build_jax(config, host_batch)
  th = build_torch(config, host_batch)
  t0 = time.perf_counter()
  jx["step"]()
  first_s = time.perf_counter() - t0
  th["step"]()
  th["step"]()
  jax_s, torch_s = [], []
  for _ in range(rounds):
    jax_s.append(_timed(jx["step"], steps))
    torch_s.append(_timed(th["step"], steps))
  jax_step, torch_step = statistics.median(jax_s), statistics.median(torch_s)
  achieved = jx["flops"] / jax_step / 1e9
  row = dict(student=student, batch=batch, jax_params=jx["params"], torch_params=th["params"],
             jax_ex_s=batch / jax_step, torch_ex_s=batch / torch_step,
             ratio=torch_step / jax_step, gflop=jx["flops"] / 1e9, gflops=achieved,
             peak_pct=100.0 * achieved / peak_gflops, compile_s=jx["compile_s"],
             first_step_s=first_s, jax_step_s=jax_step, torch_step_s=torch_step)
  if profile_dir:
    row["profile"] = profile_jax(jx["step"], os.path.join(profile_dir, f"{student}_{batch}"))
  return row


def format_row(r: dict) -> str:
  return (f"| {r['student']} | {r['batch']} | {r['jax_params']:,} | {r['torch_params']:,} | "
          f"{r['jax_ex_s']:,.1f} | {r['torch_ex_s']:,.1f} | {r['ratio']:.2f} | "
          f"{r['gflop']:,.2f} | {r['gflops']:,.1f} | {r['peak_pct']:.1f} |")


# ------------------------------------------------------------------------------- profiling ---

def profile_jax(step, directory: str, steps: int = 3, top: int = 12) -> str:
  """Traces `steps` (already compiled) jaxdistill steps with jax.profiler into `directory` and
  returns a summary: the wall time per step and the XLA ops (events of the trace's perfetto
  JSON) taking the most total time."""
  import jax
  os.makedirs(directory, exist_ok=True)
  t0 = time.perf_counter()
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    for _ in range(steps):
      step()
  per_step = (time.perf_counter() - t0) / steps
  lines = [f"  traced {steps} steps: {per_step * 1e3:.1f} ms/step (with tracing on) -> "
           f"{directory}"]
  traces = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
                  + glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"),
                              recursive=True), key=os.path.getmtime)
  if not traces:
    return "\n".join(lines + ["  (no JSON trace written: open the .xplane.pb in TensorBoard)"])
  with gzip.open(traces[-1], "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  threads = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", "")
  total = collections.Counter()
  count = collections.Counter()
  skip = ("PjitFunction", "PjRt", "ExecuteHelper", "Execute", "ThunkExecutor", "TraceMe")
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    name = str(e.get("name", ""))
    if any(name.startswith(s) for s in skip) or name.startswith("$"):
      continue
    total[name] += float(e["dur"])
    count[name] += 1
  all_us = sum(total.values()) or 1.0
  lines.append(f"  top XLA ops by total time over {steps} steps (of {all_us / 1e3:.1f} ms of "
               f"events; nested events overlap), trace {traces[-1]}:")
  for name, us in total.most_common(top):
    lines.append(f"    {us / 1e3 / steps:9.2f} ms/step  x{count[name] // steps:<4d} {name[:90]}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------ main ---

def selected_rows(batches, vit_b_batch: int, rows) -> list[tuple[str, int]]:
  out = [("cpu", int(b)) for b in batches] + [("vit_b16", vit_b_batch)]
  if rows:
    names = {f"{s}{b}" if s == "cpu" else s: (s, b) for s, b in out}
    unknown = [r for r in rows if r not in names]
    if unknown:
      raise app.UsageError(f"--rows {unknown} unknown: use any of {', '.join(names)}")
    out = [names[r] for r in rows]
  return out


def main(argv):
  del argv
  if _XLA_DUMP_DIR.value:   # before jax creates its backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to="
                               f"{_XLA_DUMP_DIR.value} --xla_dump_hlo_as_text").strip()
  import jax
  import torch
  torch.set_num_threads(os.cpu_count())
  open_clip = import_open_clip()[0]
  rows = selected_rows(_BATCHES.value, _VIT_B_BATCH.value, _ROWS.value)
  peak = matmul_peak(_PEAK_N.value)
  peak_name = max(peak, key=peak.get)
  header = (f"jax {jax.__version__} (backend {jax.default_backend()}, XLA CPU client: all "
            f"{os.cpu_count()} cores), torch {torch.__version__} "
            f"(set_num_threads({os.cpu_count()}): {torch.get_num_threads()} intra-op threads), "
            f"open_clip {open_clip.__version__}; CPU {cpu_model()} x {os.cpu_count()}; "
            f"float32 matmul peak ({_PEAK_N.value}^2): {peak[peak_name]:,.1f} GFLOP/s "
            f"({peak_name}; jax.numpy.dot {peak['jax']:,.1f}, numpy {peak['numpy']:,.1f}); "
            f"{_ROUNDS.value} alternating rounds of {_STEPS.value} steps, medians")
  print(header, flush=True)
  results = []
  for student, batch in rows:
    r = run_row(student, batch, _STEPS.value, _ROUNDS.value, peak[peak_name],
                _PROFILE_DIR.value)
    results.append(r)
    print(f"{format_row(r)}  (jax compile {r['compile_s']:.1f} s, first step "
          f"{r['first_step_s']:.2f} s, step {r['jax_step_s'] * 1e3:.1f} ms; torch step "
          f"{r['torch_step_s'] * 1e3:.1f} ms)", flush=True)
    if "profile" in r:
      print(r["profile"], flush=True)
  print(f"\n{header}\n")
  print(HEADER)
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  print("\n".join(format_row(r) for r in results))


if __name__ == "__main__":
  app.run(main)
