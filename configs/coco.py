r"""The recipes on COCO or Flickr30K (Karpathy splits, 224 px) at paper scale, with pretrained
teachers from Hugging Face checkpoint directories (nothing is downloaded: point at your copies).

Data: Karpathy's caption_datasets.zip (dataset_coco.json / dataset_flickr30k.json) and the images
(COCO: the folder holding train2014/ and val2014/; Flickr30K: flickr30k-images/). Defaults below
are data/coco/... and data/flickr30k/...; override with --config.data.karpathy_json=... and
--config.data.image_root=.... COCO trains on train+restval (113,287 images) and is scored on the
5K test split and its five 1K folds ("dual_1k" in eval.json); Flickr30K on train / the 1K test.

Argument: RECIPE[,DATASET][,tiny]
  RECIPE   dual | loopitr | mcad | unimodal_kd
  DATASET  coco (default) | flickr30k
  tiny     the recipe's tiny network and step count on the same data (smoke runs, tests)

  # CLIP-style dual encoder (ITC), ViT-B/16 + 6-layer text from scratch (paper presets)
  python -m jaxdistill.main --config=configs/coco.py:dual --workdir=runs/coco_dual
  # LoopITR (paper 003 §4.1 sizes), no teacher
  python -m jaxdistill.main --config=configs/coco.py:loopitr --workdir=runs/coco_loopitr
  # MCAD (paper 001) with the on-device student (EfficientNet-Lite0 at 224 px + MiniLM-L6's first
  # 3 layers, from the packaged weights): cache the CLIP teacher once (at its own resolution and
  # with its own tokenizer), then distil from the cache. L_GT + L_CLIP (Table 1's
  # Leaner-and-Faster row) needs the CLIP teacher only; MCAD's mt+mt_fa also needs a cross teacher
  # that reads the student's MiniLM token ids (--config.teachers.cross.path=<a LoopITR run>).
  # (the cache goes to runs/coco_clip_cache/train: --config.teacher_cache.dir and
  # --config.teachers.dual.path move it)
  python -m jaxdistill.main --config=configs/coco.py:mcad --workdir=runs/coco_clip_cache \
      --mode=cache_teacher --config.teachers.clip.path=checkpoints/clip-vit-base-patch16
  python -m jaxdistill.main --config=configs/coco.py:mcad --workdir=runs/coco_mcad
  # Paper 004: the first halves of a ViT / BEiT / data2vec-vision and of a BERT + a shared layer,
  # KD from the whole image checkpoint; its normalisation is the data's (data.preprocessor)
  python -m jaxdistill.main --config=configs/coco.py:unimodal_kd,image=BEIT_DIR,text=BERT_DIR \
      --workdir=runs/coco_ukd

CPRD runs on the bundled benchmark only for now (its cross-encoder input queue keeps the train
images in memory), and so do mined hard negatives; Leaner-and-Faster's stage 1 reads real
unpaired corpora (data.unpaired_images / unpaired_texts): README "Your own data".
"""

import os

import ml_collections

from jaxdistill.config import ConfigError

RECIPES = ("dual", "loopitr", "mcad", "unimodal_kd")
DATASETS = {"coco": ("data/coco/dataset_coco.json", "data/coco/images"),
            "flickr30k": ("data/flickr30k/dataset_flickr30k.json", "data/flickr30k/images")}
SIDE = 224
CLIP_CACHE = "runs/coco_clip_cache"    # mcad: --mode=cache_teacher writes <dir>/train
USAGE = "RECIPE[,coco|flickr30k][,tiny][,image=DIR,text=DIR (unimodal_kd)]"


def _recipe_config(recipe: str, preset: str, paths: str) -> ml_collections.ConfigDict:
  """configs/<recipe>.py's get_config, loaded as --config= loads it."""
  from jaxdistill.config import load_config_file
  here = os.path.dirname(os.path.abspath(__file__))
  arg = preset + (f",{paths}" if paths else "")
  return load_config_file(os.path.join(here, f"{recipe}.py:{arg}"))


def get_config(arg: str = "dual") -> ml_collections.ConfigDict:
  tokens = [t.strip() for t in arg.split(",") if t.strip()]
  paths = ",".join(t for t in tokens if "=" in t)
  words = [t for t in tokens if "=" not in t]
  recipe = words[0] if words else "dual"
  dataset = next((w for w in words[1:] if w in DATASETS), "coco")
  tiny = "tiny" in words[1:]
  if (recipe not in RECIPES or any(w not in DATASETS and w != "tiny" for w in words[1:])
      or (paths and recipe != "unimodal_kd")):
    raise ConfigError(f"configs/coco.py:{arg}: use {USAGE} with RECIPE one of {', '.join(RECIPES)}")
  if recipe == "unimodal_kd":
    image = dict(t.partition("=")[::2] for t in paths.split(",") if t).get("image")
    if not image:
      raise ConfigError(f"configs/coco.py:{arg}: unimodal_kd on real images needs the image "
                        "checkpoint: configs/coco.py:unimodal_kd,image=DIR[,text=DIR]")
    config = _recipe_config(recipe, "tiny" if tiny else "cpu", paths)
    config.data.preprocessor = image   # the teacher reads the images as they come: its constants
  elif recipe == "mcad" and not tiny:
    config = _recipe_config(recipe, "mobile", "")
  else:
    config = _recipe_config(recipe, "tiny" if tiny else "paper", "")

  d = config.data
  d.name = dataset
  d.karpathy_json, d.image_root = DATASETS[dataset]
  d.image_size = d.image_resize = SIDE   # resize + centre crop (CLIP's processor) / RandomResizedCrop
  m = config.model
  m.image_size, m.channels, m.image_pool = SIDE, 3, "cls"
  if m.image_tower == "vit" and not tiny:
    m.patch_size = 16                     # ViT-B/16
  elif m.image_tower == "vit":
    m.patch_size = 32
  elif m.image_tower == "efficientnet_lite0":
    m.patch_size = SIDE                   # one cell: token 0 = the global average (7 x 7 head map)
    m.efficientnet_input_size = SIDE
  m.max_len = max(m.max_len, 40)          # COCO captions: ~95% within 32 MiniLM tokens
  config.eval.split = "test"
  config.eval.batch_size = 64
  if not tiny:
    config.batch_size = 256 if recipe != "mcad" else 128
    config.train.num_steps = 30_000 if recipe != "mcad" else 20_000
    config.train.log_every, config.train.checkpoint_every = 50, 1000
    config.train.eval_every = 5000        # val split: model selection on val, report on test
    config.optim.warmup_steps = 1000
  if recipe == "mcad":   # the dual teacher: CLIP's features of the train split, cached once
    config.mcad.loss = "gt+clip"
    config.mcad.teacher_temperature = 0.0   # the cached CLIP's own (stored in the cache)
    config.teachers.clip = ml_collections.ConfigDict(dict(
        kind="pretrained", path="checkpoints/clip-vit-base-patch16", dtype="float32", shard=False))
    config.teacher_cache.teacher, config.teacher_cache.splits = "clip", "train"
    config.teacher_cache.dir = CLIP_CACHE
    config.teachers.dual.kind, config.teachers.dual.path = "cache", f"{CLIP_CACHE}/train"
  return config
