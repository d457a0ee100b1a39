"""Build and load the fused CPU kernels of kernels.cpp (torch.ops.rapport.*).

`make setup` builds them once (`python -m dialogue.model.kernels`), with the machine's compiler against the installed
torch, for this CPU (-march=native), or for the lesser CPU class the process is capped to (`cpu_class`). The library
is named by a hash of the source, torch's version and the CPU class and flags, so a change of any of them builds
afresh. Where no compiler is found or the build fails, `load()` returns
False and the model runs its plain-PyTorch path (the same maths, slower): a missing compiler costs speed only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from dialogue.settings import Settings

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
_lock = threading.Lock()
_state: dict[str, bool] = {}


def cache_dir(settings: Settings | None = None) -> Path:
    """Where built libraries live: RAPPORT_KERNEL_DIR, else beside the virtualenv, else the user's cache."""
    settings = settings or Settings()
    if settings.kernel_dir is not None:
        return settings.kernel_dir
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "var" / "rapport-kernels"
    return Path.home() / ".cache" / "rapport" / "kernels"


# CPU classes from least to most capable, as the engine chooses paths for them. A machine can be told to act as a
# lesser class with the variables torch itself reads (ONEDNN_MAX_CPU_ISA for oneDNN, ATEN_CPU_CAPABILITY for ATen's
# own kernels): the kernels are then built for that class too, and calibration sees what such a CPU would run.
CLASSES = ("default", "avx2", "avx512", "avx512_bf16")
ABOVE = {  # flags a CPU of the class does not have although a better one does
    "default": {"avx", "avx2", "fma", "f16c"},
    "avx2": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"},
    "avx512": {"avx512_bf16", "avx512_vnni", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile"},
}
MARCH = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "default": "x86-64-v2"}  # -march for a capped class
ONEDNN_CAP = {"SSE41": "default", "AVX": "default", "AVX2": "avx2", "AVX2_VNNI": "avx2", "AVX2_VNNI_2": "avx2",
              "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512"}
ATEN_CAP = {"default": "default", "avx2": "avx2"}


def native_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (avx512_bf16, amx_bf16, ...); empty where unknown."""
    try:
        line = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def class_of(flags: set[str]) -> str:
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "avx512_bf16"
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


def cpu_class() -> str:
    """The class this process runs as: the CPU's own, or a lesser one that ONEDNN_MAX_CPU_ISA or
    ATEN_CPU_CAPABILITY caps it to."""
    caps = [class_of(native_flags()), ONEDNN_CAP.get(os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper(), "avx512_bf16"),
            ATEN_CAP.get(os.environ.get("ATEN_CPU_CAPABILITY", "").lower(), "avx512_bf16")]
    return min(caps, key=CLASSES.index)


def cpu_flags() -> set[str]:
    """The flags of the class this process runs as: the CPU's own, less those above a cap."""
    flags, cls = native_flags(), cpu_class()
    for capped in CLASSES[CLASSES.index(cls):]:
        flags -= ABOVE.get(capped, set())
    return flags


def march() -> str:
    """The compiler's target: this CPU, or the baseline of the class it is capped to."""
    cls = cpu_class()
    if cls == class_of(native_flags()) or platform.machine() not in ("x86_64", "AMD64"):
        return "native"
    return MARCH[cls]


# -fno-trapping-math lets GCC vectorise the loops with a select in them (the polynomial exp of softmax and SiLU): no
# result changes, as nothing here reads floating-point exception flags. SiLU·mul over an 800-row chunk: 3.4 -> 0.6 ms.
CFLAGS = ("-O3", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c++20")


def library_name() -> str:
    """Named by a hash of the source, the compiler flags, torch's version and the CPU class it is built for."""
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(CFLAGS).encode()
                            + (platform.machine() + march() + " ".join(sorted(cpu_flags()))).encode()).hexdigest()
    return f"rapport_kernels_{digest[:16]}.so"


def library_path(settings: Settings | None = None) -> Path:
    return cache_dir(settings) / library_name()


def build(target: Path) -> None:
    """Compile kernels.cpp into `target`; raises CalledProcessError with the compiler's output on failure."""
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    compiler = os.environ.get("CXX", "c++")
    command = [compiler, *CFLAGS, f"-march={march()}",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *[f"-I{path}" for path in cpp_extension.include_paths()], str(SOURCE),
               f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        subprocess.run([*command, "-o", str(partial)], check=True, capture_output=True, text=True)
        os.replace(partial, target)  # atomic: a concurrent loader sees the whole library or none


def load(settings: Settings | None = None, *, build_missing: bool = True) -> bool:
    """True when torch.ops.rapport is usable; builds the library first if it is missing and allowed to.

    The first call in a process decides (a loaded library cannot be unloaded): the model backend makes it with the
    process's settings before anything else asks; without settings, `Settings()` reads the same variables."""
    with _lock:
        if "loaded" in _state:
            return _state["loaded"]
        settings = settings or Settings()
        ok = False
        if settings.kernels == "off":
            logger.info("fused kernels turned off (RAPPORT_KERNELS=off)")
        else:
            try:
                path = library_path(settings)
                if not path.exists() and build_missing:
                    logger.info("building the fused kernels into %s", path)
                    build(path)
                if path.exists():
                    torch.ops.load_library(str(path))
                    ok = True
            except subprocess.CalledProcessError as exc:
                logger.warning("could not build the fused kernels, using the plain path: %s",
                               (exc.stderr or "").strip()[-2000:])
            except (OSError, RuntimeError) as exc:
                logger.warning("could not load the fused kernels, using the plain path: %s", exc)
        _state["loaded"] = ok
        return ok


def has_int8_rows() -> bool:
    """True when the loaded kernels can quantise a matmul's rows to int8 too (built for AVX2 or better)."""
    return load() and torch.ops.rapport.has_int8_rows()


if __name__ == "__main__":  # `python -m dialogue.model.kernels`: build (or check) the library for this machine
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not load():
        sys.exit("fused kernels unavailable (see the message above); Rapport will run the plain PyTorch path")
    print(f"fused kernels ready: {library_path()}")
