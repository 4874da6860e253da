"""Model converters: named passes applied to the built model before any parallelism.

``model.converters`` lists them by name. Each is built from the job config by a factory (which
checks its settings and the hardware, so a bad one fails before anything is built), then
``convert(model)`` rewrites the model in place, on the meta device, once, for every model
family; the trainer calls ``after_optimizer_step`` after every step and the shared decoder's
parallelize pass lets each converter adapt the tensor-parallel plan to the layers it made.

Built in: ``quantize.linear.float8`` (alias ``float8``), ``quantize.linear.mx`` (alias ``mx``),
``quantize.grouped_mm.float8`` and ``quantize.grouped_mm.mx``. A plugin registers its own under
the ``titan.converters`` entry-point group: the entry point is a factory
``fn(job_config, device) -> ModelConverter``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn

from titan_core.config.job_config import JobConfig, section_of
from titan_core.errors import UserError

logger = logging.getLogger("titan")

ENTRY_POINT_GROUP = "titan.converters"
ALIASES = {"float8": "quantize.linear.float8", "mx": "quantize.linear.mx"}
_BUILTIN = {
    "quantize.linear.float8": "titan_core.quantize.float8:Float8LinearConverter",
    "quantize.linear.mx": "titan_core.quantize.mx:MXLinearConverter",
    "quantize.grouped_mm.float8": "titan_core.quantize.grouped_mm:Float8GroupedMMConverter",
    "quantize.grouped_mm.mx": "titan_core.quantize.grouped_mm:MXGroupedMMConverter",
}
# Converters that rewrite the same layers cannot both run.
_EXCLUSIVE = [("quantize.linear.float8", "quantize.linear.mx")]


class ModelConverter:
    """A pass over the model. Subclasses override ``convert`` and, if they need to, the hooks.

    A factory ``fn(job_config, device)`` builds one; it raises :class:`UserError` for settings
    or hardware it cannot use, before any work starts.
    """

    name = "converter"

    def convert(self, model: nn.Module) -> str:
        """Rewrite ``model`` in place (it is on the meta device); return a one-line summary."""
        raise NotImplementedError

    def after_optimizer_step(self, model_parts: list[nn.Module]) -> None:
        """Called after every optimizer step, on every rank (e.g. to precompute scales)."""

    def adapt_tp_plan(self, plan: dict[str, Any], model: nn.Module, device_type: str) -> dict:
        """The tensor-parallel plan (FQN -> style) for ``model``'s converted layers."""
        return plan


Factory = Callable[[JobConfig, torch.device], ModelConverter]
_LOCAL: dict[str, Factory] = {}


def register_converter(name: str, factory: Factory) -> None:
    """Register a converter in this process (tests, notebooks); plugins use the entry point."""
    _LOCAL[name] = factory


def _import_object(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _factory(name: str) -> Factory:
    if name in _LOCAL:
        return _LOCAL[name]
    if name in _BUILTIN:
        return _import_object(_BUILTIN[name])
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as e:  # a plugin may fail in any way: one line, naming it
                reason = " ".join(f"{type(e).__name__}: {e}".split())
                raise UserError(
                    f"model.converters: the converter '{name}' ({ep.value}) failed to import "
                    f"({reason}); reinstall or fix that package"
                ) from None
    known = sorted(
        {*_BUILTIN, *ALIASES, *_LOCAL, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))}
    )
    raise UserError(f"model.converters: unknown converter '{name}'; available: {', '.join(known)}")


def canonical_names(names: list[str]) -> list[str]:
    """The converter names with aliases resolved; duplicates and clashing pairs refused."""
    canon = [ALIASES.get(n, n) for n in names]
    seen = {n for n in canon if canon.count(n) > 1}
    if seen:
        raise UserError(f"model.converters: {sorted(seen)} listed twice; list each converter once")
    for a, b in _EXCLUSIVE:
        if a in canon and b in canon:
            raise UserError(
                f"model.converters: {a} and {b} both rewrite the Linear layers; choose one"
            )
    return canon


def build_converters(config: JobConfig, device: torch.device) -> list[ModelConverter]:
    """The converters ``model.converters`` names, built and checked, in order."""
    return [_factory(name)(config, device) for name in canonical_names(config.model.converters)]


def warn_unused_sections(config: JobConfig) -> None:
    """A changed ``[quantize.*]`` section whose converter is not listed has no effect: say so.

    NOTE: torchtitan's own TOML files carry ``[quantize.linear.float8]`` with ``converters = []``,
    so such a section is a warning, not an error.
    """
    listed = set(canonical_names(config.model.converters))
    for name in _BUILTIN:
        section = section_of(config, name)
        if name not in listed and section != type(section)():
            changed = [
                f.name
                for f in dataclasses.fields(section)
                if getattr(section, f.name) != getattr(type(section)(), f.name)
            ]
            logger.warning(
                "[%s] sets %s but model.converters does not list %s: those keys have no effect",
                name,
                ", ".join(changed),
                name,
            )


def apply_converters(model: nn.Module, converters: list[ModelConverter]) -> None:
    """Run each converter on ``model`` in order and log what it did."""
    for converter in converters:
        logger.info("%s", converter.convert(model))


def adapt_tp_plan(
    plan: dict[str, Any], model: nn.Module, config: JobConfig, device_type: str
) -> dict:
    """``plan`` as the configured converters want it for ``model``'s converted layers."""
    for converter in build_converters(config, torch.device(device_type)):
        plan = converter.adapt_tp_plan(plan, model, device_type)
    return plan
