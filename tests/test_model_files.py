"""The embedded model's files: `make setup` converts the GGUF once; a new home copies that conversion."""

from __future__ import annotations

import json

import pytest

from dialogue.model import files


def fake_conversion(directory, fingerprint):
    directory.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_text(f"{name} from setup")
    (directory / files.MARKER).write_text(json.dumps({"fingerprint": fingerprint}))


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    """A complete setup-time conversion of the installed GGUF (its files stand-ins: only copying is under test)."""
    setup = tmp_path / "setup-models"
    fake_conversion(setup / files.EMBEDDED_NAME, files._fingerprint(files.embedded_gguf()))
    monkeypatch.setattr(files, "setup_models_dir", lambda: setup)
    converted = []
    monkeypatch.setattr(files, "convert_gguf", lambda gguf, target: converted.append(target) or target)
    return setup, converted


def test_a_new_home_copies_the_setup_conversion_instead_of_converting(tmp_path, prepared):
    setup, converted = prepared
    home_models = tmp_path / "home" / "models"
    target = files.resolve_model_dir(None, home_models)
    assert target == home_models / files.EMBEDDED_NAME and not converted
    assert (target / "model.safetensors").read_text() == "model.safetensors from setup"
    # a copy, not a link: damaging one home's file leaves the setup conversion (and every other home) intact
    assert (target / "model.safetensors").stat().st_ino != (setup / files.EMBEDDED_NAME / "model.safetensors").stat().st_ino
    (target / "model.safetensors").write_text("damaged")
    assert (setup / files.EMBEDDED_NAME / "model.safetensors").read_text() == "model.safetensors from setup"
    assert not list(target.parent.glob(".*"))  # no temp dir left behind


def test_a_rebuild_after_a_bad_copy_converts_from_the_gguf(tmp_path, prepared):
    _, converted = prepared
    home_models = tmp_path / "home" / "models"
    files.resolve_model_dir(None, home_models, from_gguf=True)
    assert converted == [home_models / files.EMBEDDED_NAME]


def test_an_incomplete_setup_conversion_is_not_copied(tmp_path, prepared):
    setup, converted = prepared
    (setup / files.EMBEDDED_NAME / "tokenizer.json").unlink()
    files.resolve_model_dir(None, tmp_path / "home" / "models")
    assert converted == [tmp_path / "home" / "models" / files.EMBEDDED_NAME]
