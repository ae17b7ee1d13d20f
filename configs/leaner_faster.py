r"""Leaner-and-Faster (Ren & Zhu, paper 000): the whole two-stage pipeline, one resumable command.

  python -m jaxdistill.main --config=configs/leaner_faster.py --workdir=runs/leaner_faster
  python -m jaxdistill.main --config=configs/leaner_faster.py:cpu,wo_kd --workdir=runs/lf_wo_kd
  python -m jaxdistill.main --config=configs/leaner_faster.py:tiny --workdir=/tmp/lf \
      --config.teachers.teacher.path=runs/teacher_dual_tiny                      # seconds a stage

Needs a trained dual teacher: configs/teacher.py:dual (runs/teacher_dual, the default here) or
:dual_minilm (`,minilm` below); for :tiny any dual run, e.g.
  python -m jaxdistill.main --config=configs/dual.py:tiny --workdir=runs/teacher_dual_tiny

A Table 2 row shares its first stages with the full row of the same preset and seed (T', stage 1,
the teacher's banks: copied, not rerun; train/pipeline.py "Reuse"):
  python -m jaxdistill.main --config=configs/leaner_faster.py:cpu,wo_hn --workdir=runs/lf_wo_hn \
      --config.pipeline.reuse=runs/leaner_faster

Argument: PRESET[,ABLATION][,minilm][,text_layers=N]
  PRESET    cpu (default) | short (cpu with a third of its steps: the tables' preset on this
            2-core CPU, 9-24 min a seed for a row that runs every stage, by the machine) |
            tiny (tests: a few steps a stage)
  ABLATION  Table 2's rows: full (default) | wo_stage1 | stage1_mse | stage1_infonce | wo_sf |
            wo_kd | wo_hn | wo_kd_hn; or Table 1's baseline `direct`: the student trained with
            InfoNCE "throughout both stages" (§4.1) and no teacher signal: stage1_infonce's
            stage 1, then both towers at once on the train pairs for both stage-2 runs' steps
  minilm    the teacher is configs/teacher.py:dual_minilm's run (MiniLM-L6 text tower; its
            WordPiece is then every stage's tokenizer)
  text_layers=N  the student's text tower: the teacher's first N text layers (§4.1: 6 or 4 of
            CLIP's 12); 0 = the student's own text tower (config.model, random init: the choice
            when the teacher's text width is not wanted, e.g. a random-init teacher of another
            width). Default: half the teacher's (2 of teacher.py:dual's 4, 3 of MiniLM's 6;
            1 for tiny).

The stages (each a run in <workdir>/<name>/, chained by init_from; train/pipeline.py runs them,
skips those done and resumes the interrupted one; docs/leaner_faster.md):
  teacher_image       T -> T': teacher image tower fine-tuned with InfoNCE, text tower fixed
  teacher_text        T': teacher text tower fine-tuned, image tower fixed; T' fixed afterwards
  stage1              student distilled from T on the unpaired pool: eq. 2 (images) + eq. 3 (texts)
  mine_teacher        ScaNN banks from T' (the teacher's text index for the image queries)
  student_image       SF 1: student image tower + T's shared fixed text tower;
                      InfoNCE + KD (KL + eq. 2 vs T') + HN (mined captions)
  mine_student_image  banks from student_image's towers (the trained student image index)
  student_text        SF 2: student text tower, image tower fixed; InfoNCE + KD (eq. 3) + HN
Loss weights, temperatures and k are in the `leaner_faster` section (methods/leaner_faster.py),
shared by the stages; a stage's "settings" set what is its own.
"""

import ml_collections

from jaxdistill import config as base_config
from jaxdistill.config import teacher_section
from jaxdistill.methods.leaner_faster import section as leaner_faster_section

ABLATIONS = ("full", "wo_stage1", "stage1_mse", "stage1_infonce", "wo_sf", "wo_kd", "wo_hn",
             "wo_kd_hn", "direct")
PRESETS = ("tiny", "cpu", "short")
IMAGE = "student/image_(encoder|projection)/.*"
TEXT = "student/text_(encoder|projection)/.*"
IMAGE_MAPPING = (("student/image_encoder/", "student/image_encoder/"),
                 ("student/image_projection/", "student/image_projection/"),
                 ("student/log_temperature", "student/log_temperature"))
TEXT_MAPPING = (("student/text_encoder/", "student/text_encoder/"),
                ("student/text_projection/", "student/text_projection/"))


def _parse(arg: str) -> tuple[str, str, bool, int | None]:
  preset, ablation, minilm, text_layers = "cpu", "full", False, None
  for i, token in enumerate(t.strip() for t in arg.split(",") if t.strip()):
    if i == 0 and token in PRESETS:
      preset = token
    elif token in ABLATIONS:
      ablation = token
    elif token == "minilm":
      minilm = True
    elif token.startswith("text_layers="):
      text_layers = int(token.split("=", 1)[1])
    else:
      raise ValueError(f"configs/leaner_faster.py: {token!r} is not a preset ({', '.join(PRESETS)}), "
                       f"an ablation ({', '.join(ABLATIONS)}), 'minilm' or text_layers=N "
                       "(e.g. --config=configs/leaner_faster.py:cpu,wo_kd)")
  return preset, ablation, minilm, text_layers


def stages(ablation: str, text_layers: int, steps: dict, teacher_lr: float) -> tuple:
  """The stage list of a Table 2 row (data for train/pipeline.py)."""
  stage1 = ablation != "wo_stage1"
  sf = ablation != "wo_sf"
  hn = ablation not in ("wo_hn", "wo_kd_hn")
  kd = ablation not in ("wo_kd", "wo_kd_hn")
  stage1_loss = {"stage1_mse": "mse", "stage1_infonce": "infonce"}.get(ablation, "contrastive")
  teacher_text_init = ({"source": "teacher:teacher", "layers": f"first:{text_layers}",
                        "mapping": TEXT_MAPPING},) if text_layers > 0 else ()
  kd_off = {} if kd else {"leaner_faster.kl_weight": 0.0, "leaner_faster.contrastive_weight": 0.0}
  stage1_entry = dict(
      name="stage1", kind="train", method="leaner_faster", model="student", data="unpaired",
      steps=steps["stage1"], trainable=((".*", {}),), init_from=teacher_text_init,
      teachers={"teacher": "teacher:teacher"},
      settings={"leaner_faster.stage": "stage1", "leaner_faster.tower": "both",
                "leaner_faster.stage1_loss": stage1_loss})
  if ablation == "direct":                       # Table 1's "directly fine-tunes" baseline
    stage1_entry["settings"]["leaner_faster.stage1_loss"] = "infonce"
    return (stage1_entry, dict(
        name="student", kind="train", method="dual", model="student", data="train",
        steps=2 * steps["stage2"], trainable=((".*", {}),),
        init_from=({"source": "stage:stage1", "mapping": (("student/", "student/"),)},)))
  out = [
      dict(name="teacher_image", kind="train", method="dual", model="teacher", data="train",
           steps=steps["teacher"], trainable=((TEXT, None), (".*", {"learning_rate": teacher_lr})),
           init_from=({"source": "teacher:teacher", "mapping": (("student/", "student/"),)},)),
      dict(name="teacher_text", kind="train", method="dual", model="teacher", data="train",
           steps=steps["teacher"], trainable=((IMAGE, None), (".*", {"learning_rate": teacher_lr})),
           init_from=({"source": "stage:teacher_image", "mapping": (("student/", "student/"),)},)),
  ]
  if stage1:
    out.append(stage1_entry)
  if hn:
    out.append(dict(name="mine_teacher", kind="mine", tower="stage:teacher_text"))
  common = dict(kind="train", method="leaner_faster", data="train", steps=steps["stage2"],
                teachers={"teacher": "stage:teacher_text"},
                bank="stage:mine_teacher" if hn else "")
  if not sf:                                     # Table 2 "w/o SF": both student towers at once
    out.append(dict(
        name="student", model="student", trainable=((".*", {}),),
        init_from=({"source": "stage:stage1", "mapping": (("student/", "student/"),)},),
        settings={"leaner_faster.stage": "stage2", "leaner_faster.tower": "both", **kd_off},
        **common))
    return tuple(out)
  image_init = ({"source": "stage:stage1", "mapping": IMAGE_MAPPING},) if stage1 else ()
  out.append(dict(
      name="student_image", model="student_image+teacher_text", trainable=((TEXT, None), (".*", {})),
      init_from=image_init + ({"source": "stage:teacher_text", "mapping": TEXT_MAPPING},),
      settings={"leaner_faster.stage": "stage2", "leaner_faster.tower": "image", **kd_off},
      **common))
  if hn:
    out.append(dict(name="mine_student_image", kind="mine", tower="stage:student_image"))
  common["bank"] = "stage:mine_student_image" if hn else ""
  text_init = (({"source": "stage:stage1", "mapping": TEXT_MAPPING},) if stage1
               else teacher_text_init)
  out.append(dict(
      name="student_text", model="student", trainable=((IMAGE, None), (".*", {})),
      init_from=({"source": "stage:student_image", "mapping": IMAGE_MAPPING},) + text_init,
      settings={"leaner_faster.stage": "stage2", "leaner_faster.tower": "text", **kd_off},
      **common))
  return tuple(out)


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  preset, ablation, minilm, text_layers = _parse(arg)
  tiny = preset == "tiny"
  config = base_config.base_config("tiny" if tiny else "cpu")   # model = the student (ViT 2x128)
  config.method = "pipeline"                   # each stage names its own recipe
  config.data.num_unpaired = 256 if tiny else 4000   # stage 1's unpaired pool (data/unpaired.py)
  config.teachers.teacher = teacher_section(
      "workdir", "runs/teacher_dual_tiny" if tiny else
      ("runs/teacher_dual_minilm" if minilm else "runs/teacher_dual"))
  config.leaner_faster = leaner_faster_section()
  config.leaner_faster.hard_negatives = 2 if tiny else 4   # k (paper 000 does not give it)
  config.dual = ml_collections.ConfigDict(dict(hard_negatives=0))   # the teacher's fine-tuning
  config.mining.num_neighbors = 8 if tiny else 16
  if tiny:
    config.train.num_steps = 6
    config.train.checkpoint_every = 2
    steps = {"teacher": 4, "stage1": 6, "stage2": 0}   # 0: --config.train.num_steps
  elif preset == "short":
    config.train.checkpoint_every = 50
    config.optim.warmup_steps = 20               # cpu: 50 (stages of 100-300 steps)
    steps = {"teacher": 40, "stage1": 100, "stage2": 100}
  else:
    config.train.checkpoint_every = 100
    steps = {"teacher": 100, "stage1": 300, "stage2": 300}
  if text_layers is None:
    text_layers = 1 if tiny else (3 if minilm else 2)
  p = config.pipeline = ml_collections.ConfigDict()
  p.ablation = ablation                        # which Table 2 row the stages below are (a label)
  p.teacher = "teacher"                        # the config.teachers section of the target model T
  p.student_text_layers = text_layers
  p.reuse = ""       # another row's --workdir (same preset and seed): its common stages are copied
  p.stages = stages(ablation, text_layers, steps, teacher_lr=1e-4)
  return config
