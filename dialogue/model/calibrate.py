"""Choose the model's compute dtype and decode weights for this CPU by measuring them, once, at first start.

Which matmul is fastest depends on the CPU far more than on the model: ATen's int4 matmul is quick where the CPU
has AVX512-BF16 and ten times slower than fp32 elsewhere; bf16 is quick with AVX512-BF16 and emulated (slow)
without it. So each candidate is timed on this machine, on the model's own weights (all layers, so they are
read from memory as in a decode step), and the fastest wins. The result is cached in `$RAPPORT_HOME/calibration/`
under a key of the CPU class and flags, torch's version, the kernels' build, the threads and the model's shapes:
a new CPU, torch or kernel build measures again; the same one reads the file (milliseconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from dialogue.model import kernels
from dialogue.model.fastllama import DecodePlan, FastLlama, _onednn_pack

logger = logging.getLogger(__name__)

ROWS = (1, 2, 4, 8, 16)  # decode-step row counts measured; a plan serves up to the largest one that won
PASSES = 3  # timed passes a measurement (the fastest counts: the machine is shared)
DTYPE_PASSES = 7  # the dtype matmuls take milliseconds: more passes cost little and steady the choice
WIN = 0.95  # a candidate must be at least 5% faster to replace the full weights or fp32


def cache_key(*parts: object) -> str:
    flags = " ".join(sorted(kernels.cpu_flags()))
    text = json.dumps([kernels.cpu_class(), flags, torch.__version__, kernels.library_name(),
                       torch.get_num_threads(), *parts], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CalibrationCache:
    """JSON files under a directory, one a key; an unreadable file counts as missing."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def get(self, key: str) -> dict | None:
        if self.directory is None:
            return None
        try:
            return json.loads((self.directory / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict) -> None:
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            partial = self.directory / f".{key}.{os.getpid()}.tmp"
            partial.write_text(json.dumps(value, indent=1))
            os.replace(partial, self.directory / f"{key}.json")
        except OSError as exc:
            logger.warning("could not cache the calibration in %s: %s", self.directory, exc)


def measure_dtype(hidden: int, intermediate: int, rows: int = 256) -> dict[str, float]:
    """µs of one prompt-chunk matmul (rows x hidden -> 2 x intermediate) in float32 and in bfloat16 as the engine
    would run it (blocked for oneDNN where it can be), on random weights: compute decides this, not memory. The two
    take turns within each pass, so a burst of load on a shared machine falls on both alike (timed one after the
    other, a burst once made bf16 look four times slower than it is, and float32 was cached for good)."""
    torch.manual_seed(0)
    weight = torch.randn(2 * intermediate, hidden)
    x = torch.randn(rows, hidden)
    steps = {}
    for dtype in (torch.float32, torch.bfloat16):
        w, xd = weight.to(dtype), x.to(dtype)
        blocked = _onednn_pack(w)
        steps[str(dtype).removeprefix("torch.")] = (
            (lambda xd=xd, blocked=blocked: torch.ops.mkldnn._linear_pointwise(xd, blocked, None, "none", [None], ""))
            if blocked is not None else (lambda xd=xd, w=w: F.linear(xd, w)))
    timed = _race(lambda name, _rows: steps[name or "float32"], ["bfloat16"], row_counts=(rows,), passes=DTYPE_PASSES)
    return {"float32": timed["full"][rows], "bfloat16": timed["bfloat16"][rows]}


def pick_dtype(setting: str, hidden: int, intermediate: int, cache: CalibrationCache) -> tuple[torch.dtype, dict]:
    """The compute dtype: the setting when it names one, else the faster of fp32 and bf16 here (bf16 only when
    clearly faster: it also rounds more)."""
    if setting != "auto":
        return getattr(torch, setting), {}
    key = cache_key("dtype", "interleaved", hidden, intermediate)  # not an older, one-after-the-other measurement
    timings = cache.get(key)
    if timings is None:
        timings = measure_dtype(hidden, intermediate)
        cache.put(key, timings)
    chosen = "bfloat16" if timings["bfloat16"] < WIN * timings["float32"] else "float32"
    return getattr(torch, chosen), timings


INT8_ROWS = "+int8-rows"  # a format name with this suffix: the same weights, with int8 activations


def _matmul(linear, fmt: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if fmt is None or not linear.can_quantize():
        return linear.full
    copy = linear.copy_in(fmt.removesuffix(INT8_ROWS))
    return (lambda x: copy(x, True)) if fmt.endswith(INT8_ROWS) else copy


def _layer_step(engine: FastLlama, fmt: str | None, rows: int) -> Callable[[], None]:
    """Every layer matmul of one decode step of `rows` rows: the full weights, or the copies in `fmt`."""
    x = {k: torch.randn(rows, k, dtype=engine.dtype) for k in {linear.source.shape[1] for linear in engine.linears()}}
    matmuls = [(_matmul(linear, fmt), x[linear.source.shape[1]])
               for layer in engine.layers for linear in (layer[name] for name in engine.LAYER_MATRICES)]

    def step():
        for matmul, rows_in in matmuls:
            matmul(rows_in)

    return step


def _head_step(engine: FastLlama, fmt: str | None, rows: int) -> Callable[[], None]:
    x = torch.randn(rows, engine.lm_head.source.shape[1], dtype=engine.dtype)
    matmul = _matmul(engine.lm_head, fmt)
    return lambda: matmul(x)


def _int8_rows(step_of: Callable[[str | None, int], Callable[[], None]], fmt: str | None, up_to: int) -> tuple[int, dict]:
    """Up to how many rows `fmt` with int8 activations beats `fmt` alone (timed against it as the race's "full"),
    and the timings: it saves instructions where a step is compute-bound, which is a one-row step on some CPUs
    (AVX2: 1.4x a layer matmul) and not on others, and never many rows (the float path shares its dequantised
    weights between them)."""
    if fmt not in ("int4", "int8") or up_to <= 0 or not kernels.has_int8_rows():
        return 0, {}
    timings = _race(lambda name, rows: step_of(fmt if name is None else name, rows), [fmt + INT8_ROWS],
                    row_counts=tuple(r for r in ROWS if r <= up_to))
    return _serves_up_to(timings["full"], timings[fmt + INT8_ROWS]), timings[fmt + INT8_ROWS]


def _race(step_of: Callable[[str | None, int], Callable[[], None]], formats: list[str],
          row_counts: tuple[int, ...] = ROWS, passes: int = PASSES) -> dict[str, dict[int, float]]:
    """µs of the full weights and of each format at each row count, fastest of PASSES. The candidates take
    turns within each pass, so a burst of load on a shared machine falls on all of them alike; a format that loses
    is timed for PASSES more before it counts as lost; it stops being timed at the first row count where it loses
    (it cannot serve more rows than that), and the race ends when none is left."""
    timings: dict[str, dict[int, float]] = {"full": {}, **{fmt: {} for fmt in formats}}
    alive = list(formats)
    for rows in row_counts:
        if not alive:
            break
        steps = {name: step_of(None if name == "full" else name, rows) for name in ["full", *alive]}
        best = dict.fromkeys(steps, float("inf"))
        for step in steps.values():
            step()  # warm-up

        def time_passes(names):
            for _ in range(passes):
                for name in names:
                    start = time.perf_counter()
                    steps[name]()
                    best[name] = min(best[name], time.perf_counter() - start)

        time_passes(list(steps))
        # A format that lost races once more before it counts: a burst of load can outlast a whole round (once the
        # output matrix's int8 timed 16.8 ms a row and full 15.4, where the quiet machine gives 4.7 and 7.6).
        losers = [fmt for fmt in alive if best[fmt] >= WIN * best["full"]]
        if losers:
            time_passes(["full", *losers])
        for name, seconds in best.items():
            timings[name][rows] = seconds * 1e6
        alive = [fmt for fmt in alive if timings[fmt][rows] < WIN * timings["full"][rows]]
    return timings


def _serves_up_to(full: dict, candidate: dict) -> int:
    """The largest measured row count up to which the candidate beat the full weights at every measured count."""
    best = 0
    for rows in ROWS:
        if rows not in candidate or candidate[rows] >= WIN * full[rows]:
            break
        best = rows
    return best


def measure_decode(engine: FastLlama, formats: list[str]) -> tuple[DecodePlan, dict, dict, str]:
    """Time the full weights and each format on the engine's own layers at each row count; the plan uses the
    format fastest for one row, for as many rows as it keeps winning. The copies made here are the ones served."""
    torch.manual_seed(0)
    layers_us = _race(lambda fmt, rows: _layer_step(engine, fmt, rows), formats)
    head_formats = ["int8"] if "int8" in formats or "int4" in formats else []  # GGUF keeps the output matrix at 8 bits
    head_us = _race(lambda fmt, rows: _head_step(engine, fmt, rows), head_formats)
    winners = [fmt for fmt in formats if _serves_up_to(layers_us["full"], layers_us[fmt])]
    fmt = min(winners, key=lambda f: layers_us[f][1], default=None)
    max_rows = _serves_up_to(layers_us["full"], layers_us[fmt]) if fmt else 0
    head_rows = _serves_up_to(head_us["full"], head_us["int8"]) if head_formats else 0
    int8_rows, timings = _int8_rows(lambda f, rows: _layer_step(engine, f, rows), fmt, max_rows)
    layers_us.update({f"{fmt}{INT8_ROWS}": timings} if timings else {})
    head_int8_rows, timings = _int8_rows(lambda f, rows: _head_step(engine, f, rows), "int8" if head_rows else None,
                                         head_rows)
    head_us.update({f"int8{INT8_ROWS}": timings} if timings else {})
    plan = DecodePlan(fmt, max_rows, "int8" if head_rows else None, head_rows, int8_rows, head_int8_rows)
    one = {name: round(t[1]) for name, t in layers_us.items() if 1 in t}
    reason = (f"one-row step, all layers (µs): {one}; {fmt or 'full weights'} wins"
              + (f" up to {max_rows} rows" if fmt else "")
              + (f", with int8 activations up to {int8_rows}" if int8_rows else ""))
    return plan, layers_us, head_us, reason


def still_holds(engine: FastLlama, formats: list[str], plan: DecodePlan) -> tuple[bool, str]:
    """A one-row race of the layers (a fraction of a second) against a cached plan: a calibration made while the
    machine was busy can have timed every candidate slow but one, and would otherwise pick a slow path for good.
    False when another choice is now clearly faster for one row (by the WIN margin) than the cached one."""
    timings = _race(lambda fmt, rows: _layer_step(engine, fmt, rows), formats, row_counts=(1,))
    one = {name: t[1] for name, t in timings.items() if 1 in t}
    best = min(one, key=one.get)
    cached = one.get(plan.fmt or "full", float("inf"))
    holds = best == (plan.fmt or "full") or one[best] >= WIN * cached
    return holds, f"one-row recheck (µs): { {name: round(t) for name, t in one.items()} }"


def candidate_formats(quantize: str, embedded: bool, dtype: torch.dtype) -> list[str]:
    """The weight formats worth measuring for a setting: `auto` tries int4 only on the embedded model (its weights
    are Q4_1 already, so int4 loses nothing there), int8 on any; ATen's int4 kernel takes bf16 activations."""
    if quantize == "none":
        return []
    fused = kernels.load()
    ours = {"auto": ["int4", "int8"] if embedded else ["int8"], "int4": ["int4"], "int8": ["int8"]}.get(quantize, [])
    formats = [f for f in ours if fused]
    if dtype == torch.bfloat16 and (quantize == "int4" or (quantize == "auto" and embedded)):
        formats.append("torch-int4")
    return formats


def calibrator(quantize: str, embedded: bool, cache: CalibrationCache, record: list):
    """The `decode` function for FastLlama: reads the cached plan for this CPU and model, or measures one.
    Appends what was measured and chosen to `record` so the caller can report it."""

    def decide(engine: FastLlama) -> DecodePlan:
        formats = candidate_formats(quantize, embedded, engine.dtype)
        shapes = [tuple(linear.source.shape) for linear in engine.linears()[:5]] + [len(engine.layers)]
        key = cache_key("decode", str(engine.dtype), formats, shapes, engine.fused, kernels.has_int8_rows() and "int8-rows")
        found = cache.get(key)
        if found is not None and formats:
            holds, recheck = still_holds(engine, formats, DecodePlan(**found["plan"]))
            if not holds:
                logger.warning("the cached decode path no longer wins (%s; cached: %s): measuring again", recheck,
                               found["reason"])
                found = None
        if found is None:
            start = time.perf_counter()
            plan, layers_us, head_us, reason = measure_decode(engine, formats) if formats else (DecodePlan(), {}, {}, "no quantised format")
            found = {"plan": asdict(plan), "layers_us": layers_us, "head_us": head_us, "reason": reason}
            cache.put(key, found)
            logger.info("calibrated decode weights in %.1f s: %s", time.perf_counter() - start, reason)
        record.append(found)
        return DecodePlan(**found["plan"])

    return decide
