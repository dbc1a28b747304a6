"""One typed settings object for the whole service: CLI flags and `TINKERD_*` env vars."""

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tinkerd.constants import EMBEDDED_MODEL


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("tinkerd"))


class Settings(BaseSettings):
    """Every knob of tinkerd. Each field is also read from `TINKERD_<FIELD>` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="TINKERD_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    models: list[str] = Field(default_factory=lambda: [EMBEDDED_MODEL])
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    threads: int | None = None
