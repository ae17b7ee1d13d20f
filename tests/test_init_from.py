"""Initialisation as data (train/init.py): resume > config.init_from > random.

- A MiniLM-L6 tower started from the packaged real weights with layers "first:3" through the
  trainer equals transformers' BertModel built with num_hidden_layers=3 from the same weights.
- Two stages on the command line: stage 2 starts exactly from stage 1's final params, and a
  stage 2 killed by SIGKILL resumes its own checkpoints, not stage 1's.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import REPO, logged_losses, recipe_config, user_env
from jaxdistill import methods
from jaxdistill.data.benchmark import prepare_benchmark
from jaxdistill.data.tokenizer import encode, load_pretrained_tokenizer
from jaxdistill.models.build import towers
from jaxdistill.parallel.mesh import make_mesh
from jaxdistill.pretrained.packaged import minilm_dir
from jaxdistill.store.checkpoint import Checkpointer
from jaxdistill.train.init import InitFromError, apply_init_from
from jaxdistill.train.loop import build_state

SENTENCES = ["a sandal top left, a bag below it and two shirts on the right",
             "A man is riding a horse on the beach.", "two t-shirts on top", "a coat",
             "The quick brown fox jumps over the lazy dog while the farmer watches."]


def _minilm_config():
  c = recipe_config("dual", "tiny")
  m = c.model
  m.text_tower, m.text_pool = "bert", "mean"
  m.text_width, m.text_layers, m.text_heads, m.text_mlp = 384, 3, 12, 1536
  c.data.tokenizer = minilm_dir()
  c.init_from = ({"source": f"pretrained:{minilm_dir()}", "architecture": "bert",
                  "layers": "first:3", "mapping": (("student/text_encoder/", ""),)},)
  return c


def _initial_state(config, workdir):
  bench = prepare_benchmark(config, workdir)
  config.model.vocab_size = bench.vocab_size
  mesh = make_mesh()
  recipe = methods.build(config, mesh, bench, 1)
  spec = {"image": jax.ShapeDtypeStruct((8, 56, 56, 1), np.float32)}
  built = build_state(recipe, config, mesh, spec)
  return recipe, jax.device_get(built["init"]())


def test_minilm_first_three_layers_equal_transformers(tmp_path):
  config = _minilm_config()
  recipe, state = _initial_state(config, str(tmp_path))
  assert config.model.vocab_size == 30522          # MiniLM's WordPiece, not a built vocabulary
  ids, mask = encode(load_pretrained_tokenizer(minilm_dir()), SENTENCES, config.model.max_len)
  tower = towers(recipe.modules["student"].model)
  got = np.asarray(tower.embed_text(state.params["student"], ids, mask)[1])
  reference = transformers.BertModel.from_pretrained(minilm_dir(), num_hidden_layers=3).eval()
  with torch.no_grad():
    want = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  real = mask.astype(bool)
  cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
  assert cosine[real].min() >= 0.99999, cosine[real].min()

  # Only the mapped subtree changed: the image tower is the random init of the same seed.
  config.init_from = ()
  _, random_state = _initial_state(config, str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, state.params["student"]["image_encoder"],
               random_state.params["student"]["image_encoder"])


def test_init_from_errors_name_the_path_and_fix(tmp_path):
  params = {"student": {"w": np.zeros((2, 3), np.float32)}}
  with pytest.raises(InitFromError, match="must read workdir:PATH or pretrained:PATH"):
    apply_init_from(params, ({"source": "runs/x", "mapping": (("student/", ""),)},))
  with pytest.raises(InitFromError, match="does not exist"):
    apply_init_from(params, ({"source": f"workdir:{tmp_path}/none", "mapping": ()},))
  with pytest.raises(InitFromError, match="holds no checkpoint"):
    apply_init_from(params, ({"source": f"workdir:{tmp_path}", "mapping": (("s", "s"),)},))
  Checkpointer(str(tmp_path)).save(1, {"params": {"student": {"w": np.ones((3, 3), np.float32)}}},
                                   {}, wait=True)
  with pytest.raises(InitFromError, match=r"shape \(3, 3\) but student/w needs \(2, 3\)"):
    apply_init_from(params, ({"source": f"workdir:{tmp_path}", "mapping": (("student/", "student/"),)},))
  with pytest.raises(InitFromError, match="matches no param"):
    apply_init_from(params, ({"source": f"workdir:{tmp_path}", "mapping": (("teacher/", "student/"),)},))
  with pytest.raises(InitFromError, match="layers=|layer selection"):
    apply_init_from(params, ({"source": f"workdir:{tmp_path}", "layers": "first:2",
                              "mapping": (("student/", "student/"),)},))


# --- two stages, as a user runs them ---------------------------------------------------------

def _command(workdir, *extra):
  return [sys.executable, "-m", "jaxdistill.main", "--config=configs/dual.py:tiny",
          f"--workdir={workdir}", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
          *extra]


def _stage2(stage1, workdir):
  return _command(workdir, "--config.train.num_steps=8",
                  f'--config.init_from=({{"source": "workdir:{stage1}", '
                  '"mapping": (("student/", "student/"),)},)')


@pytest.mark.slow
def test_two_stages_chain_and_stage_two_resumes_itself(tmp_path):
  s1, s2, s2_uninterrupted = (str(tmp_path / n) for n in ("s1", "s2", "s2_ref"))
  subprocess.run(_command(s1, "--config.train.num_steps=4"), cwd=REPO, env=user_env(), check=True,
                 capture_output=True)

  # Stage 2 starts exactly from stage 1's final params.
  config = recipe_config("dual", "tiny")
  config.init_from = ({"source": f"workdir:{s1}", "mapping": (("student/", "student/"),)},)
  _, state = _initial_state(config, str(tmp_path / "probe"))
  checkpointer = Checkpointer(s1)
  final = checkpointer.restore_raw(checkpointer.latest_step())["params"]
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, state.params, final)

  # SIGKILL stage 2 once its checkpoint 2 is finalized, then rerun the same command.
  process = subprocess.Popen(_stage2(s1, s2), cwd=REPO, env=user_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.isdir(os.path.join(s2, "checkpoints", "2")):
    time.sleep(0.1)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = subprocess.run(_stage2(s1, s2), cwd=REPO, env=user_env(), capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from {os.path.join(s2, 'checkpoints')}" in resumed.stdout
  assert "init_from" not in resumed.stdout                 # resume wins over init_from
  subprocess.run(_stage2(s1, s2_uninterrupted), cwd=REPO, env=user_env(), check=True,
                 capture_output=True)
  want, got = logged_losses(s2_uninterrupted), logged_losses(s2)
  assert sorted(got) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                             rtol=1e-6)
