"""Stage 1 training under mixed precision and XLA (TrainConfig.mixed_precision, jit_compile).

The model is built the way ``_fit_classifier`` builds it: ``build_and_compile`` inside
``_dtype_policy(config.train.mixed_precision)``, with a tiny GCViT image branch (one block per
level, 32 px) and the paper's metadata branch.
"""

import keras
import numpy as np
import pytest

from keras_cspine.stage1.train import (
    _dtype_policy,
    build_and_compile,
    build_training_state,
    load_stage1_config,
)

SIZE = 32
TINY_GCVIT = ("model.options={backbone_kwargs: {embed_dim: 16, depths: [1, 1, 1, 1], "
              "num_heads: [1, 1, 2, 2], window_size: [4, 4, 4, 2]}}")  # fmt: skip

# One block per level has no global block, so the global query generators get no gradient, and
# the last level of a 32 px input is a single token (its bias is constant under softmax): Keras
# says so for every step. Expected of this tiny shape, not a bug.
pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")


def _config(*overrides):
    return load_stage1_config(
        "stage1_synthetic_small", [f"data.image_size={SIZE}", "model.freeze=none", TINY_GCVIT,
                                   *overrides],
    )  # fmt: skip


def _batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = {"image": rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32"),
         "metadata": rng.uniform(0, 1, (n, 2)).astype("float32")}  # fmt: skip
    y = (rng.uniform(0, 1, (n, 7)) > 0.5).astype("float32")
    return x, y


def _inner_layer(model, cls_name: str, name: str):
    """The first layer named ``name`` of class ``cls_name``, searched through nested layers."""
    stack = list(model.layers)
    while stack:
        layer = stack.pop(0)
        if type(layer).__name__ == cls_name and layer.name == name:
            return layer
        stack.extend(getattr(layer, "_layers", []))
    raise AssertionError(f"no {cls_name} layer named {name!r} in {model.name}")


def _train_step(config, weights=None):
    """Build as ``_fit_classifier`` does, optionally load ``weights``, train one batch."""
    x, y = _batch()
    with _dtype_policy(config.train.mixed_precision):
        keras.utils.set_random_seed(0)
        model = build_and_compile(config, SIZE)
        if weights is not None:
            model.set_weights(weights)
        initial = [np.array(w) for w in model.get_weights()]
        build_training_state(model, (x, y))
        logs = model.train_on_batch(x, y, return_dict=True)
    return model, initial, logs


def _check_mixed_float16(model):
    """float16 compute inside, float32 variables and output, the optimizer wrapped."""
    # Keras 3 wraps the optimizer itself when the model's policy is mixed_float16
    assert model.dtype_policy.name == "mixed_float16"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, keras.optimizers.AdamW)
    for cls_name, name in (
        ("WindowAttention", "attn"),
        ("Dense", "qkv"),
        ("Dense", "head_dense_0"),
    ):
        layer = _inner_layer(model, cls_name, name)
        assert layer.compute_dtype == "float16", (cls_name, name)
        assert layer.variable_dtype == "float32", (cls_name, name)
    assert _inner_layer(model, "Dense", "qkv").kernel.dtype == "float32"
    vertebrae = model.get_layer("vertebrae")
    assert vertebrae.compute_dtype == "float32" and vertebrae.dtype_policy.name == "float32"
    assert model.outputs[0].dtype == "float32"


def test_mixed_float16_model_is_built_mixed_and_the_policy_restored():
    before = keras.config.dtype_policy().name
    config = _config("train.mixed_precision=mixed_float16", "train.jit_compile=false")
    with _dtype_policy(config.train.mixed_precision):
        assert keras.config.dtype_policy().name == "mixed_float16"
        model = build_and_compile(config, SIZE)
    assert keras.config.dtype_policy().name == before
    _check_mixed_float16(model)
    plain = build_and_compile(_config(), SIZE)  # no policy given: float32 throughout
    assert not isinstance(plain.optimizer, keras.optimizers.LossScaleOptimizer)
    assert _inner_layer(plain, "Dense", "qkv").compute_dtype == "float32"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer:UserWarning")
def test_one_mixed_float16_step(tmp_path):
    before = keras.config.dtype_policy().name
    config = _config("train.mixed_precision=mixed_float16", "train.jit_compile=false")
    model, initial, logs = _train_step(config)
    assert keras.config.dtype_policy().name == before  # the global policy is restored
    _check_mixed_float16(model)

    assert np.isfinite(logs["loss"])
    assert int(model.optimizer.iterations.numpy()) == 1
    assert np.isfinite(float(model.optimizer.dynamic_scale.numpy()))
    # the loss-scaled step did update the weights (no inf/nan gradients skipped it)
    changed = [not np.array_equal(a, b) for a, b in zip(initial, model.get_weights())]
    assert sum(changed) > len(changed) // 2
    x, _ = _batch(n=2, seed=1)
    out = model.predict_on_batch(x)
    assert out.dtype == np.float32 and np.isfinite(out).all()

    # The saved model keeps its policy (as Keras' functional models do), whatever the global
    # policy is when it is loaded, and leaves the global policy alone.
    path = tmp_path / "mixed.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert keras.config.dtype_policy().name == before
    _check_mixed_float16(loaded)
    np.testing.assert_allclose(loaded.predict_on_batch(x), out, atol=1e-3)


def test_dtype_policy_context_restores_on_error():
    before = keras.config.dtype_policy().name
    with pytest.raises(RuntimeError, match="boom"), _dtype_policy("mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        raise RuntimeError("boom")
    assert keras.config.dtype_policy().name == before
    with _dtype_policy(None):
        assert keras.config.dtype_policy().name == before


@pytest.mark.slow
def test_jit_compile_gives_the_same_first_step_loss():
    eager_model, weights, eager = _train_step(_config("train.jit_compile=false"))
    xla_model, _, xla = _train_step(_config("train.jit_compile=true"), weights=weights)
    assert xla_model.jit_compile is True and eager_model.jit_compile is False
    assert np.isfinite(eager["loss"])
    assert abs(eager["loss"] - xla["loss"]) < 1e-4, (eager["loss"], xla["loss"])
