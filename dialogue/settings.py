"""Settings from `RAPPORT_*` environment variables, then `$RAPPORT_HOME/rapport.toml`, then defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_HOME = Path("~/.local/share/rapport")
DEFAULT_SYSTEM_PROMPT = (
    "You are Rapport, a friendly and honest assistant. Answer briefly and helpfully. "
    "If you do not know something, say so plainly instead of guessing."
)

KeyList = Annotated[list[str], NoDecode]
SecretList = Annotated[list[SecretStr], NoDecode]
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def reveal(value: SecretStr | str | None) -> str | None:
    """The plain text of a secret setting (a `SecretStr`, or a plain string a caller put in with `model_copy`)."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def home_from_env() -> Path:
    """The data directory, resolved before anything else so that `rapport.toml` can be found in it."""
    return Path(os.environ.get("RAPPORT_HOME") or DEFAULT_HOME).expanduser()


class Settings(BaseSettings):
    """Everything a deployment can tune; the defaults run fully embedded with no network."""

    model_config = SettingsConfigDict(env_prefix="RAPPORT_", extra="ignore", populate_by_name=True)

    home: Path = Field(default_factory=home_from_env, description="data directory: models, stores, adapters")
    model: str | None = Field(None, description="local model dir or hub id; unset = embedded SmolLM2")
    database_url: str | None = Field(None, description="SQLAlchemy URL; unset = SQLite in home")
    chroma_url: str | None = Field(None, description="Chroma server URL; unset = embedded store in home")
    api_keys: SecretList = Field(default_factory=list, description="legacy bearer keys for the HTTP API (ids as given; "
                                                                    "prefer `rapport keys create`)")
    admin_keys: SecretList = Field(default_factory=list, description="legacy bearer keys with the admin scope")
    telegram_bot_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("TELEGRAM_BOT_TOKEN", "RAPPORT_TELEGRAM_BOT_TOKEN", "telegram_bot_token")
    )
    backend: Literal["local", "openai"] = Field("local", description="where generation runs")
    backend_url: str | None = Field(None, description="OpenAI-compatible base URL when backend=openai, e.g. http://host:8000/v1")
    backend_model: str | None = Field(None, description="the base model's name on that server; unset = RAPPORT_MODEL")
    backend_api_key: SecretStr | None = Field(None, description="bearer key for that server, if it wants one")

    dtype: Literal["auto", "bfloat16", "float32"] = Field("auto", description="auto = the faster here, measured once (dialogue.model.calibrate)")
    threads: int | None = Field(None, ge=1, description="torch threads; unset = all cores")
    quantize: Literal["auto", "none", "int8", "int4"] = Field(
        "auto", description="weight-only quantised matmuls for decode steps (prompts are read with the full weights); "
                            "auto = whichever of int4 (embedded model only: its layers are 4-bit already), int8 and "
                            "the full weights is measured fastest on this CPU, for as many rows as it stays fastest")
    kernels: Literal["auto", "off"] = Field("auto", description="off = the plain-PyTorch path instead of the fused C++ "
                                                                 "kernels (dialogue/model/kernels.cpp)")
    kernel_dir: Path | None = Field(None, description="where built kernels are kept; unset = the virtualenv's "
                                                      "var/rapport-kernels, else ~/.cache/rapport/kernels")
    max_batch: int = Field(16, ge=1, le=256, description="conversations generating at once; more wait in line")
    chunk_tokens: int = Field(256, ge=16, description="prompt tokens read per step while other replies stream")
    prefix_cache_tokens: int = Field(16384, ge=0, description="tokens of finished turns kept for reuse by the next")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="reply budget in tokens")
    temperature: float = Field(0.3, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    context_budget: int = Field(2048, ge=256, le=32768, description="prompt + reply tokens per turn")
    max_message_chars: int = Field(8000, ge=1, description="longest user message accepted")
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_queue: int = Field(64, ge=1, description="turns one process answers at once (waiting for the model or "
                                                 "generating); a message beyond that is refused (HTTP 503 with "
                                                 "Retry-After), not queued without bound")
    turn_lease_s: float = Field(30.0, ge=0.5, description="a pending turn whose process has not renewed its lease for "
                                                          "this long is closed as interrupted (the process died)")

    # -- HTTP API and customer-service integrations (dialogue/api*.py, bot/chatwoot.py) ---------------
    api_max_body_bytes: int = Field(1_000_000, ge=1024, description="largest HTTP request body accepted (413 above)")
    api_rate_per_minute: float = Field(600.0, ge=0, description="requests per minute per API key (or client address); 0 = no limit")
    api_rate_burst: int = Field(60, ge=1, description="requests a key may send back to back before the rate applies")
    api_user_rate_per_minute: float = Field(60.0, ge=0, description="turns per minute per end user inside a key; 0 = no limit")
    api_user_rate_burst: int = Field(20, ge=1, description="turns an end user may send back to back")
    allowed_hosts: KeyList = Field(
        default_factory=list, description="Host header values the API answers (DNS rebinding); unset = localhost, "
                                          "127.0.0.1, ::1 and the bound address; * = any")
    train_max_examples_per_user: int = Field(200, ge=1, description="at most this many training examples from one user")
    chatwoot_base_url: str | None = Field(None, description="Chatwoot installation, e.g. https://chat.example.com")
    chatwoot_bot_token: SecretStr | None = Field(None, description="the agent bot's api_access_token for Chatwoot's REST API")
    chatwoot_webhook_secret: SecretStr | None = Field(
        None, description="shared secret: the HMAC-SHA256 key of X-Chatwoot-Signature, or sent as X-Rapport-Token")
    chatwoot_query_token: bool = Field(
        False, description="also accept the secret as ?token= in the webhook URL (it then shows in access logs)")
    handoff_webhook_url: str | None = Field(None, description="POST a JSON event here whenever a conversation is handed off")
    handoff_webhook_secret: SecretStr | None = Field(None, description="signs handoff webhook bodies (X-Rapport-Signature)")
    scope: Literal["auto", "business", "open"] = Field(
        "auto", description="business: every message is covered by the FAQ, not covered (handoff), small talk or "
                            "outside the business (declined), never answered by the model outside the FAQ; "
                            "open: the personal assistant, free to chat; auto: business when a FAQ is imported")
    faq_encoder: bool = Field(
        False, description="also fine-tune the FAQ's own sentence encoder when a FAQ is imported; used where its "
                           "held-out check says it finds more entries (about 20 s for 59 entries)")
    handoff_after_negative_ratings: int = Field(2, ge=1, description="hand off after this many -1 ratings in a row")

    # -- Telegram bot (bot/telegram*.py) ------------------------------------------------------------------
    telegram_allowed_ids: KeyList = Field(
        default_factory=list, description="Telegram user or chat ids allowed to use the bot (comma-separated); empty = everyone")
    telegram_webhook_secret: SecretStr | None = Field(
        None, description="secret Telegram must send with webhook updates; unset = a random one per start")
    telegram_edit_interval: float = Field(1.0, ge=0.2, description="seconds between edits of a streamed reply in a private chat")
    telegram_group_edit_interval: float = Field(
        3.0, ge=0.2, description="seconds between edits in groups (Telegram allows about 20 messages a minute there)")
    telegram_concurrency: int = Field(32, ge=1, le=1024, description="updates handled at once (one at a time per chat)")
    telegram_retry_budget: float = Field(60.0, ge=0, description="seconds to keep retrying a Bot API call through network errors")
    telegram_rate_limit_retries: int = Field(3, ge=0, description="retries of a call Telegram answered with 429 retry_after")
    telegram_base_url: str | None = Field(
        None, description="another Bot API server (as `rapport telegram --base-url`); also where the console's agent replies go")
    retrain_min_examples: int = Field(0, ge=0, description="`serve` retrains once this many new training examples "
                                      "(ratings not kept out, approved corrections) have arrived since the last run; "
                                      "0 = off")
    retrain_every_days: float = Field(0.0, ge=0, description="`serve` retrains when the last run is this many days old "
                                      "(and new examples have arrived); 0 = off")
    retrain_promote_share: float = Field(0.0, ge=0, le=1, description="a retrained version that passes the gate is "
                                         "served to this share of users without a click (1 = everyone); 0 = an "
                                         "operator promotes it")
    retrain_check_seconds: float = Field(300.0, ge=1, description="how often `serve` checks whether retraining is due")

    @field_validator("api_keys", "admin_keys", "telegram_allowed_ids", "allowed_hosts", mode="before")
    @classmethod
    def split_list(cls, value: object) -> object:
        """Comma-separated in the environment; a list (of strings or ids) in rapport.toml."""
        if isinstance(value, (str, int)):
            return [part.strip() for part in str(value).split(",") if part.strip()]
        return [str(v) for v in value] if isinstance(value, list) else value

    @field_validator("home", mode="after")
    @classmethod
    def expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=home_from_env() / "rapport.toml")
        return init_settings, env_settings, toml

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'rapport.db'}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def chroma_dir(self) -> Path:
        return self.home / "chroma"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"
