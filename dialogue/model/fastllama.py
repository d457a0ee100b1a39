"""A batched inference forward for Llama-family models: many sequences, one pass, each its own adapter.

transformers' forward serves one batch with one cache. Serving wants every active conversation in the same
pass whatever its length, a prompt chunk beside them, and each row on its own LoRA version. This module
runs the same maths on the same weights, laid out for that:
- q/k/v and gate/up fused into one matmul each (4 weight reads a layer instead of 7);
- a preallocated KV arena, one slot per sequence, written in place (no per-step concatenation);
- decode attention for all decoding slots as one batched matmul with a length mask;
- weight-only quantised matmuls (int8 or int4 in GGUF's groups of 32) for decode steps of a few rows, where
  reading the weights is the cost, in the format and up to the row count measured fastest on this CPU
  (`DecodePlan`, chosen by dialogue.model.calibrate); prompt chunks, where compute is, keep the full weights;
- LoRA deltas added per row group, from each adapter's own matrices: a row can only meet its own adapter.
"""

from __future__ import annotations

import json
import re
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dialogue.model import kernels
from dialogue.errors import GenerationError

logger = logging.getLogger(__name__)

INT4_GROUP = 32  # GGUF's Q4 block size: the embedded model's layer weights are Q4_1, so int4 in these groups fits them
# Weight formats for decode steps: our kernels (kernels.cpp qlinear, fast on any x86 with AVX2 or better) and ATen's
# int4 matmul (fast where the CPU has AVX512-BF16, slower than fp32 elsewhere). `dialogue.model.calibrate` picks one.
FORMATS = ("int4", "int8", "torch-int4")
LORA_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                      r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def supports(config) -> bool:
    """True for the architectures this forward reproduces exactly (Llama, SmolLM, TinyLlama, ...)."""
    return (getattr(config, "model_type", None) == "llama" and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False) and getattr(config, "hidden_act", "silu") == "silu"
            and getattr(config, "pretraining_tp", 1) == 1)


def quantize_weight(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of an (N, K) weight in groups of 32 along K, as `torch.ops.rapport.qlinear` reads them, the scales
    in float16 as GGUF's blocks keep them (and the codes fitted to those rounded scales):
    int8 (GGUF Q8_0): w = q·d; int4 (GGUF Q4_1): w = q·d + m, q in [0, 15], group byte i = element i | element i+16 << 4;
    torch-int4: ATen's packed layout, w = (q - 8)·d + z. The fused kernels' `quantize` computes the int8/int4 bytes
    (a fraction of a second for the embedded model, against seconds for the tensor ops below, which give the same
    bytes and serve where the kernels are not built)."""
    if fmt in ("int8", "int4") and kernels.load():
        return torch.ops.rapport.quantize(weight, 8 if fmt == "int8" else 4)
    w = weight.float()
    n, k = w.shape
    groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
    if fmt == "int8":
        d = _as_half(groups.abs().amax(-1).clamp(min=1e-12) / 127, step=True)
        return torch.round(groups / d[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k), d.half().contiguous()
    low, high = groups.amin(-1), groups.amax(-1)
    if fmt == "int4":
        d, m = _as_half((high - low).clamp(min=1e-12) / 15, step=True), _as_half(low)
        q = torch.round((groups - m[..., None]) / d[..., None]).clamp(0, 15).to(torch.uint8)
        return (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2).contiguous(), torch.stack([d, m], -1).half().contiguous()
    d = (high - low).clamp(min=1e-12) / 15
    q = torch.round((groups - low[..., None]) / d[..., None]).clamp(0, 15)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(n, k), 1)
    return packed, torch.stack([d, low + 8 * d], -1).transpose(0, 1).contiguous().to(weight.dtype)


def _as_half(x: torch.Tensor, step: bool = False) -> torch.Tensor:
    """x rounded to the float16 it is stored as, in float32; a step (d) is never 0: at least float16's smallest
    subnormal. As kernels.cpp's as_half / step_as_half."""
    rounded = x.clamp(-65504, 65504).half().float()
    return rounded.clamp(min=2.0 ** -24) if step else rounded


class QuantWeight:
    """A weight-only quantised copy of an (N, K) weight, for matmuls of a few rows, where reading it is the cost."""

    def __init__(self, weight: torch.Tensor, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}")
        self.fmt = fmt
        self.q, self.scales = quantize_weight(weight, fmt)

    def __call__(self, x: torch.Tensor, int8_rows: bool = False) -> torch.Tensor:
        """x Wᵀ; with `int8_rows` (our formats, kernels built for AVX2 or better) x is quantised to int8 in groups of
        32 as well and each group's dot product summed in integers, as llama.cpp does: fewer instructions a weight,
        a relative error of about 0.5%."""
        if self.fmt == "torch-int4":
            return torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.q, INT4_GROUP, self.scales)
        return torch.ops.rapport.qlinear(x, self.q, self.scales, 4 if self.fmt == "int4" else 8, int8_rows)


@dataclass(frozen=True)
class DecodePlan:
    """Which weights serve decode steps: the layers' matmuls of up to `max_rows` rows in `fmt`, the output matrix's
    of up to `head_max_rows` in `head_fmt`; None or 0 rows means the full weights always. Steps of up to `int8_rows`
    (`head_int8_rows`) rows also quantise their activations to int8 (`QuantWeight`'s `int8_rows`)."""

    fmt: str | None = None
    max_rows: int = 0
    head_fmt: str | None = None
    head_max_rows: int = 0
    int8_rows: int = 0
    head_int8_rows: int = 0

    @classmethod
    def fixed(cls, quantize: str, max_rows: int = 6) -> DecodePlan:
        """A plan by name, without measuring: "none", "int8", "int4" or "torch-int4" for the layers; the output
        matrix is the (tied) embedding, which GGUF keeps at 8 bits, so int4 would lose there: int8."""
        if quantize in (None, "none"):
            return cls()
        return cls(quantize, max_rows, "int8", max_rows)


class Linear:
    """y = x W^T with 16- or 32-bit weights, and optionally a quantised copy used for up to `max_rows` rows."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.source = weight  # kept until the decode plan is applied (`release`)
        self.weight = weight.contiguous()  # (N, K)
        self.blocked = _onednn_pack(self.weight)
        if self.blocked is not None:
            self.weight = None  # the blocked copy replaces it
        self.quant: QuantWeight | None = None
        self.max_rows = 0
        self.int8_rows = 0
        self._copies: dict[str, QuantWeight] = {}

    def can_quantize(self) -> bool:
        return self.source.shape[1] % INT4_GROUP == 0

    def copy_in(self, fmt: str) -> QuantWeight:
        """The weight in `fmt`, made once: the copies calibration times are the ones the plan then serves."""
        if fmt not in self._copies:
            self._copies[fmt] = QuantWeight(self.source, fmt)
        return self._copies[fmt]

    def quantize(self, fmt: str | None, max_rows: int, int8_rows: int = 0) -> None:
        """Serve matmuls of up to `max_rows` rows from a copy in `fmt` (None: always the full weights), those of up
        to `int8_rows` rows with int8 activations."""
        if fmt is None or max_rows <= 0 or not self.can_quantize():
            self.quant, self.max_rows, self.int8_rows = None, 0, 0
        else:
            self.quant, self.max_rows, self.int8_rows = self.copy_in(fmt), max_rows, min(int8_rows, max_rows)

    def release(self) -> None:
        """Drop the source weight and the copies the plan does not use."""
        self.source = None
        self._copies.clear()

    def full(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocked is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.blocked, None, "none", [None], "")
        return F.linear(x, self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None and x.shape[0] <= self.max_rows:
            return self.quant(x, x.shape[0] <= self.int8_rows)
        return self.full(x)


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """A float32 or bfloat16 weight in oneDNN's blocked layout, or None where oneDNN cannot take it. Given a plain
    (N, K) weight, oneDNN reorders it on every call; blocked once, the matmul of a bf16 decode batch takes 0.6x the
    time (16 rows x 576 x 3072: 349 -> 211 us). In float32 the blocked matmul also beats ATen's MKL one at every row
    count measured (1-256 rows, 576x3072, 1536x576 and the 49152x576 output matrix): 1.1-6.5x as AVX-512, 1.1-3.5x as
    AVX2 (MKL keeps to AVX2 on AMD CPUs; the 800-token prompt chunk and the output matrix gain the most)."""
    if weight.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 16)
    except (RuntimeError, AttributeError):
        return None


@dataclass
class LoraAdapter:
    """One adapter version's low-rank matrices, laid out for the fused projections: for each
    (layer, fused matrix), the A matrices of its LoRA-wrapped parts stacked (R, in) and, per part,
    (output offset, output size, its rows of the stacked A, B·scale (size, r))."""

    name: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, list[tuple[int, int, int, int, torch.Tensor]]]] = field(
        default_factory=dict)

    @classmethod
    def load(cls, name: str, path: Path, dtype: torch.dtype, slices: dict[str, tuple[str, int, int]]) -> LoraAdapter:
        """Read a peft LoRA directory; `slices` maps a projection (q, k, ...) to (fused matrix, offset, size)."""
        from safetensors.torch import load_file

        config = json.loads((path / "adapter_config.json").read_text())
        unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if config.get(k)]
        if config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
            unsupported.append("bias/fan_in_fan_out")
        if unsupported:
            raise GenerationError(f"adapter {name}: {', '.join(unsupported)} is not supported by the runtime")
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(path / "adapter_model.safetensors").items():
            match = LORA_KEY.search(key)
            if match is None:
                raise GenerationError(f"adapter {name}: unexpected tensor {key}")
            pairs.setdefault((int(match[1]), match[2].removesuffix("_proj")), {})[match[3]] = tensor
        grouped: dict[tuple[int, str], list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
        for (layer, proj), pair in sorted(pairs.items()):
            fused, offset, size = slices[proj]
            grouped.setdefault((layer, fused), []).append((offset, size, pair["A"], pair["B"]))
        adapter = cls(name)
        for key, parts in grouped.items():
            stacked, laid_out, row = [], [], 0
            for offset, size, a, b in parts:
                stacked.append(a)
                laid_out.append((offset, size, row, row + a.shape[0], (b.float() * scale).to(dtype).contiguous()))
                row += a.shape[0]
            adapter.weights[key] = (torch.cat(stacked).to(dtype).contiguous(), laid_out)
        return adapter


@dataclass
class Batch:
    """One forward: rows [0, n_decode) are one token for each of slots [0, n_decode); the rest, if any,
    are a prompt chunk for `chunk_slot` starting at position `chunk_start`."""

    tokens: torch.Tensor  # (N,) long
    positions: torch.Tensor  # (N,) long
    n_decode: int
    chunk_slot: int | None
    chunk_start: int
    logit_rows: torch.Tensor  # (n,) long: rows whose next-token logits are wanted
    lora: list[tuple[LoraAdapter, torch.Tensor | slice]]  # (adapter, its rows); rows of no group use the base model


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as a contiguous tensor of `dtype`, in one copy at most."""
    return t.contiguous() if t.dtype == dtype else torch.empty(t.shape, dtype=dtype).copy_(t)


class KVArena:
    """Keys and values of every slot, grown on demand. Keys are stored transposed, (layers, slots, kv_heads,
    head_dim, length), so that q·Kᵀ reads one contiguous row of positions per dimension (the fused kernel's
    vectors; in the plain path 3x faster than a transposed view); values as (layers, slots, kv_heads, length,
    head_dim)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.dims = (layers, kv_heads, head_dim)
        self.dtype = dtype
        self.k = torch.zeros(layers, 0, kv_heads, head_dim, 0, dtype=dtype)
        self.v = torch.zeros(layers, 0, kv_heads, 0, head_dim, dtype=dtype)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[4]

    def reserve(self, slots: int, length: int) -> None:
        if slots <= self.slots and length <= self.length:
            return
        layers, heads, dim = self.dims
        new_slots = self.slots if slots <= self.slots else max(slots, 2 * self.slots)
        new_length = max(self.length, 256)
        while new_length < length:
            new_length *= 2
        new_length += 32 if new_length & (new_length - 1) == 0 else 0  # a power-of-two row stride thrashes the cache
        k = torch.zeros(layers, new_slots, heads, dim, new_length, dtype=self.dtype)
        v = torch.zeros(layers, new_slots, heads, new_length, dim, dtype=self.dtype)
        k[:, : self.slots, :, :, : self.length] = self.k
        v[:, : self.slots, :, : self.length] = self.v
        self.k, self.v = k, v

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of one slot's first `length` positions."""
        return self.k[:, slot, :, :, :length].clone(), self.v[:, slot, :, :length].clone()

    def write(self, slot: int, state: tuple[torch.Tensor, torch.Tensor], length: int | None = None) -> None:
        k, v = state
        length = k.shape[-1] if length is None else length
        self.k[:, slot, :, :, :length] = k[..., :length]
        self.v[:, slot, :, :length] = v[:, :, :length]

    def move(self, source: int, target: int, length: int) -> None:
        self.k[:, target, :, :, :length] = self.k[:, source, :, :, :length]
        self.v[:, target, :, :length] = self.v[:, source, :, :length]


class FastLlama:
    """The inference forward over a KV arena; built from a loaded transformers Llama's weights."""

    def __init__(self, model, *, decode: DecodePlan | Callable[[FastLlama], DecodePlan] = DecodePlan(),
                 fused: bool = True, kv_dtype: torch.dtype | None = None) -> None:
        """`decode` is a plan, or a function that measures this engine and returns one (`dialogue.model.calibrate`).
        `kv_dtype` is the arena's. By default bfloat16 beside a float32 model with the fused kernels (it halves the
        bytes decode attention reads, which bound a step of many conversations: 16 conversations at 800 positions,
        a step 39 -> 33 ms as AVX-512F, 64 -> 57 ms as AVX2, and one conversation no slower; scores and sums stay
        float32, greedy tokens the same on the tests), else the model's own."""
        config = model.config
        if not supports(config):
            raise ValueError(f"unsupported architecture: {config.model_type}")
        self.dtype = model.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        state = model.state_dict()
        self.embed = state["model.embed_tokens.weight"].contiguous()  # (V, H)
        self.lm_head = Linear(state.get("lm_head.weight", self.embed))
        self.norm = state["model.norm.weight"]
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            qkv = torch.cat([state[attn + "q_proj.weight"], state[attn + "k_proj.weight"], state[attn + "v_proj.weight"]])
            gate_up = torch.cat([state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]])
            self.layers.append({
                "in_norm": state[p + "input_layernorm.weight"], "post_norm": state[p + "post_attention_layernorm.weight"],
                "qkv": Linear(qkv), "o": Linear(state[attn + "o_proj.weight"]),
                "gate_up": Linear(gate_up), "down": Linear(state[mlp + "down_proj.weight"]),
            })
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        inter = config.intermediate_size
        # Where each LoRA-able projection lands in the fused outputs: name -> (fused matrix, offset, size).
        self.slices = {"q": ("qkv", 0, q), "k": ("qkv", q, kv), "v": ("qkv", q + kv, kv), "o": ("o", 0, config.hidden_size),
                       "gate": ("gate_up", 0, inter), "up": ("gate_up", inter, inter), "down": ("down", 0, config.hidden_size)}
        # Rotary tables from the model's own module, so every rope variant it knows is honoured.
        positions = torch.arange(config.max_position_embeddings)[None]
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=self.dtype), positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # (P, D)
        # The fused kernels of kernels.cpp where they are built, else the same maths in plain PyTorch ops.
        self.fused = fused and self.dtype in (torch.float32, torch.bfloat16) and kernels.load()
        self.kv_dtype = kv_dtype or (torch.bfloat16 if self.fused else self.dtype)
        if self.kv_dtype not in (self.dtype, torch.bfloat16):
            raise ValueError(f"a {self.dtype} model keeps its keys and values in {self.dtype} or bfloat16")
        self.arena = KVArena(config.num_hidden_layers, self.kv_heads, self.head_dim, self.kv_dtype)
        self.plan = self.apply(decode(self) if callable(decode) else decode)
        for linear in self.linears():
            linear.release()

    LAYER_MATRICES = ("qkv", "o", "gate_up", "down")

    def linears(self) -> list[Linear]:
        return [layer[name] for layer in self.layers for name in self.LAYER_MATRICES] + [self.lm_head]

    def apply(self, plan: DecodePlan) -> DecodePlan:
        """Quantise the weights as `plan` says; formats that need the fused kernels fall back to the full weights
        where they are not built. Returns the plan in force."""
        def usable(fmt):
            return fmt if fmt is None or fmt == "torch-int4" or self.fused else None

        if (usable(plan.fmt), usable(plan.head_fmt)) != (plan.fmt, plan.head_fmt):
            logger.warning("decode weights %s/%s need the fused kernels, which are not built: full weights instead",
                           plan.fmt, plan.head_fmt)
        def int8_rows(fmt, rows):  # our formats only (usable: the kernels are built), where they have the integer dot
            return rows if fmt in ("int4", "int8") and kernels.has_int8_rows() else 0

        plan = DecodePlan(usable(plan.fmt), plan.max_rows if usable(plan.fmt) else 0,
                          usable(plan.head_fmt), plan.head_max_rows if usable(plan.head_fmt) else 0,
                          int8_rows(usable(plan.fmt), plan.int8_rows), int8_rows(usable(plan.head_fmt), plan.head_int8_rows))
        for layer in self.layers:
            for name in self.LAYER_MATRICES:
                layer[name].quantize(plan.fmt, plan.max_rows, plan.int8_rows)
        self.lm_head.quantize(plan.head_fmt, plan.head_max_rows, plan.head_int8_rows)
        return plan

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.ops.rapport.rms_norm(x, weight, self.eps)
        h = x.float()  # as transformers does it; F.rms_norm measured slower here (it copies around its kernel)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up = [gate | up], (N, 2 * inter) -> (N, inter)."""
        if self.fused:
            return torch.ops.rapport.silu_mul(gate_up)
        inter = gate_up.shape[1] // 2
        return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]

    def _rotary(self, positions: torch.Tensor):
        """What `_rope` needs for this forward's rows, prepared once for every layer: the positions for the
        fused kernel, which reads the tables itself, else each row's (cos, sin) rows, (N, 1, D) each."""
        return positions if self.fused else (self.cos[positions][:, None], self.sin[positions][:, None])

    def _rope(self, x: torch.Tensor, rotary) -> torch.Tensor:
        """x (N, heads, D) rotated to each row's position; in place when fused."""
        if self.fused:
            torch.ops.rapport.rope_(x, self.cos, self.sin, rotary)
            return x
        cos, sin = rotary
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Rows [0, B) are slots [0, B) at `positions`: store their keys and values, attend over each slot's own
        positions. q (B, heads, D), k and v (B, kv_heads, D); returns (B, heads * D)."""
        k_arena, v_arena = self.arena.k[layer], self.arena.v[layer]  # (S, Hkv, D, L), (S, Hkv, L, D)
        if self.fused:
            return torch.ops.rapport.decode_attention(q, k, v, k_arena, v_arena, positions, self.scaling)
        n, kv_len = q.shape[0], mask.shape[-1]
        slots = torch.arange(n)
        k_arena[slots, :, :, positions] = k.to(k_arena.dtype)
        v_arena[slots, :, positions] = v.to(v_arena.dtype)
        keys, values = k_arena[:n, :, :, :kv_len].to(self.dtype), v_arena[:n, :, :kv_len].to(self.dtype)
        qd = q.reshape(n, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        scores = torch.matmul(qd, keys).float() * self.scaling + mask  # (B, Hkv, G, L)
        probs = torch.softmax(scores, dim=-1).to(self.dtype)
        return torch.matmul(probs, values).reshape(n, -1)

    def _project(self, layer: int, name: str, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        out = self.layers[layer][name](x)
        for adapter, rows in batch.lora:
            entry = adapter.weights.get((layer, name))
            if entry is None:
                continue
            stacked, parts = entry
            low = x[rows] @ stacked.T  # (n, R): one matmul for every wrapped part of this fused matrix
            for offset, size, first, end, b in parts:
                out[rows, offset:offset + size] += low[:, first:end] @ b.T
        return out

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Next-token logits (len(batch.logit_rows), V) for the rows asked for; writes the rows' keys and values."""
        n_dec, heads, kv_heads, dim = batch.n_decode, self.heads, self.kv_heads, self.head_dim
        x = self.embed[batch.tokens]  # (N, H)
        dec_pos = batch.positions[:n_dec]
        dec_mask = None
        if n_dec and not self.fused:  # (B, 1, 1, L): -inf past each row's own position
            kv_len = int(dec_pos.max()) + 1
            beyond = torch.arange(kv_len)[None, :] > dec_pos[:, None]
            dec_mask = torch.zeros(n_dec, kv_len).masked_fill_(beyond, float("-inf"))[:, None, None]
        n_chunk = x.shape[0] - n_dec
        chunk_end = batch.chunk_start + n_chunk
        chunk_mask = None
        if n_chunk and batch.chunk_start:  # a later chunk sees every earlier position, and itself causally
            rows = torch.arange(n_chunk)[:, None] + batch.chunk_start
            chunk_mask = torch.arange(chunk_end)[None, :] <= rows
        q_size, kv_size = heads * dim, kv_heads * dim
        rotary = self._rotary(batch.positions)
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer["in_norm"])
            qkv = self._project(i, "qkv", h, batch)
            qk = self._rope(qkv[:, : q_size + kv_size].view(-1, heads + kv_heads, dim), rotary)  # (N, H + Hkv, D)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, q_size + kv_size:].view(-1, kv_heads, dim)
            outs = []
            if n_dec:
                outs.append(self._decode_attention(i, q[:n_dec], k[:n_dec], v[:n_dec], dec_pos, dec_mask))
            if n_chunk:
                s, start = batch.chunk_slot, batch.chunk_start
                k_arena, v_arena = self.arena.k[i], self.arena.v[i]  # (S, Hkv, D, L), (S, Hkv, L, D)
                k_arena[s, :, :, start:chunk_end] = k[n_dec:].permute(1, 2, 0)
                v_arena[s, :, start:chunk_end] = v[n_dec:].transpose(0, 1)
                keys = _dense(k_arena[s:s + 1, :, :, :chunk_end].transpose(-1, -2), self.dtype)  # (1, Hkv, L, D)
                values = v_arena[s:s + 1, :, :chunk_end].to(self.dtype)
                qc = q[n_dec:].transpose(0, 1)[None]  # (1, H, T, D)
                out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=chunk_mask, is_causal=chunk_mask is None,
                                                     scale=self.scaling, enable_gqa=True)
                outs.append(out[0].transpose(0, 1).reshape(n_chunk, q_size))
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + self._project(i, "o", attn, batch)
            h = self._rms(x, layer["post_norm"])
            x = x + self._project(i, "down", self._silu_mul(self._project(i, "gate_up", h, batch)), batch)
        last = self._rms(x[batch.logit_rows], self.norm)
        return self.lm_head(last)
