"""The fused kernels (dialogue/model/kernels.cpp) compute what the plain PyTorch path computes, refuse bad operands with
a clear error, and their absence costs speed only."""

from __future__ import annotations

import shutil

import pytest
import torch

from dialogue.model import kernels
from dialogue.settings import Settings
from dialogue.model.fastllama import Batch, FastLlama
from dialogue.model.worker import load_model

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def ops():
    assert kernels.load(), "the kernels must build wherever a compiler exists"
    return torch.ops.rapport


def rms_reference(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_reference(x, cos, sin, positions):
    cos, sin = cos[positions][:, None], sin[positions][:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_rope_match_the_plain_path(ops, dtype):
    torch.manual_seed(0)
    wide = torch.randn(5, 100, dtype=dtype)
    x = wide[:, :96]  # a strided view, as a slice of a fused projection is
    weight = torch.randn(96, dtype=dtype)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), rms_reference(x, weight, 1e-5),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    cos, sin = torch.randn(50, 16, dtype=dtype), torch.randn(50, 16, dtype=dtype)
    positions = torch.tensor([0, 7, 49, 3, 3])
    qkv = torch.randn(5, 7 * 16 + 16, dtype=dtype)
    heads = qkv[:, : 7 * 16].view(5, 7, 16)
    expected = rope_reference(heads, cos, sin, positions)
    ops.rope_(heads, cos, sin, positions)
    torch.testing.assert_close(heads, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_the_plain_path_far_into_both_tails(ops, dtype):
    torch.manual_seed(2)
    gate_up = torch.randn(7, 2 * 40, dtype=dtype) * 4
    gate_up[0, :6] = torch.tensor([-200.0, -88.0, -20.0, 0.0, 20.0, 200.0])  # exp under- and overflow on either side
    inter = 40
    expected = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    torch.testing.assert_close(ops.silu_mul(gate_up), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    with pytest.raises(RuntimeError, match="silu_mul"):
        ops.silu_mul(gate_up[:, :79])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_attention_writes_the_arena_and_attends_each_slot_over_its_own_positions(ops, dtype, batch):
    torch.manual_seed(1)
    slots, kv_heads, groups, dim, length = 4, 2, 3, 16, 40
    keys = torch.randn(slots, kv_heads, dim, length, dtype=dtype)
    values = torch.randn(slots, kv_heads, length, dim, dtype=dtype)
    positions = torch.tensor([5, 31, 0][:batch])
    q = torch.randn(batch, kv_heads * groups, dim, dtype=dtype)
    k, v = torch.randn(batch, kv_heads, dim, dtype=dtype), torch.randn(batch, kv_heads, dim, dtype=dtype)
    want_keys, want_values = keys.clone(), values.clone()
    out = ops.decode_attention(q, k, v, keys, values, positions, dim ** -0.5)
    for b in range(batch):
        pos = int(positions[b])
        want_keys[b, :, :, pos], want_values[b, :, pos] = k[b], v[b]
        scores = torch.einsum("hgd,hdl->hgl", q[b].view(kv_heads, groups, dim).float(),
                              want_keys[b, :, :, : pos + 1].float()) * dim ** -0.5
        expected = torch.einsum("hgl,hld->hgd", scores.softmax(-1), want_values[b, :, : pos + 1].float())
        torch.testing.assert_close(out[b].float(), expected.reshape(-1), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)  # only the new positions changed


def test_bad_operands_get_a_clear_error(ops):
    keys, values = torch.zeros(2, 1, 8, 10), torch.zeros(2, 1, 10, 8)
    q, kv = torch.zeros(1, 2, 8), torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="position outside the arena"):
        ops.decode_attention(q, kv, kv, keys, values, torch.tensor([10]), 1.0)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.decode_attention(q.bfloat16(), kv, kv, keys, values, torch.tensor([0]), 1.0)
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        ops.decode_attention(torch.zeros(1, 2, 4), kv, kv, keys, values, torch.tensor([0]), 1.0)
    with pytest.raises(RuntimeError, match="position out of range"):
        ops.rope_(torch.zeros(1, 1, 8), torch.zeros(4, 8), torch.zeros(4, 8), torch.tensor([4]))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.rms_norm(torch.zeros(1, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64), 1e-5)


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                            (torch.bfloat16, torch.bfloat16)])
def test_the_fused_forward_equals_the_plain_forward(tiny_model_dir, dtype, kv_dtype):
    """Decode rows of several slots beside prompt chunks (a first and a later one), through both paths, the arena
    in the model's dtype or in bfloat16 beside float32 (the fused default there)."""
    model, _ = load_model(tiny_model_dir, dtype)
    torch.manual_seed(2)
    p0, p1, p2 = (torch.randint(3, 300, (n,)) for n in (9, 23, 6))
    n0, n1 = len(p0), len(p1)

    def step(decode_tokens, decode_positions, chunk, slot, start):
        tokens = torch.cat([torch.tensor(decode_tokens, dtype=torch.long), chunk])
        positions = torch.cat([torch.tensor(decode_positions, dtype=torch.long), torch.arange(start, start + len(chunk))])
        return Batch(tokens, positions, len(decode_tokens), slot, start, torch.arange(len(tokens)), [])

    steps = [step([], [], p0, 0, 0),  # a prompt alone
             step([11], [n0], p1, 1, 0),  # one stream decodes while a prompt is read
             step([12, 13], [n0 + 1, n1], p2[:2], 2, 0),  # two streams, a first chunk
             step([14, 15], [n0 + 2, n1 + 1], p2[2:], 2, 2),  # two streams, a later chunk
             step([16, 17, 18], [n0 + 3, n1 + 2, len(p2)], torch.tensor([], dtype=torch.long), None, 0)]
    results = {}
    for engine in (FastLlama(model, fused=True, kv_dtype=kv_dtype), FastLlama(model, fused=False, kv_dtype=kv_dtype)):
        assert engine.arena.k.dtype == kv_dtype
        engine.arena.reserve(3, 64)
        results[engine.fused] = [engine.forward(batch) for batch in steps]
    assert set(results) == {True, False}
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_without_the_kernels_the_model_runs_the_plain_path(tiny_model_dir, monkeypatch, tmp_path, caplog):
    saved = dict(kernels._state)
    try:
        kernels._state.clear()
        assert kernels.load(Settings(home=tmp_path, kernels="off")) is False
        kernels._state.clear()
        monkeypatch.setenv("RAPPORT_KERNELS", "off")  # the same setting, read from the environment by Settings
        assert kernels.load() is False
        kernels._state.clear()
        monkeypatch.setenv("RAPPORT_KERNELS", "sometimes")
        with pytest.raises(ValueError, match="kernels"):
            kernels.load()
        kernels._state.clear()
        monkeypatch.delenv("RAPPORT_KERNELS")
        monkeypatch.setenv("RAPPORT_KERNEL_DIR", str(tmp_path / "kernels"))
        assert kernels.cache_dir() == tmp_path / "kernels"
        monkeypatch.setenv("CXX", "false")  # a compiler that always fails
        assert kernels.load() is False
        assert "could not build the fused kernels" in caplog.text
        model, _ = load_model(tiny_model_dir, torch.float32)
        engine = FastLlama(model)
        assert not engine.fused
        engine.arena.reserve(1, 16)
        assert engine.forward(Batch(torch.tensor([5, 6, 7]), torch.arange(3), 0, 0, 0, torch.tensor([2]), [])).shape[0] == 1
    finally:
        kernels._state.clear()
        kernels._state.update(saved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_linear_in_onednn_blocked_layout_equals_the_plain_matmul(dtype):
    from dialogue.model.fastllama import Linear

    torch.manual_seed(3)
    weight = torch.randn(96, 64, dtype=dtype)
    linear = Linear(weight)
    if linear.blocked is None:
        pytest.skip("oneDNN is not available in this torch build")
    assert linear.weight is None  # the blocked copy replaces the plain one: no second copy in memory
    tolerance = dict(atol=0.05, rtol=0.02) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for rows in (1, 7, 16, 300):
        x = torch.randn(rows, 64, dtype=dtype)
        torch.testing.assert_close(linear(x).float(), torch.nn.functional.linear(x, weight).float(), **tolerance)
