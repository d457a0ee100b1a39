"""Shared fixtures: a tiny random Llama (unit tests), the real embedded SmolLM2 (e2e), stores in temp dirs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("RAPPORT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Hello! How can I help you today?", "My name is Lena and I live in Porto.", "What is my name?",
    "The shop opens at nine and closes at six.", "Thank you, goodbye!", "Can you help me plan a trip?",
] * 20


def build_tiny_model(directory: Path) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer and a ChatML template, saved like any model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh RAPPORT_HOME; settings read from the environment see it."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("RAPPORT_HOME", str(path))
    for name in ("RAPPORT_MODEL", "RAPPORT_DATABASE_URL", "RAPPORT_CHROMA_URL", "RAPPORT_API_KEYS", "RAPPORT_ADMIN_KEYS"):
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture
def tiny_settings(home, tiny_model_dir):
    from dialogue.settings import Settings

    return Settings(home=home, model=str(tiny_model_dir), dtype="float32", threads=1, max_new_tokens=16,
                    temperature=0.0, context_budget=512)


@pytest.fixture
async def services(tiny_settings):
    """A process's services (stores in a temp home) over the tiny model, loaded."""
    from bot.services import open_services

    services = open_services(tiny_settings)
    await services.backend.ready()
    yield services
    services.close()


@pytest.fixture(scope="session")
def real_models_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2 converted once per test session (about 15 s), shared by every e2e test."""
    from dialogue.model.files import resolve_model_dir

    models = Path(os.environ.get("RAPPORT_TEST_MODELS") or tmp_path_factory.mktemp("models"))
    resolve_model_dir(None, models)
    return models


@pytest.fixture
def real_home(home, real_models_dir) -> Path:
    """A fresh RAPPORT_HOME whose models/ is the shared converted SmolLM2."""
    (home / "models").symlink_to(real_models_dir, target_is_directory=True)
    return home


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'rapport.db'}"


@pytest.fixture
def pg_url():
    """A PostgreSQL URL on a schema of its own, dropped afterwards (tests may run side by side)."""
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:  # the project's machines all run PostgreSQL; say so loudly if not
        pytest.fail(f"PostgreSQL at {PG_URL} is not reachable: {exc}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """Each transcript-store test runs on both the embedded default and the scale path."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'rapport.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="module")
def embedder():
    """The real MiniLM; one torch thread while these tests run (two thrash on a busy 2-core box)."""
    import torch

    from memory.embeddings import shared_embedder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield shared_embedder()
    torch.set_num_threads(threads)
