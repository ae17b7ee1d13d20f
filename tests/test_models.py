"""Tests for jaxdistill.models: shapes, padding invariance, a NumPy reference of one layer,
pooling / normalisation / temperature of the dual encoder, and the whole LoopITR model."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdistill.models.cross import CrossEncoder, ITMHead, MLMHead
from jaxdistill.models.dual import DualEncoder
from jaxdistill.models.layers import Encoder, TransformerLayer
from jaxdistill.models.build import build_model, init_params
from jaxdistill.models.loopitr import LoopITRModel
from jaxdistill.models.text import TextEncoder
from jaxdistill.models.vit import ViT

KEY = jax.random.PRNGKey(0)


def init(module, *args):
  """Params of `module` for these inputs, jitted (on CPU one compilation is much faster than
  op-by-op dispatch)."""
  return jax.jit(module.init)(KEY, *args)["params"]


def applier(module, method=None):
  """Jitted (params, *args) -> module.apply({"params": params}, *args, method=method)."""
  return jax.jit(lambda params, *args: module.apply({"params": params}, *args, method=method))


def tiny_model_cfg(**overrides) -> ml_collections.ConfigDict:
  """Tiny LoopITR config; the three widths differ so the cross projections exist."""
  cfg = ml_collections.ConfigDict(dict(
      image_size=56, channels=1, patch_size=28, stem="conv",
      vision_width=16, vision_layers=1, vision_heads=2, vision_mlp=32,
      text_width=24, text_layers=1, text_heads=2, text_mlp=32,
      cross_width=32, cross_layers=1, cross_heads=2, cross_mlp=32,
      vocab_size=50, max_len=8, embed_dim=12, image_pool="concat",
      temperature_init=0.07, dropout_rate=0.0, kind="loopitr"))
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------- NumPy reference of one layer

def np_layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):  # tanh approximation, as flax.linen.gelu
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_attention(xq, xkv, p, key_mask):
  q = np.einsum("bld,dhk->blhk", xq, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bmd,dhk->bmhk", xkv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bmd,dhk->bmhk", xkv, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("blhk,bmhk->bhlm", q, k) / np.sqrt(q.shape[-1])
  if key_mask is not None:
    logits = np.where(key_mask[:, None, None, :].astype(bool), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("bhlm,bmhk->blhk", w, v)
  return np.einsum("blhk,hkd->bld", out, p["out"]["kernel"]) + p["out"]["bias"]


def np_cross_layer(p, x, mask, context, context_mask):
  p = jax.tree_util.tree_map(np.asarray, p)
  y = np_layer_norm(x, p["ln_self"])
  x = x + np_attention(y, y, p["self_attention"], mask)
  y = np_layer_norm(x, p["ln_cross"])
  x = x + np_attention(y, context, p["cross_attention"], context_mask)
  y = np_layer_norm(x, p["ln_mlp"])
  h = np_gelu(y @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
  return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def test_transformer_layer_matches_numpy_reference_with_masks():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  context = rng.normal(size=(2, 3, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  context_mask = np.array([[1, 1, 0], [1, 1, 1]], np.int32)
  layer = TransformerLayer(num_heads=2, mlp_dim=16, cross_attention=True)
  params = init(layer, x, mask, context, context_mask)
  got = applier(layer)(params, x, mask, context, context_mask)
  want = np_cross_layer(params, x, mask, context, context_mask)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_cross_attention_layer_needs_context():
  layer = TransformerLayer(num_heads=2, mlp_dim=16, cross_attention=True)
  with pytest.raises(ValueError, match="context"):
    jax.eval_shape(layer.init, KEY, jnp.zeros((1, 3, 8)))


def test_encoder_padding_does_not_change_real_positions():
  """Rows 0 and 1 share their 4 real tokens and differ only at the 2 padded positions."""
  rng = np.random.default_rng(1)
  x = np.repeat(rng.normal(size=(1, 6, 8)).astype(np.float32), 2, axis=0)
  x[1, 4:] = 100.0 * rng.normal(size=(2, 8))
  mask = np.array([[1, 1, 1, 1, 0, 0]] * 2, np.int32)
  encoder = Encoder(num_layers=2, num_heads=2, mlp_dim=16)
  params = init(encoder, x, mask)
  out = np.asarray(applier(encoder)(params, x, mask))
  np.testing.assert_allclose(out[0, :4], out[1, :4], atol=1e-5)
  assert not np.allclose(out[0, 4:], out[1, 4:])


# ---------------------------------------------------------------- towers

@pytest.mark.parametrize("stem", ["linear", "conv"])
def test_vit_shapes_and_cell_order(stem):
  """With no layers each patch token sees only its own cell: perturbing cell (row 0, col 1)
  of image 1 changes its token 1 + 1 (row-major cells, [CLS] first) and nothing else."""
  vit = ViT(patch_size=4, hidden_size=8, num_layers=0, num_heads=2, mlp_dim=16, stem=stem)
  image = jax.random.uniform(KEY, (1, 8, 12, 3))
  images = jnp.concatenate([image, image.at[:, 0:4, 4:8].add(1.0)])
  params = init(vit, images)
  tokens = np.asarray(applier(vit)(params, images))
  chex.assert_shape(tokens, (2, 1 + 6, 8))
  differs = np.abs(tokens[1] - tokens[0]).max(axis=-1) > 1e-4
  np.testing.assert_array_equal(differs, [False, False, True, False, False, False, False])


def test_vit_errors():
  vit = ViT(patch_size=28, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, stem="conv")
  with pytest.raises(ValueError, match="patch_size=28"):
    jax.eval_shape(vit.init, KEY, jnp.zeros((1, 50, 56, 1)))
  with pytest.raises(ValueError, match="stem='pixel'"):
    jax.eval_shape(vit.clone(stem="pixel").init, KEY, jnp.zeros((1, 56, 56, 1)))


def test_text_encoder_padding_equals_unpadded_sequence():
  """Row 0 (4 real tokens + 2 pads) and row 1 (same tokens, other pad ids) must agree with the
  4-token sequence encoded without padding."""
  encoder = TextEncoder(vocab_size=30, max_len=8, hidden_size=16, num_layers=2, num_heads=2,
                        mlp_dim=32)
  ids = jnp.array([[1, 5, 7, 9, 0, 0], [1, 5, 7, 9, 17, 3]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 1, 0, 0]] * 2, jnp.int32)
  params = init(encoder, ids, mask)
  encode = applier(encoder)
  tokens = encode(params, ids, mask)
  chex.assert_shape(tokens, (2, 6, 16))
  unpadded = encode(params, ids[:1, :4], mask[:1, :4])
  np.testing.assert_allclose(tokens[0, :4], unpadded[0], atol=1e-5)
  np.testing.assert_allclose(tokens[1, :4], unpadded[0], atol=1e-5)
  with pytest.raises(ValueError, match="max_len=8"):
    jax.eval_shape(encoder.init, KEY, jnp.ones((1, 9), jnp.int32), jnp.ones((1, 9), jnp.int32))


def test_cross_encoder_padding_and_heads():
  """Rows 0 and 1: same text, same real length 3, different pads; row 2: same text, other image."""
  rng = np.random.default_rng(2)
  text = np.repeat(rng.normal(size=(1, 5, 16)).astype(np.float32), 3, axis=0)
  text[1, 3:] = 50.0 * rng.normal(size=(2, 16))
  image = np.repeat(rng.normal(size=(1, 3, 16)).astype(np.float32), 3, axis=0)
  image[2] = rng.normal(size=(3, 16))
  mask = np.array([[1, 1, 1, 0, 0]] * 3, np.int32)
  cross = CrossEncoder(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
  params = init(cross, text, mask, image)
  fuse = applier(cross)
  fused = np.asarray(fuse(params, text, mask, image))
  chex.assert_shape(fused, (3, 5, 16))
  np.testing.assert_allclose(fused[0, :3], fused[1, :3], atol=1e-5)
  unpadded = fuse(params, text[:1, :3], mask[:1, :3], image[:1])
  np.testing.assert_allclose(fused[0, :3], unpadded[0], atol=1e-5)
  # The image reaches the text through cross-attention.
  assert not np.allclose(fused[0, :3], fused[2, :3], atol=1e-3)
  with pytest.raises(ValueError, match="cross width"):
    jax.eval_shape(cross.init, KEY, text, mask, image[..., :8])

  itm = jax.eval_shape(ITMHead().init_with_output, KEY, fused[:, 0])[0]
  chex.assert_shape(itm, (3, 2))
  mlm, mlm_vars = jax.eval_shape(MLMHead(vocab_size=30).init_with_output, KEY, fused)
  chex.assert_shape(mlm, (3, 5, 30))
  chex.assert_shape(mlm_vars["params"]["decoder"]["kernel"], (16, 30))


# ---------------------------------------------------------------- dual encoder

def _dual(image_pool: str) -> DualEncoder:
  return DualEncoder(
      ViT(patch_size=4, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16),
      TextEncoder(vocab_size=20, max_len=6, hidden_size=8, num_layers=1, num_heads=2,
                  mlp_dim=16),
      embed_dim=6, image_pool=image_pool)


def np_l2_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_dual_encoder_cls_pooling_norm_and_temperature():
  """"concat" pooling is checked on the LoopITR model in test_jitted_methods."""
  images = jax.random.uniform(KEY, (3, 8, 8, 1))
  ids = jnp.array([[1, 2, 3, 0, 0, 0]] * 3, jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  dual = _dual("cls")
  params = init(dual, images, ids, mask)

  def encode_both(p, images, ids, mask):
    return (dual.apply({"params": p}, images, method=DualEncoder.encode_image),
            dual.apply({"params": p}, ids, mask, method=DualEncoder.encode_text),
            dual.apply({"params": p}, method=DualEncoder.temperature))

  (image_emb, image_tokens), (text_emb, text_tokens), tau = jax.jit(encode_both)(
      params, images, ids, mask)
  chex.assert_shape([image_emb, text_emb], (3, 6))
  chex.assert_shape(image_tokens, (3, 5, 8))
  chex.assert_shape(text_tokens, (3, 6, 8))
  np.testing.assert_allclose(np.linalg.norm(image_emb, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text_emb, axis=-1), 1.0, atol=1e-5)
  for emb, tokens, proj in ((image_emb, image_tokens, params["image_projection"]),
                            (text_emb, text_tokens, params["text_projection"])):
    want = np_l2_normalize(np.asarray(tokens)[:, 0] @ proj["kernel"] + proj["bias"])
    np.testing.assert_allclose(emb, want, atol=1e-5)

  np.testing.assert_allclose(params["log_temperature"], math.log(0.07), rtol=1e-6)
  np.testing.assert_allclose(tau, 0.07, rtol=1e-6)
  temperature = lambda log_t: dual.apply({"params": {**params, "log_temperature": log_t}},
                                         method=DualEncoder.temperature)
  np.testing.assert_allclose(temperature(jnp.array(3.0)), 0.5)
  np.testing.assert_allclose(temperature(jnp.array(-9.0)), 0.001)


def test_dual_encoder_rejects_unknown_pool():
  with pytest.raises(ValueError, match="image_pool='mean'"):
    jax.eval_shape(_dual("mean").init, KEY, jnp.zeros((1, 8, 8, 1)), jnp.ones((1, 6), jnp.int32),
                   jnp.ones((1, 6), jnp.int32))


# ---------------------------------------------------------------- LoopITR model

def _param_count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_init_params_creates_every_submodule():
  cfg = tiny_model_cfg()
  model = build_model(cfg)
  assert isinstance(model, LoopITRModel)
  params = jax.eval_shape(lambda k: init_params(model, cfg, k), KEY)
  assert set(params) == {"dual", "image_to_cross", "text_to_cross", "cross", "itm_head",
                         "mlm_head"}
  assert set(params["dual"]) == {"image_encoder", "text_encoder", "image_projection",
                                 "text_projection", "log_temperature"}
  # "concat" pooling: one projection slot per cell (4 cells of width 16).
  assert params["dual"]["image_projection"]["kernel"].shape == (4 * 16, 12)
  assert params["image_to_cross"]["kernel"].shape == (16, 32)
  assert params["text_to_cross"]["kernel"].shape == (24, 32)
  assert params["mlm_head"]["decoder"]["kernel"].shape == (32, 50)
  # Equal widths: no cross projections.
  same_cfg = tiny_model_cfg(vision_width=32, text_width=32)
  same = build_model(same_cfg)
  same_params = jax.eval_shape(lambda k: init_params(same, same_cfg, k), KEY)
  assert "image_to_cross" not in same_params and "text_to_cross" not in same_params


def test_cpu_preset_param_count():
  cfg = tiny_model_cfg(vision_width=128, vision_layers=2, vision_heads=4, vision_mlp=256,
                       text_width=128, text_layers=2, text_heads=4, text_mlp=256,
                       cross_width=128, cross_layers=2, cross_heads=4, cross_mlp=256,
                       vocab_size=256, max_len=32, embed_dim=128)
  model = build_model(cfg)
  params = jax.eval_shape(lambda k: init_params(model, cfg, k), KEY)
  counts = {name: _param_count(sub) for name, sub in params.items()}
  total = _param_count(params)
  print(f"CPU preset: {total:,} params; {counts}")
  # One pre-LN layer of width 128 / mlp 256: 4 attention projections + MLP + 2 LayerNorms.
  layer = 4 * (128 * 128 + 128) + (128 * 256 + 256) + (256 * 128 + 128) + 2 * 256
  cross_layer = layer + 4 * (128 * 128 + 128) + 256
  assert counts["cross"] == 2 * cross_layer + 256
  assert 1_000_000 < total < 3_000_000


def test_build_model_names_missing_field():
  cfg = tiny_model_cfg()
  del cfg["cross_width"]
  with pytest.raises(ValueError, match="config.model.cross_width"):
    build_model(cfg)
  with pytest.raises(ValueError, match="model dtype 'float16' is not valid"):
    build_model(tiny_model_cfg(dtype="float16"))
  with pytest.raises(ValueError, match="--config.model.kind='mcad' is unknown"):
    build_model(tiny_model_cfg(kind="mcad"))


@pytest.fixture(scope="module")
def tiny_model_and_params():
  cfg = tiny_model_cfg()
  model = build_model(cfg)
  params = jax.jit(lambda k: init_params(model, cfg, k))(KEY)
  return model, params


def _batch(batch_size=2):
  images = jax.random.uniform(jax.random.PRNGKey(1), (batch_size, 56, 56, 1))
  ids = jax.random.randint(jax.random.PRNGKey(2), (batch_size, 8), 1, 50)
  mask = jnp.ones((batch_size, 8), jnp.int32).at[0, 5:].set(0)
  return images, ids, mask


def test_jitted_methods(tiny_model_and_params):
  model, params = tiny_model_and_params
  images, ids, mask = _batch()
  img_emb, img_tok = applier(model, LoopITRModel.encode_image)(params, images)
  txt_emb, txt_tok = applier(model, LoopITRModel.encode_text)(params, ids, mask)
  chex.assert_shape([img_emb, txt_emb], (2, 12))
  chex.assert_shape(img_tok, (2, 5, 16))
  chex.assert_shape(txt_tok, (2, 8, 24))
  np.testing.assert_allclose(np.linalg.norm(img_emb, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt_emb, axis=-1), 1.0, atol=1e-5)
  # "concat" pooling: the 4 cell tokens (not [CLS]) side by side, projected, normalised.
  proj = params["dual"]["image_projection"]
  cells = np.asarray(img_tok)[:, 1:].reshape(2, 4 * 16)
  np.testing.assert_allclose(img_emb, np_l2_normalize(cells @ proj["kernel"] + proj["bias"]),
                             atol=1e-5)
  match = applier(model, LoopITRModel.match_logits)(params, txt_tok, mask, img_tok)
  mlm = applier(model, LoopITRModel.mlm_logits)(params, txt_tok, mask, img_tok)
  chex.assert_shape(match, (2, 2))
  chex.assert_shape(mlm, (2, 8, 50))
  chex.assert_tree_all_finite([match, mlm])
  np.testing.assert_allclose(applier(model, LoopITRModel.temperature)(params), 0.07, rtol=1e-6)
  # __call__ agrees with the separate methods.
  outputs = applier(model)(params, images, ids, mask)
  np.testing.assert_allclose(outputs["match_logits"], match, atol=1e-5)
  np.testing.assert_allclose(outputs["mlm_logits"], mlm, atol=1e-5)
  np.testing.assert_allclose(outputs["image_emb"], img_emb, atol=1e-5)
  np.testing.assert_allclose(outputs["text_emb"], txt_emb, atol=1e-5)


def test_match_logits_gradient_reaches_all_towers(tiny_model_and_params):
  model, params = tiny_model_and_params
  images, ids, mask = _batch()

  def positive_score(p):
    v = {"params": p}
    _, img_tok = model.apply(v, images, method=LoopITRModel.encode_image)
    _, txt_tok = model.apply(v, ids, mask, method=LoopITRModel.encode_text)
    return model.apply(v, txt_tok, mask, img_tok, method=LoopITRModel.match_logits)[:, 0].sum()

  grads = jax.jit(jax.grad(positive_score))(params)
  norm = lambda tree: float(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(tree)))
  for path in (("dual", "image_encoder"), ("dual", "text_encoder"), ("image_to_cross",),
               ("text_to_cross",), ("cross",), ("itm_head",)):
    sub = grads
    for name in path:
      sub = sub[name]
    assert norm(sub) > 0, f"no gradient reaches {'/'.join(path)}"
  # The ITM path does not use the ITC projections or the MLM head.
  assert norm(grads["dual"]["image_projection"]) == 0
  assert norm(grads["mlm_head"]) == 0


def test_bfloat16_computation_close_to_float32(tiny_model_and_params):
  model, params = tiny_model_and_params
  images, _, _ = _batch()
  bf16 = build_model(tiny_model_cfg(dtype="bfloat16"))
  emb32, _ = applier(model, LoopITRModel.encode_image)(params, images)
  emb16, tok16 = applier(bf16, LoopITRModel.encode_image)(params, images)
  assert emb16.dtype == jnp.float32 and tok16.dtype == jnp.bfloat16
  np.testing.assert_allclose(emb16, emb32, atol=5e-2)
