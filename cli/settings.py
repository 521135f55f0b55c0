"""What the `ferry` command itself reads from the environment (FERRY_ prefix).

The API, the worker and storage read their own settings classes; `ferry serve` builds
theirs from these and hands them over (the API in this process, the workers as their
processes' environment), leaving this process's environment as it found it.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class CliSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    # --log-level when none is given.
    log_level: str = "info"
    # `ferry serve`: its text model (unset: SmolLM2-135M-Instruct) and the name it is served
    # under, and the engine (unset: vLLM where it is installed, else transformers). Plain
    # strings: the workers check them.
    model: str | None = None
    served_model_name: str | None = None
    engine: str | None = None
    # `ferry submit` and `ferry batch`: the API they talk to, and their key (unset: the key
    # `ferry serve` wrote to .ferry/api-key).
    server: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    # `ferry keys`: the API (unset: `server`) and the server's admin key.
    url: str | None = None
    admin_key: str | None = None
