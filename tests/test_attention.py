"""lmjax.models.attention: which implementation each platform takes, and that each one
computes causal attention with document masks and grouped-query heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.errors import UserError
from lmjax.models import attention
from lmjax.models.attention import Device, choose
from lmjax.models.transformer import Transformer, TransformerConfig

CPU = Device("cpu", "cpu")
H200 = Device("gpu", "NVIDIA H200", "9.0")
A100 = Device("gpu", "NVIDIA A100-SXM4-80GB", "8.0")
V100 = Device("gpu", "Tesla V100-SXM2-16GB", "7.0")
MI300 = Device("gpu", "AMD Instinct MI300X")  # ROCm: no CUDA compute capability
TPU = Device("tpu", "TPU v5 lite")


pytestmark = pytest.mark.usefixtures("float32_products")  # tolerances hold on every device (no TF32)


@pytest.mark.parametrize(
    "device,dtype,head,seq,docs,expected,reason",
    [
        (CPU, "float32", 32, 128, False, "cpu", "hand-written"),
        (CPU, "bfloat16", 64, 1024, True, "cpu", "hand-written"),
        (H200, "bfloat16", 64, 1024, True, "cudnn", "H200"),
        (H200, "bfloat16", 256, 1024, False, "cudnn", "H200"),  # Hopper: head sizes up to 256
        (A100, "bfloat16", 128, 1024, False, "cudnn", "A100"),
        (A100, "bfloat16", 256, 1024, False, "xla", "up to 128"),
        (H200, "float32", 64, 1024, False, "xla", "model.dtype=float32"),
        (H200, "bfloat16", 60, 1024, False, "xla", "multiple of 8"),
        (H200, "bfloat16", 64, 1023, True, "xla", "data.seq_len=1023"),
        (V100, "bfloat16", 64, 1024, False, "xla", "compute capability 8.0"),
        (MI300, "bfloat16", 64, 1024, False, "xla", "NVIDIA"),
        (TPU, "bfloat16", 64, 1024, True, "splash", "TPU v5 lite"),
        (TPU, "float32", 64, 1000, False, "xla", "multiple of 128"),
        (Device("tpu", "TPU v5 lite", count=8), "bfloat16", 64, 1024, False, "xla", "8 chips"),
        (Device("METAL", "Apple M3"), "float32", 64, 128, False, "xla", "no fused kernel"),
    ],
)
def test_auto_takes_the_fused_kernel_where_it_can_run(device, dtype, head, seq, docs, expected, reason):
    choice = choose("auto", device, dtype, head, seq, docs)
    assert choice.implementation == expected
    assert reason in choice.reason


def test_auto_on_cpu_without_the_cpu_kernels_is_plain_xla():
    choice = choose("auto", CPU, "float32", 32, 128, cpu_kernels=False)
    assert choice.implementation == "xla" and "model.cpu_kernels=False" in choice.reason


@pytest.mark.parametrize(
    "requested,device,dtype,head,seq,words",
    [
        ("cudnn", CPU, "bfloat16", 64, 128, "needs an NVIDIA GPU"),
        ("cudnn", H200, "float32", 64, 128, "bfloat16 or float16"),
        ("cudnn", A100, "bfloat16", 256, 128, "up to 128"),
        ("cudnn", V100, "bfloat16", 64, 128, "compute capability"),
        ("splash", H200, "bfloat16", 64, 128, "needs a TPU"),
        ("splash", TPU, "bfloat16", 64, 200, "multiple of 128"),
        ("cpu", TPU, "bfloat16", 64, 128, "written for the CPU"),
        ("flash", CPU, "float32", 64, 128, "choose one of auto, xla, cudnn, splash, cpu"),
    ],
)
def test_an_explicit_choice_the_device_cannot_run_is_a_config_error(requested, device, dtype, head, seq, words):
    with pytest.raises(UserError) as e:
        choose(requested, device, dtype, head, seq)
    message = str(e.value)
    assert "model.attention" in message and words in message and "\n" not in message


@pytest.mark.parametrize("device", [CPU, H200, TPU, MI300])
def test_an_explicit_choice_the_device_can_run_is_taken(device):
    assert choose("xla", device, "float32", 60, 100).implementation == "xla"
    runnable = {"cpu": "cpu", "gpu": "cudnn", "tpu": "splash"}[device.platform]
    if device is not MI300:
        assert choose(runnable, device, "bfloat16", 64, 1024).implementation == runnable


def test_hand_written_gradients_only_on_the_cpu_and_only_when_asked():
    assert attention.hand_written_gradients(True, CPU)
    assert not attention.hand_written_gradients(False, CPU)
    assert not attention.hand_written_gradients(True, H200)
    assert not attention.hand_written_gradients(True, TPU)


def plain_attention(q, k, v, segment_ids):
    """The formula: softmax(q k^T / sqrt(H) + causal and document mask) v, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    t, n, h = q.shape[1:]
    k = np.repeat(k, n // k.shape[2], axis=2)
    v = np.repeat(v, n // v.shape[2], axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    allowed = np.tril(np.ones((t, t), bool))[None, None]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])[:, None]
    logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def inputs(t, heads, kv_heads, h=32, b=2, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(k[0], (b, t, heads, h))
    kk = jax.random.normal(k[1], (b, t, kv_heads, h))
    v = jax.random.normal(k[2], (b, t, kv_heads, h))
    return q, kk, v, jax.random.normal(k[3], q.shape)


def documents(b, t):
    """Three documents per row, of unequal lengths, boundaries not on block edges; row 1 shifted."""
    rows = [
        np.searchsorted([t // 3 + 7, 2 * t // 3 + 20], np.arange(t), side="right") + 1,
        np.searchsorted([t // 5, t // 2 + 3], np.arange(t), side="right") + 1,
    ]
    return jnp.asarray(np.stack(rows[:b]), jnp.int32)


@pytest.mark.parametrize("implementation", ["xla", "cpu"])
@pytest.mark.parametrize("kv_heads,docs", [(4, False), (2, True), (1, True)])
def test_every_cpu_runnable_implementation_is_the_formula(implementation, kv_heads, docs):
    q, k, v, _ = inputs(24, 4, kv_heads)
    seg = documents(2, 24) if docs else None
    out = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, seg, implementation))(q, k, v)
    np.testing.assert_allclose(out, plain_attention(q, k, v, seg), rtol=1e-4, atol=1e-5)


def test_splash_attention_in_pallas_interpret_mode_matches_the_formula_and_xla_gradients():
    """The TPU kernel, run by Pallas' interpreter on the CPU: two query blocks of 128, grouped-query
    heads (4 query heads on 2 key/value heads) and document masks that cross block edges."""
    t = 2 * attention.SPLASH_BLOCK
    q, k, v, dout = inputs(t, 4, 2)
    seg = documents(2, t)

    def splash(q, k, v):
        return attention.causal_attention(q, k, v, seg, "splash", interpret=True)

    def xla(q, k, v):
        return attention.causal_attention(q, k, v, seg, "xla")

    out, splash_vjp = jax.vjp(jax.jit(splash), q, k, v)
    np.testing.assert_allclose(out, plain_attention(q, k, v, seg), rtol=1e-4, atol=1e-4)
    _, xla_vjp = jax.vjp(xla, q, k, v)
    for g, r in zip(splash_vjp(dout), xla_vjp(dout)):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3)


def test_splash_attention_without_documents_in_interpret_mode():
    q, k, v, _ = inputs(attention.SPLASH_BLOCK, 2, 2, h=64, b=1, seed=1)
    out = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, None, "splash", interpret=True))(q, k, v)
    np.testing.assert_allclose(out, plain_attention(q, k, v, None), rtol=1e-4, atol=1e-4)


def tiny_model(**kw) -> Transformer:
    return Transformer(
        TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=128, **kw)
    )


@pytest.mark.parametrize(
    "device,attention_setting,expected",
    [
        (CPU, "auto", "cpu"),
        (CPU, "xla", "xla"),
        (H200, "auto", "xla"),  # float32 model: no cuDNN
        (H200, "cudnn", None),
        (TPU, "auto", "splash"),
        (TPU, "splash", "splash"),
    ],
)
def test_the_model_traces_the_implementation_chosen_for_its_device(monkeypatch, device, attention_setting, expected):
    taken = []
    monkeypatch.setattr(
        attention, "causal_attention", lambda q, k, v, seg, implementation: taken.append(implementation) or q
    )
    model = tiny_model(attention=attention_setting)
    tokens = jnp.zeros((1, 128 if device.platform == "tpu" else 16), jnp.int32)
    with attention.compiling_for(device):
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
        assert taken == ["xla"] * 2  # init: parameters do not depend on the kernel
        taken.clear()
        if expected is None:  # float32 on cuDNN: refused when the model is traced, naming the key
            with pytest.raises(UserError, match="model.attention=cudnn"):
                jax.eval_shape(model.apply, params, tokens)
            return
        jax.eval_shape(model.apply, params, tokens)
    assert taken == [expected] * 2  # one per layer


def test_xla_and_cpu_attention_give_the_same_model_loss_and_gradients():
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 50)
    seg = documents(2, 24)
    positions = jnp.asarray(np.stack([np.arange(24)] * 2), jnp.int32)
    params = jax.jit(tiny_model().init)(jax.random.PRNGKey(0), tokens)

    def loss(params, model):
        logits = model.apply(params, tokens, positions, seg)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))

    loss_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    results = {a: loss_and_grad(params, tiny_model(attention=a, cpu_kernels=a == "cpu")) for a in ("cpu", "xla")}
    np.testing.assert_allclose(results["cpu"][0], results["xla"][0], rtol=1e-5)
    for g, r in zip(jax.tree.leaves(results["cpu"][1]), jax.tree.leaves(results["xla"][1])):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-5)


def _platform() -> str:
    return jax.devices()[0].platform


@pytest.mark.skipif(
    _platform() == "cpu", reason="needs the fused kernel's device: an NVIDIA GPU or a TPU (gpu_check.sh)"
)
def test_the_fused_kernel_on_this_device_matches_xla_with_documents_and_grouped_heads():
    """On the device itself: cuDNN (GPU) or splash (TPU) in bfloat16 against XLA, forward and gradients."""
    fused = choose("auto", attention.current_device(), "bfloat16", 64, 256, True).implementation
    assert fused in ("cudnn", "splash"), fused
    q, k, v, dout = (x.astype(jnp.bfloat16) for x in inputs(256, 4, 2, h=64))
    seg = documents(2, 256)
    results = {}
    for name in (fused, "xla"):
        f = jax.jit(lambda q, k, v, name=name: attention.causal_attention(q, k, v, seg, name))
        out, vjp = jax.vjp(f, q, k, v)
        results[name] = (out, *vjp(dout))
    for a, b in zip(results[fused], results["xla"]):
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=6e-2, rtol=6e-2)


def test_a_splash_run_initialises_although_init_traces_a_short_row(tmp_path, corpus_dir):
    """Init traces a dummy row of 8 tokens (1 for the shardings); splash takes multiples of 128 only.
    Parameters do not depend on the kernel, so init must not ask for one (mutation: choose at init)."""
    from conftest import tiny_config

    from lmjax.run import build_run

    cfg = tiny_config(corpus_dir, **{"model.attention": "splash", "data.seq_len": 128})
    with attention.compiling_for(Device("tpu", "TPU v5 lite", count=1)):
        run = build_run(cfg, tmp_path, 64)
        state = jax.eval_shape(run.init_state, jax.random.PRNGKey(0))
    assert state.params["wte"].shape == (64, 32)
