"""Reading the job config: defaults, then a TOML file, then ``--section.key value`` flags.

Every value is checked against the field's type as it is read, so a wrong type or an unknown key
is reported with the key's name before any work starts.
"""

from __future__ import annotations

import difflib
import math
import sys
import tomllib
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from titan_core.config.job_config import INT64_MAX, Bounds, JobConfig, section_of, sections
from titan_core.errors import UserError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _lookup(section: str, key: str, where: str) -> tuple[type, Any]:
    """The dataclass and the type of ``section.key``, or a UserError naming ``where``."""
    all_sections = sections()
    if section not in all_sections:
        names = list(all_sections)
        raise UserError(
            f"{where}: unknown section '{section}'{_closest(section, names)}; "
            f"sections are {', '.join(names)}"
        )
    hints = _field_types(all_sections[section])
    if key not in hints:
        raise UserError(
            f"{where}: unknown key '{section}.{key}'{_closest(key, list(hints))}; "
            f"run titan-train --help for the keys of [{section}]"
        )
    return all_sections[section], hints[key]


def describe_type(tp: Any) -> str:
    """A short human name for a field type, as shown by --help and in errors."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{describe_type(inner[0])} (optional)"
    if origin is list:
        return f"comma-separated list of {describe_type(typing.get_args(tp)[0])}"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def convert(value: Any, tp: Any, where: str, from_cli: bool = False) -> Any:
    """Check a TOML value, or convert a command-line string, to the field type ``tp``."""
    origin = typing.get_origin(tp)
    bad = UserError(f"{where}: expected {describe_type(tp)}, got {value!r}")
    if origin in (types.UnionType, typing.Union):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        if value is None or (from_cli and value.lower() in ("none", "")):
            return None
        return convert(value, inner, where, from_cli)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise bad
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if from_cli:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad
        return [convert(v, item, where, from_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp is int:
        if from_cli:
            try:
                return int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if from_cli:
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"config type {tp} of {where} is not supported")


def check_number(value: Any, bounds: Bounds | None, where: str) -> None:
    """Refuse NaN, infinities, integers beyond 64 bits and numbers outside the field's bounds."""
    if isinstance(value, list):
        for item in value:
            check_number(item, bounds, where)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: {value} is not a finite number; give a finite value")
    if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise UserError(f"{where}: {value} does not fit in a 64-bit integer")
    if bounds is not None and not bounds.admits(value):
        raise UserError(f"{where}: must be {bounds.describe()}, got {value}")


def _set(config: JobConfig, section: str, key: str, raw: Any, where: str, from_cli: bool) -> None:
    cls, tp = _lookup(section, key, where)
    value = convert(raw, tp, where, from_cli)
    bounds = next(f.metadata.get("bounds") for f in fields(cls) if f.name == key)
    check_number(value, bounds, where)
    setattr(section_of(config, section), key, value)


def load_toml(config: JobConfig, path: str) -> None:
    """Apply a TOML file's values onto ``config``."""
    file = Path(path)
    if not file.is_file():
        raise UserError(
            f"job.config_file: {path} does not exist or is not a file; pass the path of a TOML file"
        )
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"job.config_file: {path} is not valid TOML ({e})") from None
    _apply_tables(config, "", data, str(path))


def _apply_tables(config: JobConfig, prefix: str, tables: dict[str, Any], path: str) -> None:
    """Set the keys of each ``[section]`` table; nested sections (``[quantize.linear.float8]``)
    arrive as tables inside their parent's table and are walked into."""
    known = sections()
    for name, values in tables.items():
        section = prefix + name
        if not isinstance(values, dict):
            raise UserError(
                f"{path}: top-level key '{section}' must be a [section] table; "
                f"write it as [{section}] followed by its keys"
            )
        if section not in known and any(s.startswith(section + ".") for s in known):
            _apply_tables(config, section + ".", values, path)
            continue
        for key, value in values.items():
            _set(config, section, key, value, f"{path}: [{section}] {key}", from_cli=False)


def _is_bool_field(section: str, key: str) -> bool:
    try:
        _, tp = _lookup(section, key, "")
    except UserError:
        return False
    return tp is bool


class Flag(typing.NamedTuple):
    """One ``--section.key value`` flag: the field it sets and the name as the user typed it."""

    section: str
    key: str
    value: str
    typed: str  # e.g. "--training.local-batch-size", for error messages


def parse_cli(argv: list[str]) -> list[Flag]:
    """Split ``--section.key value`` flags into :class:`Flag` records.

    A hyphen anywhere in the section or key means an underscore, as in torchtitan's CLI, so
    ``--training.local-batch-size`` and ``--compile.no-enable`` name ``local_batch_size`` and
    the negated ``enable``.
    """
    out: list[Flag] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise UserError(
                f"argument {arg!r}: expected --section.key VALUE (e.g. --training.steps 10); "
                "run titan-train --help for the list"
            )
        typed, eq, value = arg[2:].partition("=")
        where = f"--{typed}"
        # sections may be dotted (quantize.linear.float8): the key is after the last dot
        section, _, key = typed.replace("-", "_").rpartition(".")
        if key.startswith("no_") and _is_bool_field(section, key[3:]) and not eq:
            out.append(Flag(section, key[3:], "false", where))
            i += 1
            continue
        _lookup(section, key, where)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if _is_bool_field(section, key) and (nxt is None or nxt.lower() not in _TRUE | _FALSE):
                value = "true"  # a bare boolean flag
            elif nxt is None:
                raise UserError(f"{where}: missing a value; write {where} VALUE")
            else:
                value = nxt
                i += 1
        out.append(Flag(section, key, value, where))
        i += 1
    return out


def build_config(argv: list[str] | None = None) -> JobConfig:
    """Defaults, then ``--job.config_file``'s TOML, then the other flags (CLI wins)."""
    argv = sys.argv[1:] if argv is None else argv
    overrides = parse_cli(argv)
    config = JobConfig()
    for flag in overrides:
        if (flag.section, flag.key) == ("job", "config_file"):
            config.job.config_file = flag.value
    if config.job.config_file:
        load_toml(config, config.job.config_file)
    for flag in overrides:
        _set(config, flag.section, flag.key, flag.value, flag.typed, from_cli=True)
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def to_toml(config: Any) -> str:
    """The config as TOML text that ``load_toml`` reads back to an equal config.

    Unset optional keys (None) are left out: TOML has no null and the default is None.
    """
    lines: list[str] = []
    for name in sections():
        section = section_of(config, name)
        assert is_dataclass(section)
        lines.append(f"[{name}]")
        for f in fields(section):
            value = getattr(section, f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _kind(f: Any, tp: Any) -> str:
    """The field's type, and the numbers it accepts where they are bounded."""
    bounds = f.metadata.get("bounds")
    return describe_type(tp) + (f", {bounds.describe()}" if bounds else "")


def help_text() -> str:
    """Every section and key with its type, default and meaning."""
    out = [
        "usage: titan-train [--job.config_file FILE.toml] [--section.key VALUE ...]",
        "       torchrun --nproc-per-node N -m titan_core.train [same flags]",
        "",
        "Precedence: command line > TOML file > defaults. Booleans are bare flags",
        "(--checkpoint.enable); --section.no_key or --section.key false turns one off.",
        "A hyphen in a flag means an underscore (--training.local-batch-size 4).",
        "Lists are comma-separated (--compile.components model,loss). Other flags:",
        "  --list-models     list the installed model families and their flavors",
        "  --version         print titan-core's version",
        "",
    ]
    for name, cls in sections().items():
        out.append(f"[{name}]")
        hints = _field_types(cls)
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            out.append(f"  --{name}.{f.name}  ({_kind(f, hints[f.name])}, default {default!r})")
            out.append(f"      {f.metadata['help']}")
        out.append("")
    return "\n".join(out)


def markdown_reference() -> str:
    """Every section and key as Markdown tables (the body of docs/configuration.md)."""
    out = []
    for name, cls in sections().items():
        hints = _field_types(cls)
        out += [f"### `[{name}]`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            shown = "unset" if default is None else f"`{_toml_value(default)}`"
            kind = _kind(f, hints[f.name]).replace("|", "\\|")
            out.append(f"| `{f.name}` | {kind} | {shown} | {f.metadata['help']} |")
        out.append("")
    return "\n".join(out)
