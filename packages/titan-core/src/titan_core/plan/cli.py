"""``titan-plan``: titan-train's config (TOML + ``--section.key`` flags) plus a target.

    titan-plan --job.config_file llama3_70b.toml --gpu H100 --nodes 32 --gpus-per-node 8
    titan-plan ... --search          # rank the layouts that fit
    titan-plan ... --json            # one JSON object on stdout

Bad input exits with code 2 and one line on stderr, before any probe runs.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field

from titan_core.errors import UserError, report_user_error

USAGE = """usage: titan-plan [titan-train's --job.config_file and --section.key flags]
                  [--gpu NAME] [--nodes N] [--gpus-per-node N] [--search [--top K]] [--json]

Will this model and layout fit, and how fast will it run? Memory per device comes from
titan's own training step run on fake tensors at the target's world size; time from a model
of the device (docs/planning.md).

  --gpu NAME          h100 (SXM 80 GB), h200, a100 (80 GB), b200, h100-hbm2e, or cpu
                      (this machine); default h100
  --nodes N           hosts; default 1
  --gpus-per-node N   devices (cpu: processes) per host; default 8 (cpu: 1)
  --search            rank the layouts that fit (parallel degrees, AC mode, local batch,
                      Float8) instead of planning the config's own
  --top K             how many layouts --search prints; default 3
  --json              print one JSON object instead of the report
"""


@dataclass
class PlanArgs:
    """titan-plan's own flags; everything else is titan-train's config."""

    gpu: str = "h100"
    nodes: int = 1
    per_node: int | None = None  # default: 8 GPUs, or 1 process on cpu
    search: bool = False
    top: int = 3
    json: bool = False
    train_argv: list[str] = field(default_factory=list)


_VALUED = {"--gpu": "gpu", "--nodes": "nodes", "--gpus-per-node": "per_node", "--top": "top"}


def parse_args(argv: list[str]) -> PlanArgs:
    """Split titan-plan's flags from titan-train's; a bad value is a one-line UserError."""
    out = PlanArgs()
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in _VALUED:
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{flag}: needs a value")
                value, i = argv[i + 1], i + 1
            name = _VALUED[flag]
            setattr(out, name, value if name == "gpu" else _positive(flag, value))
        elif flag in ("--search", "--json"):
            setattr(out, flag[2:], True)
        else:
            out.train_argv.append(argv[i])
        i += 1
    if out.per_node is None:
        out.per_node = 1 if out.gpu.strip().lower() == "cpu" else 8
    return out


def _positive(flag: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UserError(f"{flag}={value}: expected a positive integer")
    return number


def run(argv: list[str]) -> int:
    from titan_core.config import build_config
    from titan_core.plan.devices import find_device
    from titan_core.plan.planner import Target, plan_layout
    from titan_core.plan.report import as_json, as_text

    args = parse_args(argv)
    config = build_config(args.train_argv)
    target = Target(find_device(args.gpu, args.per_node), args.nodes, args.per_node)
    progress = None if args.json else _progress
    if args.search:
        from titan_core.plan.search import print_search

        return print_search(config, target, args.top, args.json, progress)
    plan = plan_layout(config, target, progress)
    if args.json:
        print(json.dumps(as_json(plan), indent=2))
    else:
        print(as_text(plan))
        if not plan.fits:
            print("\ntry titan-plan --search for layouts that fit this target")
    return 0


def _progress(line: str) -> None:
    print(f"[titan-plan] {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    logging.basicConfig(level=logging.WARNING, format="[titan] %(message)s")
    try:
        return run(argv)
    except UserError as e:
        return report_user_error("titan-plan", e)


if __name__ == "__main__":
    sys.exit(main())
