"""``titan-train`` and ``python -m titan_core.train``: the same entry point.

Bad input exits with code 2 and one line on stderr; set ``TITAN_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import sys
import time
from pathlib import Path

from titan_core.errors import RunStopped, UserError


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
    """Parse ``argv``, train, print the summary; returns it (None for --help/--list-models/
    --version)."""
    from titan_core.config import build_config, help_text

    if "-h" in argv or "--help" in argv:
        print(help_text())
        return None
    if "--list-models" in argv:
        print(list_models())
        return None
    if "--version" in argv:
        print(f"titan-train {importlib.metadata.version('titan-core')}")
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


REPORT_GRACE_S = 20.0  # how long other ranks wait for rank 0 to report bad input


def report(message: str) -> None:
    """Print a run-ending message once per job: on rank 0, and for torchrun's failure summary.

    Under torchrun each rank would print the same line; the others stay quiet, and every rank
    writes it to the error file torchrun reads (``TORCHELASTIC_ERROR_FILE``), so torchrun's
    "Root Cause" names it instead of pointing at a traceback.
    """
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            Path(error_file).write_text(
                json.dumps({"message": message, "timestamp": int(time.time())}), encoding="utf-8"
            )


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    code = 0
    try:
        run(argv)
    except UserError as e:
        if os.environ.get("TITAN_DEBUG") == "1":
            raise
        report(f"titan-train: error: {e}")
        code = 2
    except RunStopped as e:
        report(f"titan-train: {e}")
        code = e.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing was saved
        report("titan-train: interrupted before training started; nothing was saved")
        code = 130
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        from titan_core.distributed import exit_now

        if code == 2 and int(os.environ.get("RANK", 0)) != 0:
            # NOTE: every rank finds the same bad input, but under load another rank may get
            # there first; torchrun then stops rank 0 before it prints the one line (seen in a
            # clean-clone CI run). The others leave rank 0 time to report and exit first.
            time.sleep(REPORT_GRACE_S)

        exit_now(code)  # every file is closed; skip the teardown that races gloo's threads
    return code


if __name__ == "__main__":
    sys.exit(main())
