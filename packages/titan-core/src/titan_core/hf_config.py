"""Reading a Hugging Face ``config.json`` into model args, for any family's StateDictAdapter.

Typed lookups whose errors name the key, what was expected and what was found, so an adapter's
``args_from_hf_config`` refuses a config it cannot represent in one line, before any tensor is
read.
"""

from __future__ import annotations

import math
from typing import Any

from titan_core.errors import UserError

REQUIRED: Any = object()
"""Default of :func:`config_value` for a key the config must hold."""


def config_value(
    config: dict[str, Any],
    key: str,
    kind: type,
    default: Any = REQUIRED,
    *,
    family: str = "",
    where: str = "",
) -> Any:
    """``config[key]`` checked against ``kind``; a missing (or null) key takes ``default``.

    An int is accepted where a float is expected (JSON writes ``1000000`` for ``1e6``); a bool is
    never accepted as a number. A number must be finite and above zero, as every size, theta,
    epsilon and factor of a decoder config is.

    Args:
        config: the parsed config.json (or a nested object of it).
        key: the key to read; error messages name it.
        kind: the expected Python type (int, float, bool, str, dict, list).
        default: the value for a missing key, or :data:`REQUIRED`.
        family: the model family, for the message about a missing key (e.g. ``Qwen3``).
        where: the path of a nested object, for messages (e.g. ``rope_scaling.``).

    Raises:
        UserError: the key is missing and required, holds another type, or a number that is
            not finite and positive.
    """
    value = config.get(key)
    key = where + key
    if value is None:
        if default is REQUIRED:
            raise UserError(
                f"config.json: '{key}' is missing; a {family or 'model'} config needs it"
            )
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise UserError(
            f"config.json: '{key}' is {value!r}, expected {kind.__name__}; fix config.json"
        )
    if kind in (int, float) and not (math.isfinite(value) and value > 0):
        raise UserError(
            f"config.json: '{key}' is {value!r}, expected a positive {kind.__name__}; fix "
            "config.json"
        )
    return value


def attention_heads(
    config: dict[str, Any], *, family: str, default_head_dim: int | None = None
) -> tuple[int, int, int, int]:
    """(hidden_size, num_attention_heads, num_key_value_heads, head_dim), checked together.

    Args:
        config: the parsed config.json.
        family: the model family, for messages.
        default_head_dim: the family's head_dim when config.json names none; None: the
            family derives it as hidden_size // num_attention_heads, which must divide evenly.

    Raises:
        UserError: a key is missing, mistyped or not positive; num_key_value_heads does not
            divide num_attention_heads; head_dim is odd (RoPE rotates pairs) or not derivable.
    """
    dim = config_value(config, "hidden_size", int, family=family)
    n_heads = config_value(config, "num_attention_heads", int, family=family)
    n_kv_heads = config_value(config, "num_key_value_heads", int, n_heads, family=family)
    if n_heads % n_kv_heads:
        raise UserError(
            f"config.json: 'num_key_value_heads' {n_kv_heads} does not divide "
            f"'num_attention_heads' {n_heads}; fix config.json"
        )
    if default_head_dim is None and config.get("head_dim") is None and dim % n_heads:
        raise UserError(
            f"config.json: 'num_attention_heads' {n_heads} does not divide 'hidden_size' {dim} "
            "and no 'head_dim' is given; fix config.json"
        )
    default = dim // n_heads if default_head_dim is None else default_head_dim
    head_dim = config_value(config, "head_dim", int, default, family=family)
    if head_dim % 2:
        raise UserError(
            f"config.json: 'head_dim' is {head_dim}; RoPE rotates pairs, so it must be even"
        )
    return dim, n_heads, n_kv_heads, head_dim


def refuse_unsupported(
    config: dict[str, Any], key: str, supported: Any, default: Any, *, family: str
) -> None:
    """Refuse a config whose ``key`` (``default`` when absent) is not ``supported``.

    Raises:
        UserError: names the key, its value and the one value titan's ``family`` supports.
    """
    value = config.get(key, default)
    if value != supported:
        raise UserError(
            f"config.json: '{key}' is {value!r}; titan's {family} supports only {supported!r}"
        )


def rope_parameters(
    config: dict[str, Any], default_theta: float
) -> tuple[float, str, dict[str, Any], str]:
    """(theta, rope type, the other RoPE parameters, the key they came from) in either spelling:
    transformers 5's ``rope_parameters`` (theta inside) or the older ``rope_theta`` +
    ``rope_scaling`` (whose type key is ``rope_type`` or ``type``).

    Args:
        config: the parsed config.json.
        default_theta: the family's theta when the config names none.

    Raises:
        UserError: the RoPE object is not an object, or theta is not a number.
    """
    key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    params = config.get(key) or {}
    if not isinstance(params, dict):
        raise UserError(f"config.json: '{key}' is {params!r}, expected an object")
    theta = config_value({**config, **params}, "rope_theta", float, default_theta)
    kind = params.get("rope_type", params.get("type", "default"))
    rest = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}
    return theta, kind, rest, key
