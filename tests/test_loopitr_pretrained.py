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


def _built_variant(**model_fields):
  """The cpu preset with model fields overridden, init_from applied -> (config, model, params)."""
  config = recipe_config("loopitr", "cpu")
  config.model.vocab_size = 30522
  config.model.update(model_fields)
  model = build_model(config.model)
  random = {"student": jax.jit(lambda k: init_params(model, config.model, k))(
      jax.random.PRNGKey(0))}
  params, _ = apply_init_from(random, config.init_from)
  return config, model, params


def _fuse(model, params, tokens, mask, image_tokens):
  from jaxdistill.models.loopitr import LoopITRModel
  return np.asarray(model.apply({"params": params["student"]}, tokens, mask, image_tokens,
                                method=LoopITRModel.fuse))


def test_gated_cross_encoder_starts_as_minilms_second_half(built):
  """model.cross_gate: tanh(0) = 0 and no extra LayerNorm, so at init the cross encoder is
  exactly MiniLM's layers 3-5 on the text tower's output (hidden state 6 of transformers), for
  any image; the gate itself gets a gradient."""
  hf = built[4]
  config, model, params = _built_variant(cross_gate=True)
  ids, mask = encode(load_pretrained_tokenizer(minilm_dir()), CAPTIONS, config.model.max_len)
  _, tokens = towers(model).embed_text(params["student"], ids, mask)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids, dtype=torch.long),
              attention_mask=torch.tensor(mask, dtype=torch.long),
              output_hidden_states=True).hidden_states[-1].numpy()
  real = mask > 0
  images = jax.random.normal(jax.random.PRNGKey(1), (2, len(CAPTIONS), 5, config.model.vision_width))
  for image_tokens in images:
    np.testing.assert_allclose(_fuse(model, params, tokens, mask, image_tokens)[real], want[real],
                               atol=3e-4)
  from jaxdistill.models.loopitr import LoopITRModel

  def score(p):
    return model.apply({"params": p}, tokens, mask, images[0],
                       method=LoopITRModel.match_logits)[:, 0].sum()
  grads = flatten(jax.grad(score)(params["student"]))
  gates = [k for k in grads if k.endswith("crossattention_gate")]
  assert len(gates) == config.model.cross_layers
  assert all(abs(float(grads[k])) > 0 for k in gates)
  assert not any(k.endswith("crossattention_ln/scale") for k in grads)


def test_single_stream_cross_encoder_from_minilms_second_half(built):
  """model.cross_encoder=single_stream: the same MiniLM layers (self-attention only) load into
  it; caption outputs depend on the image but not on the order of its tokens (self-attention is
  permutation-equivariant; the tokens carry their positions from the image tower)."""
  hf = built[4]
  config, model, params = _built_variant(cross_encoder="single_stream")
  flat = flatten(params)
  layer = hf.encoder.layer[config.model.text_layers]
  np.testing.assert_array_equal(flat["student/cross/layer_0/attention/query/kernel"],
                                layer.attention.self.query.weight.detach().numpy().T)
  assert not any("crossattention" in k for k in flat)
  ids, mask = encode(load_pretrained_tokenizer(minilm_dir()), CAPTIONS, config.model.max_len)
  _, tokens = towers(model).embed_text(params["student"], ids, mask)
  image = jax.random.normal(jax.random.PRNGKey(1), (len(CAPTIONS), 5, config.model.vision_width))
  fused = _fuse(model, params, tokens, mask, image)
  assert fused.shape == tokens.shape
  real = mask > 0
  np.testing.assert_allclose(_fuse(model, params, tokens, mask, image[:, ::-1])[real], fused[real],
                             atol=1e-4)
  assert np.abs(_fuse(model, params, tokens, mask, 2 * image + 1)[real] - fused[real]).max() > 1e-2


def test_image_positions_make_the_cross_encoder_see_token_order(built):
  """Cross-attention is blind to the order of the image tokens (the default cross encoder: the
  same cells in another order give the same fused output); model.cross_image_positions adds a
  learnt embedding per image-token position, so the order then matters, and the embedding gets a
  gradient."""
  from jaxdistill.models.loopitr import LoopITRModel
  config, model, _, params, _, _ = built
  ids, mask = encode(load_pretrained_tokenizer(minilm_dir()), CAPTIONS, config.model.max_len)
  image = jax.random.normal(jax.random.PRNGKey(1), (len(CAPTIONS), 5, config.model.vision_width))
  real = mask > 0

  def order_effect(model, params):
    _, tokens = towers(model).embed_text(params["student"], ids, mask)
    return tokens, np.abs(_fuse(model, params, tokens, mask, image[:, ::-1])[real]
                          - _fuse(model, params, tokens, mask, image)[real]).max()

  assert not any("image_positions" in k for k in flatten(params))
  assert order_effect(model, params)[1] < 1e-4
  config, model, params = _built_variant(cross_image_positions=1.0)
  assert [k for k in flatten(params) if "image_positions" in k] == [
      "student/image_positions/embedding"]
  tokens, effect = order_effect(model, params)
  assert effect > 1e-2
  grads = jax.grad(lambda p: model.apply({"params": p}, tokens, mask, image,
                                         method=LoopITRModel.match_logits)[:, 0].sum())(
                                             params["student"])
  assert np.abs(np.asarray(grads["image_positions"]["embedding"])).max() > 0
