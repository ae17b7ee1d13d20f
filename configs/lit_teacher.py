r"""LiT-style real-backbone dual teacher (Zhai et al. 2022, "LiT"; here both towers are locked):
the dual recipe with a frozen MiniLM-L6 text tower (all-MiniLM-L6-v2, mean-pooled, its own
WordPiece) and a frozen EfficientNet-Lite0 image tower (ImageNet, per-grid-cell pooling), both
started from the weights the pip packages ship; only the projections and temperature train.

  python -m jaxdistill.main --config=configs/lit_teacher.py --workdir=runs/lit_teacher
Then use it as --config.teachers.<name>.kind=workdir --config.teachers.<name>.path=runs/lit_teacher.
Presets: cpu (default), tiny (tests). All of it is data: model towers (config.model),
initialisation (config.init_from), what trains (config.trainable).
"""

import os

import ml_collections

from jaxdistill.config import load_config_file
from jaxdistill.pretrained.packaged import efficientnet_path, minilm_dir


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  tiny = preset == "tiny"
  config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         f"dual.py:{'tiny' if tiny else 'cpu'}"))
  m = config.model
  m.text_tower, m.text_pool = "bert", "mean"       # MiniLM was trained for mean pooling
  m.text_width, m.text_layers, m.text_heads, m.text_mlp = 384, 6, 12, 1536   # MiniLM-L6
  m.max_len = 40                                   # MiniLM tokens of the longest caption
  m.image_tower = "efficientnet_lite0"
  m.efficientnet_input_size = 64 if tiny else 128  # 28 px cells -> 32 / 64 px, 1 / 2x2 head cells
  m.embed_dim = 32 if tiny else 256
  config.data.tokenizer = minilm_dir()
  config.data.num_train = 64 if tiny else 3000     # frozen towers: a 3,000-image subset suffices
  config.init_from = (
      {"source": f"pretrained:{minilm_dir()}", "architecture": "bert", "layers": "",
       "mapping": (("student/text_encoder/", ""),)},
      {"source": f"pretrained:{efficientnet_path()}", "architecture": "efficientnet_lite0",
       "layers": "", "mapping": (("student/image_encoder/", ""),)},
  )
  config.trainable = (("student/(image|text)_encoder/.*", None),   # locked towers
                      (".*", {"learning_rate": 1e-3, "weight_decay": 1e-4}))
  config.batch_size = 16 if tiny else 128
  config.train.num_steps = 4 if tiny else 400
  config.optim.warmup_steps = 1 if tiny else 40
  return config
