"""Real data end to end, through the command line (issue 16, acceptance 2): a Karpathy-format
COCO fixture (36 tiny JPEGs; in train+restval and in test one corrupt and one missing image) and
a tiny random CLIP checkpoint made here with transformers (its own tokenizer.json and
preprocessor_config.json) as the dual teacher ->
  1. --mode=cache_teacher: the teacher's features of the train and test splits;
  2. --mode=train: an MCAD student (L_GT + L_CLIP, paper 001 eq. 14-15) distilled from the
     cached teacher (teachers.dual.kind=cache), skipping and counting the bad training images;
     and from the same teacher online, reading the captions in its own vocabulary;
  3. its eval.json against a plain numpy transcription of the Karpathy protocol on the student's
     own embeddings of the fixture's test split (bad images and their captions left out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.real_data_fixtures import caption, jpeg_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ["train"] * 16 + ["restval"] * 4 + ["val"] * 4 + ["test"] * 12
CORRUPT, MISSING = (3, 30), (5, 33)        # one of each in train+restval and in test
SIDE = 32                                  # the teacher's and the student's input side
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_fixture(root) -> tuple[str, str]:
  image_root = root / "images"
  (image_root / "val2014").mkdir(parents=True)
  entries = []
  for i, split in enumerate(SPLITS):
    name = f"COCO_val2014_{i:012d}.jpg"
    if i in CORRUPT:
      (image_root / "val2014" / name).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    elif i not in MISSING:
      (image_root / "val2014" / name).write_bytes(jpeg_bytes(i, (48 + i % 5, 40 + i % 7)))
    entries.append({"filepath": "val2014", "filename": name, "imgid": i, "cocoid": 500 + i,
                    "split": split,
                    "sentences": [{"raw": caption(i, c)} for c in range(5)]})
  path = root / "dataset_coco.json"
  path.write_text(json.dumps({"dataset": "coco", "images": entries}))
  return str(path), str(image_root)


def write_clip(directory) -> None:
  """A random CLIP (1 layer, width 32, 32 px, patch 8, E = 16) with a word-level tokenizer of the
  fixture's caption words bracketed by <|startoftext|> ... <|endoftext|>, and CLIP's image
  processor config at 32 px."""
  import tokenizers
  import torch
  import transformers
  from tokenizers import models, pre_tokenizers, processors
  words = sorted({w for i in range(len(SPLITS)) for c in range(5) for w in caption(i, c).split()})
  vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "<unk>"] + words)}
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>",
      special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
  tokenizer.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
  tower = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
  config = transformers.CLIPConfig(
      text_config=dict(tower, vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0,
                       eos_token_id=1, pad_token_id=1),
      vision_config=dict(tower, image_size=SIDE, patch_size=8), projection_dim=16)
  torch.manual_seed(0)
  transformers.CLIPModel(config).save_pretrained(directory)
  tokenizer.save(os.path.join(directory, "tokenizer.json"))
  transformers.CLIPImageProcessor(size={"shortest_edge": SIDE},
                                  crop_size={"height": SIDE, "width": SIDE}).save_pretrained(directory)


def run_main(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  done = subprocess.run([sys.executable, "-m", "jaxdistill.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done


def numpy_recall(img: np.ndarray, txt: np.ndarray, owner: np.ndarray) -> dict[str, float]:
  """The Karpathy protocol written out: an image hits at k when any of its captions is among
  its k highest-scoring captions; a caption hits when its image is among its k best images."""
  sim = img.astype(np.float64) @ txt.astype(np.float64).T
  out = {}
  for k in (1, 5, 10):
    i2t = [np.isin(np.argsort(-sim[i], kind="stable")[:k], np.flatnonzero(owner == i)).any()
           for i in range(len(img))]
    t2i = [owner[t] in np.argsort(-sim[:, t], kind="stable")[:k] for t in range(len(txt))]
    out[f"i2t_r{k}"], out[f"t2i_r{k}"] = 100 * np.mean(i2t), 100 * np.mean(t2i)
  return out


@pytest.mark.e2e
def test_clip_teacher_cache_distill_and_karpathy_eval(tmp_path):
  karpathy_json, image_root = write_fixture(tmp_path)
  clip_dir = tmp_path / "clip"
  write_clip(clip_dir)
  workdir = tmp_path / "run"
  data = ["--config.data.name=coco", f"--config.data.karpathy_json={karpathy_json}",
          f"--config.data.image_root={image_root}", f"--config.data.preprocessor={clip_dir}",
          "--config.data.num_threads=2", "--config.model.patch_size=8",
          "--config.model.image_pool=cls", "--config.batch_size=8"]
  common = ["--config=configs/mcad.py:tiny", f"--workdir={workdir}", *data]

  # 1. the CLIP teacher's features of the train split (train+restval) and of the test split
  run_main(*common, "--mode=cache_teacher", "--config.teachers.dual.kind=pretrained",
           f"--config.teachers.dual.path={clip_dir}", "--config.teacher_cache.teacher=dual",
           "--config.teacher_cache.splits=train,test", "--config.teacher_cache.batch_size=8")
  meta = json.loads((workdir / "teacher_cache" / "train" / "meta.json").read_text())
  assert meta["num_images"] == 20 and meta["captions_per_image"] == 5
  assert meta["invalid_rows"] == 2 and meta["embed_dim"] == 16   # the corrupt and missing image
  assert meta["temperature"] == pytest.approx(0.07, rel=1e-4)   # CLIP's initial logit scale

  # 2. a student distilled from the cached teacher (no teacher network in the step)
  out = run_main(*common, "--config.mcad.loss=gt+clip", "--config.teachers.dual.kind=cache",
                 f"--config.teachers.dual.path={workdir / 'teacher_cache' / 'train'}",
                 "--config.train.num_steps=6")
  results = json.loads((workdir / "eval.json").read_text())
  assert results["step"] == 6 and results["dataset"] == "coco_test"
  skipped = results["train_items_skipped"]
  assert skipped["corrupt"] >= 1 and skipped["missing"] >= 1, skipped
  assert results["skipped"] == {"corrupt": 1, "missing": 1}
  assert results["num_images"] == 10 and results["num_captions"] == 50
  assert "skipped_corrupt=" in out.stdout
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(m["clip"]) and np.isfinite(m["gt"]) for m in metrics)
  clip_json = json.loads((workdir / "clip_benchmark.json").read_text())
  assert clip_json["dataset"] == "jaxdistill/coco_test"

  # 2b. the same teacher online: it reads each caption in its own vocabulary (batch dual_text_ids)
  online = tmp_path / "online"
  run_main("--config=configs/mcad.py:tiny", f"--workdir={online}", *data,
           "--config.mcad.loss=gt+clip", "--config.teachers.dual.kind=pretrained",
           f"--config.teachers.dual.path={clip_dir}", "--config.train.num_steps=2")
  online_metrics = [json.loads(l) for l in (online / "metrics.jsonl").read_text().splitlines()]
  assert len(online_metrics) == 2 and all(np.isfinite(m["clip"]) for m in online_metrics)

  # 3. eval.json against numpy on the student's own embeddings of the readable test images
  from jaxdistill.data.real.image_ops import ImageSpec, eval_image
  from jaxdistill.data.real.text import TextEncoder
  from jaxdistill.store.run import load_run
  run = load_run(str(workdir))
  spec = ImageSpec(size=SIDE, resize=SIDE, mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD))
  test = [i for i, s in enumerate(SPLITS) if s == "test" and i not in CORRUPT + MISSING]
  images = np.stack([eval_image(os.path.join(image_root, "val2014", f"COCO_val2014_{i:012d}.jpg"),
                                spec) for i in test])
  encoder = TextEncoder.from_file(str(workdir / "tokenizer.json"), run.config.model.max_len)
  ids, mask = encoder.encode([caption(i, c) for i in test for c in range(5)])
  img = np.asarray(run.towers.embed_image(run.params, images)[0])
  txt = np.asarray(run.towers.embed_text(run.params, ids, mask)[0])
  want = numpy_recall(img, txt, np.repeat(np.arange(len(test)), 5))
  for key, value in want.items():
    assert results["dual"][key] == pytest.approx(value, abs=1e-6), key
  assert results["dual"]["rsum"] == pytest.approx(sum(want.values()), abs=1e-4)


@pytest.mark.parametrize("arg", ["dual", "loopitr", "mcad", "dual,flickr30k"])
def test_coco_presets_validate(arg):
  """configs/coco.py's paper-scale presets load and pass the config checks (paths are the user's)."""
  import jax
  from conftest import recipe_config
  from jaxdistill import methods
  from jaxdistill.config import validate
  config = recipe_config("coco", arg)
  assert config.data.name == (arg.split(",")[-1] if "," in arg else "coco")
  validate(config, jax.device_count(), "train")
  assert config.model.image_size == 224 and config.model.image_pool == "cls"
  if arg == "mcad":
    assert config.teachers.dual.kind == "cache" and config.mcad.loss == "gt+clip"
    assert config.model.image_tower == "efficientnet_lite0"
  del methods


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", ["dual", "loopitr"])
def test_coco_tiny_presets_train_on_the_fixture(tmp_path, recipe):
  """configs/coco.py:<recipe>,tiny trains and evaluates on the Karpathy fixture from the CLI."""
  karpathy_json, image_root = write_fixture(tmp_path)
  workdir = tmp_path / "run"
  run_main(f"--config=configs/coco.py:{recipe},tiny", f"--workdir={workdir}",
           f"--config.data.karpathy_json={karpathy_json}", f"--config.data.image_root={image_root}",
           "--config.data.image_size=32", "--config.data.image_resize=36",
           "--config.train.num_steps=2", "--config.batch_size=8", "--config.data.num_threads=2")
  results = json.loads((workdir / "eval.json").read_text())
  assert results["step"] == 2 and results["num_images"] == 10
  assert 0 <= results["dual"]["rsum"] <= 600


@pytest.mark.slow
def test_real_data_run_resumes_exactly(tmp_path):
  """SIGTERM mid-run on real data, then the same command: the per-step losses and the skipped-item
  totals equal an uninterrupted run's (grain's iterator state and the counts ride in the
  checkpoint)."""
  import signal
  import time
  from conftest import logged_losses, user_env
  karpathy_json, image_root = write_fixture(tmp_path)

  def command(workdir):
    return [sys.executable, "-m", "jaxdistill.main", "--config=configs/coco.py:dual,tiny",
            f"--workdir={workdir}", f"--config.data.karpathy_json={karpathy_json}",
            f"--config.data.image_root={image_root}", "--config.data.image_size=32",
            "--config.data.image_resize=36", "--config.train.num_steps=60", "--config.batch_size=8",
            "--config.train.log_every=1", "--config.train.checkpoint_every=100",
            "--config.data.num_threads=2"]

  reference = tmp_path / "reference"
  run = lambda workdir: subprocess.run(command(workdir), cwd=REPO, env=user_env(),
                                       capture_output=True, text=True, timeout=600)
  done = run(reference)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  resumed = tmp_path / "resumed"
  proc = subprocess.Popen(command(resumed), cwd=REPO, env=user_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (resumed / "metrics.jsonl").exists() and max(logged_losses(resumed), default=0) >= 3:
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "SIGTERM: saved step" in out, out[-2000:]
  finish = run(resumed)
  assert finish.returncode == 0 and "resumed from" in finish.stdout, finish.stdout[-2000:]
  assert logged_losses(resumed) == pytest.approx(logged_losses(reference), rel=1e-5)
  totals = lambda w: json.loads((w / "eval.json").read_text())["train_items_skipped"]
  assert totals(resumed) == totals(reference) and sum(totals(reference).values()) > 0
