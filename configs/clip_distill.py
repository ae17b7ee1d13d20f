r"""A ViT-B/16 student distilled from CLIP ViT-L/14 at global batch 32,768: Leaner-and-Faster's
stage 2 (paper 000 §3.2.2: InfoNCE over the global batch + KD from the frozen teacher's
embeddings, both towers training) at the scale docs/scaling.md models, with the memory levers
that fit each slice there (XLA's memory analysis of this config's compiled step,
benchmarks/scaling.py).

Argument: the slice: v5e-256 (TPU v5e, 16 GiB per chip) | h100x64 (8 nodes x 8 H100, 80 GB).

  launch/tpu_vm.sh NAME ZONE configs/clip_distill.py:v5e-256 gs://BUCKET/runs/clip_distill
  launch/gke_xpk.sh CLUSTER clip-distill v5litepod-256 1 IMAGE configs/clip_distill.py:v5e-256 \
      gs://BUCKET/runs/clip_distill
  sbatch --nodes=8 launch/slurm_gpu.sbatch configs/clip_distill.py:h100x64 /shared/runs/clip_distill
  (DRY_RUN=1 before any of them prints the commands it would run.)

Needs: CLIP ViT-L/14 as a Hugging Face checkpoint directory (--config.teachers.teacher.path,
default checkpoints/clip-vit-large-patch14), whose tokenizer.json the student reads too (the KD
terms compare both networks' embeddings of the same captions), and the data: COCO's Karpathy
split by default (configs/coco.py's paths; --config.data.karpathy_json / image_root), which at
this batch is 17 steps an epoch: a web-scale corpus (--config.data.name=webdataset) is what such
a batch is for (README "Your own data").
"""

import os

import ml_collections

from jaxdistill.config import ConfigError, clip_vit_b16_towers, load_config_file, teacher_section
from jaxdistill.methods.leaner_faster import section as leaner_faster_section

TEACHER = "checkpoints/clip-vit-large-patch14"
TEACHER_EMBED_DIM = 768        # CLIP ViT-L/14's projection_dim: the student's embed_dim
GLOBAL_BATCH = 32_768
# The levers per slice: row 5 of docs/scaling.md's tables (XLA:TPU's memory analysis of this
# step): fsdp over every device + full remat + bfloat16 compute, no accumulation; peak 4.8 of
# 16 GiB per v5e chip, 9.3 of 74.5 GiB per H100.
SLICES = {
    "v5e-256": dict(fsdp=256, remat="full", dtype="bfloat16", accum_steps=1),
    "h100x64": dict(fsdp=64, remat="full", dtype="bfloat16", accum_steps=1),
}


def get_config(arg: str = "v5e-256") -> ml_collections.ConfigDict:
  if arg not in SLICES:
    raise ConfigError(f"configs/clip_distill.py:{arg}: use one of {', '.join(SLICES)}")
  here = os.path.dirname(os.path.abspath(__file__))
  config = load_config_file(os.path.join(here, "coco.py:dual"))
  clip_vit_b16_towers(config.model)
  config.model.embed_dim = TEACHER_EMBED_DIM
  config.method = "leaner_faster"
  config.leaner_faster = leaner_faster_section()
  config.leaner_faster.tower = "both"          # w/o SF: both towers against T' at once
  config.teachers.teacher = teacher_section("pretrained", TEACHER)
  config.teachers.teacher.update(dtype="bfloat16", shard=True)
  config.data.tokenizer = os.path.join(TEACHER, "tokenizer.json")
  config.batch_size = GLOBAL_BATCH
  config.train.num_steps, config.optim.warmup_steps = 2_000, 200
  config.train.log_every, config.train.checkpoint_every, config.train.eval_every = 10, 200, 500
  levers = SLICES[arg]
  config.mesh.fsdp = levers["fsdp"]
  config.model.remat, config.model.dtype = levers["remat"], levers["dtype"]
  config.train.accum_steps = levers["accum_steps"]
  return config
