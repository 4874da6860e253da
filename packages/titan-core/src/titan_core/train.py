"""``titan-train`` and ``python -m titan_core.train``: the same entry point.

Bad input exits with code 2 and one line on stderr; set ``TITAN_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from titan_core.errors import UserError


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="[titan] %(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )


def list_models() -> str:
    """One line per installed model: name, providing distribution, flavors (or why it is
    broken)."""
    from titan_core.train_spec import installed_models

    lines = []
    for model in installed_models():
        what = f"BROKEN: {model.error}" if model.error else ", ".join(model.flavors)
        lines.append(f"{model.name:12s} from {model.distribution}: {what}")
    return "\n".join(lines) or "no model package is installed (pip install titan-llama3)"


def run(argv: list[str]) -> dict | None:
    """Parse ``argv``, train, print the summary; returns it (None for --help/--list-models)."""
    from titan_core.config import build_config, help_text

    if "-h" in argv or "--help" in argv:
        print(help_text())
        return None
    if "--list-models" in argv:
        print(list_models())
        return None
    config = build_config(argv)
    from titan_core.distributed import destroy_process_group
    from titan_core.trainer import Trainer  # heavy imports only once the config is valid

    summary = Trainer(config).train()
    # NOTE: not in a finally: after a failure the peers may be gone and a barrier would wait
    # for them; the launcher tears the group down instead.
    destroy_process_group()
    if config.checkpoint.create_seed_checkpoint:
        logging.getLogger("titan").info(
            "done: seed checkpoint (initial weights) written to %s/%s/step-0",
            summary["dump_folder"],
            config.checkpoint.folder,
        )
        return summary
    logging.getLogger("titan").info(
        "done: %d steps, loss %.4f -> %.4f, %s tokens/s per device; outputs in %s",
        summary["steps"],
        summary["first_loss"],
        summary["final_loss"],
        f"{summary['tps']:,.0f}",
        summary["dump_folder"],
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(argv)
    except UserError as e:
        if os.environ.get("TITAN_DEBUG") == "1":
            raise
        print(f"titan-train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        from titan_core.distributed import exit_now

        exit_now(0)  # every file is closed and the group destroyed
    return 0


if __name__ == "__main__":
    sys.exit(main())
