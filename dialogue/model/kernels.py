"""Build and load the fused CPU kernels of kernels.cpp (torch.ops.rapport.*).

`make setup` builds them once (`python -m dialogue.kernels`), with the machine's compiler against the installed
torch, for this CPU (-march=native). The library is named by a hash of the source, torch's version and the
CPU, so a change of any of them builds afresh. Where no compiler is found or the build fails, `load()` returns
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

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
_lock = threading.Lock()
_state: dict[str, bool] = {}


def cache_dir() -> Path:
    """Where built libraries live: RAPPORT_KERNEL_DIR, else beside the virtualenv, else the user's cache."""
    if os.environ.get("RAPPORT_KERNEL_DIR"):
        return Path(os.environ["RAPPORT_KERNEL_DIR"])
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "var" / "rapport-kernels"
    return Path.home() / ".cache" / "rapport" / "kernels"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (avx512_bf16, amx_bf16, ...); empty where unknown."""
    try:
        line = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + (platform.machine() + " ".join(sorted(cpu_flags()))).encode()).hexdigest()
    return cache_dir() / f"rapport_kernels_{digest[:16]}.so"


def build(target: Path) -> None:
    """Compile kernels.cpp into `target`; raises CalledProcessError with the compiler's output on failure."""
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    compiler = os.environ.get("CXX", "c++")
    command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *[f"-I{path}" for path in cpp_extension.include_paths()], str(SOURCE),
               f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        subprocess.run([*command, "-o", str(partial)], check=True, capture_output=True, text=True)
        os.replace(partial, target)  # atomic: a concurrent loader sees the whole library or none


def load(*, build_missing: bool = True) -> bool:
    """True when torch.ops.rapport is usable; builds the library first if it is missing and allowed to."""
    with _lock:
        if "loaded" in _state:
            return _state["loaded"]
        ok = False
        if os.environ.get("RAPPORT_KERNELS", "auto") == "off":
            logger.info("fused kernels turned off (RAPPORT_KERNELS=off)")
        else:
            try:
                path = library_path()
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


if __name__ == "__main__":  # `python -m dialogue.kernels`: build (or check) the library for this machine
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not load():
        sys.exit("fused kernels unavailable (see the message above); Rapport will run the plain PyTorch path")
    print(f"fused kernels ready: {library_path()}")
