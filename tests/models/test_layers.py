"""The attention's hand-written backward gives PyTorch autograd's query, key and value gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mstar_jax.models.layers import attention_mask, dot_product_attention


def torch_attention(q, k, v, mask, scale):
    """HF's eager attention: repeat the kv heads for GQA, additive finfo.min mask, fp32 softmax."""
    import torch

    groups = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, T, D]
    kt, vt = kt.repeat_interleave(groups, dim=1), vt.repeat_interleave(groups, dim=1)
    bias = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    p = torch.softmax(qt @ kt.transpose(-1, -2) * scale + bias, dim=-1)
    return (p @ vt).transpose(1, 2)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_gradients_match_torch(window):
    import torch

    rng = np.random.default_rng(0)
    b, t, heads, kv_heads, d = 2, 7, 4, 2, 8
    q, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for h in (heads, kv_heads, kv_heads))
    cot = rng.normal(size=(b, t, heads, d)).astype(np.float32)  # the upstream gradient
    valid = np.ones((b, t), bool)
    valid[1, :2] = False  # left padding in the second row
    mask = attention_mask(jnp.asarray(valid), t, 0, window)
    scale = d ** -0.5

    out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, mask, scale), q, k, v)
    dq, dk, dv = vjp(jnp.asarray(cot))

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    ref = torch_attention(tq, tk, tv, torch.tensor(np.asarray(mask)), scale)
    ref.backward(torch.tensor(cot))
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    for name, ours, theirs in (("dq", dq, tq.grad), ("dk", dk, tk.grad), ("dv", dv, tv.grad)):
        theirs = theirs.numpy()
        assert np.abs(theirs).max() > 1e-2, name  # a real gradient
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-5, err_msg=name)
