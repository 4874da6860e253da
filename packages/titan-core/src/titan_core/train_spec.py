"""TrainSpec: what a model package hands titan-core, and the entry-point registry.

A model package registers one ``TrainSpec`` under the ``titan.models`` entry-point group::

    [project.entry-points."titan.models"]
    llama3 = "titan_llama3:train_spec"

Specs are looked up lazily: only the requested entry point is imported. A name that two
distributions register is an error naming both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from torch import nn

from titan_core.errors import UserError

ENTRY_POINT_GROUP = "titan.models"


@dataclass(frozen=True)
class TrainSpec:
    """Everything titan-core needs to train one model family.

    Args:
        name: the family's name, as given to ``--model.name``.
        flavors: flavor name -> model-args dataclass (always including ``debugmodel``).
        model_cls: ``model_cls(args)`` builds the single-device model; it must have a
            ``layers`` ModuleDict and an ``init_weights()`` method.
        parallelize_fn: ``parallelize_fn(model, parallel_dims, mesh, job_config)`` applies
            parallelisms in place (mesh is None in a single process).
        pipelining_fn: splits the model into pipeline stages, or None.
        state_dict_adapter: converts between Hugging Face and titan state dicts, or None.
        flops_per_token_fn: ``fn(args, num_params, seq_len)`` -> training FLOPs per token.
        build_loss_fn: ``fn(job_config)`` -> ``loss_fn(logits (B, S, V), labels (B, S))``, the
            mean loss of a microbatch; None: next-token cross entropy in fp32.
        build_optimizer_fn: ``fn(model_parts, optimizer_config)`` -> a ``torch.optim``
            optimizer over the parts' parameters; None: AdamW/Adam from ``[optimizer]``.
        build_tokenizer_fn: ``fn(hf_assets_path)`` -> a :class:`titan_core.data.Tokenizer`;
            None: ``tokenizer.json`` of that folder, or the embedded tokenizer for "".
        aux_loss_fn: ``fn(model_part, mesh)`` -> a scalar added to the microbatch loss before
            backward (e.g. an MoE load-balancing loss from what the part recorded in its
            forward), or None for no extra term; ``mesh`` is None in one process.
        post_optimizer_fn: ``fn(model_parts, mesh)`` called after every optimizer step (e.g. the
            MoE expert-bias update; ``mesh`` is None in one process); it may return a dict of
            numbers, logged with the step's metrics.
    """

    name: str
    flavors: Mapping[str, Any]
    model_cls: type[nn.Module]
    parallelize_fn: Callable[..., nn.Module | None]
    pipelining_fn: Callable[..., Any] | None = None
    state_dict_adapter: Any = None
    flops_per_token_fn: Callable[[Any, int, int], float] | None = None
    build_loss_fn: Callable[[Any], Callable[..., Any]] | None = None
    build_optimizer_fn: Callable[[list[nn.Module], Any], Any] | None = None
    build_tokenizer_fn: Callable[[str], Any] | None = None
    aux_loss_fn: Callable[[nn.Module, Any], Any] | None = None
    post_optimizer_fn: Callable[[list[nn.Module], Any], Mapping[str, float] | None] | None = None


_LOCAL: dict[str, TrainSpec] = {}


def register_train_spec(spec: TrainSpec) -> None:
    """Register a spec in this process only (tests, notebooks); entry points are the norm."""
    _LOCAL[spec.name] = spec


def _dist_name(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "<unknown distribution>"


def discover() -> dict[str, EntryPoint]:
    """Installed model entry points by name; a name registered twice is a UserError."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and _dist_name(found[ep.name]) != _dist_name(ep):
            raise UserError(
                f"model '{ep.name}' is registered twice, by the distributions "
                f"'{_dist_name(found[ep.name])}' and '{_dist_name(ep)}'; uninstall one of them"
            )
        found[ep.name] = ep
    return found


def available_models() -> dict[str, str]:
    """Model name -> the distribution that provides it."""
    names = {name: _dist_name(ep) for name, ep in discover().items()}
    names.update({name: "<registered in-process>" for name in _LOCAL})
    return dict(sorted(names.items()))


def _load(ep: EntryPoint) -> TrainSpec:
    """Import one entry point; a UserError naming its distribution if that fails.

    NOTE: any exception is caught (a plugin's import may fail in any way) and its message is
    folded onto one line, so a broken plugin is one line of output, never a traceback.
    """
    try:
        spec = ep.load()
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise UserError(
            f"the entry point '{ep.value}' of distribution '{_dist_name(ep)}' failed to import "
            f"({reason}); reinstall or fix that package"
        ) from None
    if not isinstance(spec, TrainSpec):
        raise UserError(
            f"entry point '{ep.value}' of '{_dist_name(ep)}' is a {type(spec).__name__}, not a "
            "titan_core.TrainSpec"
        )
    return spec


def get_train_spec(name: str) -> TrainSpec:
    """The TrainSpec registered as ``name``.

    Raises:
        UserError: no such model (the installed ones are listed), or its entry point fails to
            import (the distribution is named).
    """
    if name in _LOCAL:
        return _LOCAL[name]
    installed = discover()
    if name not in installed:
        listing = ", ".join(installed) or "none"
        raise UserError(
            f"model.name: no model '{name}' is installed (installed: {listing}); "
            f"pip install the package that provides it, e.g. titan-{name}"
        )
    try:
        return _load(installed[name])
    except UserError as e:
        raise UserError(f"model.name: {e}") from None


@dataclass(frozen=True)
class InstalledModel:
    """One registered model, as ``titan-train --list-models`` shows it.

    Args:
        name: the model name (``--model.name``).
        distribution: the distribution providing it, with its version.
        flavors: its flavor names; empty when it is broken.
        error: why its entry point cannot be used, or None.
    """

    name: str
    distribution: str
    flavors: tuple[str, ...] = ()
    error: str | None = None


def installed_models() -> list[InstalledModel]:
    """Every registered model, sorted by name, each entry point imported to read its flavors.

    A plugin that fails to import is listed with its error instead of failing the listing.
    """
    models = [
        InstalledModel(name, "<registered in-process>", tuple(spec.flavors))
        for name, spec in _LOCAL.items()
    ]
    for name, ep in discover().items():
        if name in _LOCAL:
            continue
        version = getattr(ep.dist, "version", None)
        dist = _dist_name(ep) + (f" {version}" if version else "")
        try:
            models.append(InstalledModel(name, dist, tuple(_load(ep).flavors)))
        except UserError as e:
            models.append(InstalledModel(name, dist, error=str(e)))
    return sorted(models, key=lambda m: m.name)
