"""LoopITR built as paper 003 §4 builds it (configs/loopitr.py cpu preset, config.init_from):
text tower = the first half of the packaged MiniLM-L6, cross encoder = its second half with new
cross-attention, checked against `transformers` on the same weights."""

import jax
import numpy as np
import pytest

from conftest import recipe_config
from jaxdistill.data.tokenizer import encode, load_pretrained_tokenizer
from jaxdistill.models.build import build_model, init_params, towers
from jaxdistill.pretrained.packaged import minilm_dir
from jaxdistill.train.init import apply_init_from, flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CAPTIONS = ["a sneaker with a sandal below it in the right column",
            "four items: a pair of trousers bottom left, a sneaker top right",
            "a bag"]


@pytest.fixture(scope="module")
def built():
  config = recipe_config("loopitr", "cpu")
  config.model.vocab_size = 30522          # the trainer fills it from the tokenizer
  model = build_model(config.model)
  random = {"student": jax.jit(lambda k: init_params(model, config.model, k))(
      jax.random.PRNGKey(0))}
  params, log = apply_init_from(random, config.init_from)
  hf = transformers.BertModel.from_pretrained(minilm_dir()).eval()
  return config, model, flatten(random), params, hf, log


def test_text_tower_is_the_first_half_of_minilm(built):
  config, model, _, params, hf, log = built
  assert config.model.text_layers == config.model.cross_layers == hf.config.num_hidden_layers // 2
  assert "layers [0, 1, 2]" in log[0] and "layers [3, 4, 5]" in log[1]
  ids, mask = encode(load_pretrained_tokenizer(minilm_dir()), CAPTIONS, config.model.max_len)
  _, tokens = towers(model).embed_text(params["student"], ids, mask)
  with torch.no_grad():
    hidden = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                output_hidden_states=True).hidden_states[config.model.text_layers].numpy()
  real = mask > 0
  np.testing.assert_allclose(np.asarray(tokens)[real], hidden[real], atol=2e-4)


def test_cross_encoder_is_the_second_half_with_new_cross_attention(built):
  config, _, random, params, hf, _ = built
  flat = flatten(params)
  half = config.model.text_layers
  t = lambda w: w.detach().numpy()
  for i in range(config.model.cross_layers):
    layer = hf.encoder.layer[half + i]
    want = {
        "attention/query": layer.attention.self.query, "attention/key": layer.attention.self.key,
        "attention/value": layer.attention.self.value, "attention/out": layer.attention.output.dense,
        "intermediate": layer.intermediate.dense, "output": layer.output.dense}
    for name, linear in want.items():
      np.testing.assert_array_equal(flat[f"student/cross/layer_{i}/{name}/kernel"], t(linear.weight).T)
      np.testing.assert_array_equal(flat[f"student/cross/layer_{i}/{name}/bias"], t(linear.bias))
    for name, norm in {"attention_ln": layer.attention.output.LayerNorm,
                       "output_ln": layer.output.LayerNorm}.items():
      np.testing.assert_array_equal(flat[f"student/cross/layer_{i}/{name}/scale"], t(norm.weight))
      np.testing.assert_array_equal(flat[f"student/cross/layer_{i}/{name}/bias"], t(norm.bias))
  # New: cross-attention, heads and the (random-init) image tower keep their random values.
  new = [k for k in flat if "crossattention" in k or k.startswith(("student/itm_head",
                                                                   "student/mlm_head",
                                                                   "student/dual/image_encoder"))]
  assert any("crossattention/key" in k for k in new) and any("image_encoder" in k for k in new)
  for k in new:
    np.testing.assert_array_equal(flat[k], random[k])
  # Everything else came from the checkpoint.
  changed = [k for k in flat if not np.array_equal(flat[k], random[k])]
  assert all(k.startswith(("student/dual/text_encoder/", "student/cross/layer_")) for k in changed)
  assert len(changed) == 53 + 48
