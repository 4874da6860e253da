"""Typed job configuration: sections, TOML + command-line parsing, validation."""

from titan_core.config.job_config import JobConfig
from titan_core.config.manager import build_config, help_text, load_toml, to_toml

__all__ = ["JobConfig", "build_config", "help_text", "load_toml", "to_toml"]
