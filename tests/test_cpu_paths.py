"""Decode on every CPU class: our quantised matmul equals its dequantised weights, a row's result does not depend on
its batch, the engine's choice is measured (and cached), and each lesser class, emulated with the variables torch
reads, builds its own kernels and decodes the same greedy tokens as the full-weight reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dialogue.model import calibrate, kernels
from dialogue.model.fastllama import DecodePlan, FastLlama, Linear, quantize_weight
from dialogue.model.worker import load_model
from tests.conftest import REPO

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")


def dequantize(q: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    n = q.shape[0]
    if fmt == "int8":
        return (q.float().reshape(n, -1, 32) * scales[..., None]).reshape(n, -1)
    nibbles = torch.cat([(q & 15).reshape(n, -1, 16), (q >> 4).reshape(n, -1, 16)], -1).float()
    return (nibbles * scales[..., :1] + scales[..., 1:]).reshape(n, -1)


@needs_compiler
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlinear_computes_with_the_dequantised_weights_whatever_the_batch(fmt, dtype):
    assert kernels.load()
    torch.manual_seed(0)
    weight = torch.randn(100, 96)  # N not a multiple of the output tile
    q, scales = quantize_weight(weight, fmt)
    reference = dequantize(q, scales, fmt)
    assert (reference - weight).abs().max() < (0.02 if fmt == "int8" else 0.5)
    x = torch.randn(11, 96).to(dtype)
    out = torch.ops.rapport.qlinear(x, q, scales, 8 if fmt == "int8" else 4)
    assert out.dtype == dtype and out.shape == (11, 100)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), x.float() @ reference.T, atol=tolerance * 10, rtol=tolerance)
    for rows in (1, 2, 3, 4, 5, 8, 9):  # each row alone or in any batch: the same bits
        part = torch.ops.rapport.qlinear(x[:rows], q, scales, 8 if fmt == "int8" else 4)
        assert torch.equal(part, out[:rows])


@needs_compiler
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_qlinear_with_int8_rows_is_within_their_rounding_whatever_the_batch(fmt):
    assert kernels.load()
    if not kernels.has_int8_rows():
        with pytest.raises(RuntimeError, match="need AVX2"):
            torch.ops.rapport.qlinear(torch.zeros(1, 64), *quantize_weight(torch.randn(8, 64), fmt), 4, True)
        return
    torch.manual_seed(0)
    q, scales = quantize_weight(torch.randn(100, 96), fmt)
    reference = dequantize(q, scales, fmt)
    x = torch.randn(11, 96)
    x[3] = 0.0  # a row of zeros: step 0, no division by it
    x[4, :32] = 1e-30  # a group far below the others' scale
    bits = 8 if fmt == "int8" else 4
    out = torch.ops.rapport.qlinear(x, q, scales, bits, True)
    exact = x @ reference.T
    # each activation is off by at most half its group's step (max |x| / 254): about 0.5% of a dot product
    assert ((out - exact).norm() / exact.norm()).item() < 0.01
    assert torch.equal(out[3], torch.zeros(100))
    for rows in (1, 2, 3, 4, 5, 8, 9):  # each row alone or in any batch: the same bits
        assert torch.equal(torch.ops.rapport.qlinear(x[:rows], q, scales, bits, True), out[:rows])


@needs_compiler
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_fused_quantiser_gives_the_bytes_of_the_tensor_op_one(fmt, monkeypatch):
    assert kernels.load()
    torch.manual_seed(1)
    weight = torch.randn(64, 128) * torch.logspace(-3, 1, 64)[:, None]  # groups of very different ranges
    weight[3, :32] = 0.0  # a constant group: d falls to its floor, as in the tensor-op version
    weight[5, 40] = 0.5 * (weight[5, 32:64].max() + weight[5, 32:64].min())  # values near a rounding tie
    fused = quantize_weight(weight, fmt)
    monkeypatch.setattr(kernels, "load", lambda: False)
    plain = quantize_weight(weight, fmt)
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.rapport.quantize(torch.zeros(4, 48), 4)


@needs_compiler
def test_qlinear_refuses_bad_operands_plainly():
    assert kernels.load()
    q, scales = quantize_weight(torch.randn(8, 64), "int4")
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.rapport.qlinear(torch.zeros(1, 48), torch.zeros(8, 24, dtype=torch.uint8), scales, 4)
    with pytest.raises(RuntimeError, match="int4 weights must be"):
        torch.ops.rapport.qlinear(torch.zeros(1, 64), q[:, :16].contiguous(), scales, 4)
    with pytest.raises(RuntimeError, match="bits must be 8 or 4"):
        torch.ops.rapport.qlinear(torch.zeros(1, 64), q, scales, 3)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.rapport.qlinear(torch.zeros(1, 64, dtype=torch.float64), q, scales, 4)


def test_a_capped_cpu_class_drops_the_flags_above_it(monkeypatch):
    native = kernels.class_of(kernels.native_flags())
    if native not in ("avx512_bf16", "avx512"):
        pytest.skip("needs an AVX-512 CPU to cap")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert kernels.cpu_class() == "avx2" and kernels.march() == "x86-64-v3"
    assert not any(f.startswith("avx512") for f in kernels.cpu_flags() if f in kernels.ABOVE["avx2"])
    assert not kernels.cpu_flags() & {"avx512_bf16", "amx_bf16"}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert kernels.cpu_class() == "avx512" and not kernels.cpu_flags() & {"avx512_bf16", "avx512_vnni"}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert kernels.cpu_class() == "default"


def test_the_plan_never_keeps_a_format_where_it_loses():
    full = {1: 100.0, 2: 100.0, 4: 110.0, 8: 120.0, 16: 150.0}
    assert calibrate._serves_up_to(full, {1: 30.0, 2: 40.0, 4: 60.0, 8: 130.0, 16: 100.0}) == 4  # stops at the first loss
    assert calibrate._serves_up_to(full, {1: 200.0, 2: 40.0, 4: 60.0, 8: 90.0, 16: 100.0}) == 0
    assert calibrate.candidate_formats("none", True, torch.float32) == []
    assert "int4" not in calibrate.candidate_formats("auto", False, torch.float32)  # only the embedded model is 4-bit
    assert "torch-int4" not in calibrate.candidate_formats("auto", True, torch.float32)  # ATen's takes bf16 only


def test_a_format_that_loses_a_round_to_a_burst_of_load_races_again():
    """The race's first round can fall in a burst that slows one candidate only; it must lose twice to count."""
    calls = {"full": 0, "int8": 0}

    def step_of(fmt, rows, burst):
        name = fmt or "full"

        def step():
            calls[name] += 1
            slow = name == "int8" and calls[name] <= burst  # the warm-up and the first round, or always
            time.sleep(0.02 if slow else 0.006 if name == "full" else 0.002)

        return step

    timings = calibrate._race(lambda fmt, rows: step_of(fmt, rows, 1 + calibrate.PASSES), ["int8"], row_counts=(1, 2))
    assert timings["int8"][1] < calibrate.WIN * timings["full"][1] and 2 in timings["int8"]
    calls.update(full=0, int8=0)
    timings = calibrate._race(lambda fmt, rows: step_of(fmt, rows, 10 ** 6), ["int8"], row_counts=(1, 2))
    assert timings["int8"][1] > timings["full"][1] and 2 not in timings["int8"]  # lost twice: not timed further


@needs_compiler
def test_calibration_measures_once_and_then_reads_its_cache(tiny_model_dir, tmp_path, monkeypatch):
    model, _ = load_model(tiny_model_dir, torch.float32)
    cache = calibrate.CalibrationCache(tmp_path / "calibration")
    record: list = []
    engine = FastLlama(model, decode=calibrate.calibrator("auto", True, cache, record))
    assert record and set(record[0]["layers_us"]) - {"full", "int4", "int8"} == (
        {record[0]["plan"]["fmt"] + calibrate.INT8_ROWS} if kernels.has_int8_rows() else set())
    assert engine.plan == DecodePlan(**record[0]["plan"]) and len(list((tmp_path / "calibration").glob("*.json"))) == 1
    monkeypatch.setattr(calibrate, "measure_decode", lambda *a: pytest.fail("measured again"))
    monkeypatch.setattr(calibrate, "still_holds", lambda *a: (True, ""))  # the tiny model's timings are noise
    again = FastLlama(model, decode=calibrate.calibrator("auto", True, cache, record))
    assert again.plan == engine.plan
    dtype, timings = calibrate.pick_dtype("auto", 64, 128, cache)
    assert dtype in (torch.float32, torch.bfloat16) and set(timings) == {"float32", "bfloat16"}
    assert calibrate.pick_dtype("float32", 64, 128, cache)[0] == torch.float32


@needs_compiler
def test_a_cached_plan_that_a_one_row_recheck_contradicts_is_measured_again(tiny_model_dir, tmp_path, monkeypatch):
    """A first start on a busy machine once timed int4 at 480 ms a step (full weights: 27 ms) and cached 'full
    weights' for good: 25 tok/s where int4 gives 133. A cheap recheck at each start catches such a plan."""
    model, _ = load_model(tiny_model_dir, torch.float32)
    cache = calibrate.CalibrationCache(tmp_path / "calibration")
    one_row = {"full": {1: 27000.0}, "int4": {1: 4000.0}, "int8": {1: 4150.0}}
    monkeypatch.setattr(calibrate, "_race", lambda step_of, formats, row_counts=calibrate.ROWS: one_row)
    stale = DecodePlan()
    assert calibrate.still_holds(None, ["int4", "int8"], stale)[0] is False
    assert calibrate.still_holds(None, ["int4", "int8"], DecodePlan("int4", 16))[0] is True
    assert calibrate.still_holds(None, ["int4", "int8"], DecodePlan("int8", 16))[0] is True  # within the margin
    one_row["int8"][1] = 3000.0
    assert calibrate.still_holds(None, ["int4", "int8"], DecodePlan("int4", 16))[0] is False
    measured = []

    def measure(engine, formats):
        measured.append(formats)
        return DecodePlan("int8", 8), {}, {}, "measured again"

    monkeypatch.setattr(calibrate, "measure_decode", measure)
    record: list = []
    first = FastLlama(model, decode=calibrate.calibrator("auto", True, cache, record))
    assert first.plan.fmt == "int8" and len(measured) == 1
    for path in (tmp_path / "calibration").glob("*.json"):  # as if a busy first start had cached the full weights
        found = json.loads(path.read_text())
        path.write_text(json.dumps({**found, "plan": {"fmt": None, "max_rows": 0, "head_fmt": None, "head_max_rows": 0}}))
    again = FastLlama(model, decode=calibrate.calibrator("auto", True, cache, record))
    assert again.plan.fmt == "int8" and len(measured) == 2


def test_quantised_layers_fall_back_to_full_weights_without_the_kernels(tiny_model_dir, monkeypatch):
    model, _ = load_model(tiny_model_dir, torch.float32)
    monkeypatch.setattr(kernels, "load", lambda **_: False)
    engine = FastLlama(model, decode=DecodePlan.fixed("int4"))
    assert engine.plan == DecodePlan() and all(linear.quant is None for linear in engine.linears())
    linear = Linear(torch.randn(8, 40))  # K not in groups of 32: never quantised
    linear.quantize("int8", 4)
    assert linear.quant is None


CLASS_CHECK = textwrap.dedent("""
    import json, sys, torch
    from dialogue.model import kernels
    from dialogue.model.fastllama import Batch, DecodePlan, FastLlama
    from dialogue.model.worker import load_model
    assert kernels.load(), "kernels did not build for this class"
    model, _ = load_model(sys.argv[1], torch.float32)

    def greedy(plan, fused):
        engine = FastLlama(model, decode=plan, fused=fused)
        engine.arena.reserve(2, 64)
        tokens = [[5, 9, 30, 41, 7], [12, 60, 3]]
        for slot, prompt in enumerate(tokens):
            n = len(prompt)
            logits = engine.forward(Batch(torch.tensor(prompt), torch.arange(n), 0, slot, 0, torch.tensor([n - 1]), []))
            prompt.append(int(logits.argmax()))
        for _ in range(12):  # both slots decode together
            rows = torch.tensor([t[-1] for t in tokens]); positions = torch.tensor([len(t) - 1 for t in tokens])
            logits = engine.forward(Batch(rows, positions, 2, None, 0, torch.arange(2), []))
            for t, token in zip(tokens, logits.argmax(-1).tolist()):
                t.append(token)
        return tokens

    reference = greedy(DecodePlan(), False)
    print(json.dumps({"class": kernels.cpu_class(), "march": kernels.march(), "reference": reference,
                      "full": greedy(DecodePlan(), True), "int8": greedy(DecodePlan.fixed("int8"), True),
                      "int4, int8 rows": greedy(DecodePlan("int4", 2, "int8", 2, 2, 2), True)}))
""")


@needs_compiler
@pytest.mark.parametrize("cpu_class,env", [("avx2", {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}),
                                           ("avx512", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"})])
def test_each_lesser_cpu_class_builds_its_kernels_and_decodes_the_reference_tokens(tiny_model_dir, cpu_class, env):
    native = kernels.class_of(kernels.native_flags())
    if kernels.CLASSES.index(native) < kernels.CLASSES.index(cpu_class):
        pytest.skip(f"this CPU is below {cpu_class}")
    done = subprocess.run([sys.executable, "-c", CLASS_CHECK, str(tiny_model_dir)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **env}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["class"] == cpu_class  # on a CPU of this very class the cap changes nothing: built for it natively
    assert (result["march"] == "native") == (native == cpu_class)
    assert result["full"] == result["reference"]  # fused fp32 kernels = plain path, token for token
    # int8 weights of a random model move logits slightly: the greedy tokens agree almost everywhere
    for path in ("int8", "int4, int8 rows"):
        same = sum(a == b for x, y in zip(result[path], result["reference"]) for a, b in zip(x, y))
        assert same >= 0.9 * sum(len(t) for t in result["reference"]), path
