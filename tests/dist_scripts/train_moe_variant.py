"""titan-train with test-only variants of qwen3 ``debugmodel_moe`` registered (one process or under
torchrun); every argument is passed to titan-train.

- ``debugmodel_moe_loop``: the experts run as a loop over experts instead of
  ``torch._grouped_mm``.
- ``debugmodel_moe_noaux``: the auxiliary load-balancing loss off (``aux_loss_coef = 0``), the
  expert-bias update kept. Under pipeline parallel each stage pools only its own layers' router
  statistics, so with the aux loss on no pipeline layout can reproduce one process's gradients;
  the pipeline entries of the parity matrix train this variant (every other layout pools the
  whole stage's tokens and trains ``debugmodel_moe`` itself).

    python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        tests/dist_scripts/train_moe_variant.py --model.name qwen3 \\
        --model.flavor debugmodel_moe_loop ...
"""

from __future__ import annotations

import dataclasses
import sys

from titan_core.train import main
from titan_qwen3 import QWEN3_FLAVORS


def variants() -> dict:
    """The test flavors (module doc), derived from ``debugmodel_moe``."""
    base = QWEN3_FLAVORS["debugmodel_moe"]
    noaux = dataclasses.replace(base, moe=dataclasses.replace(base.moe, aux_loss_coef=0.0))
    loop = dataclasses.replace(base, moe=dataclasses.replace(base.moe, use_grouped_mm=False))
    return {"debugmodel_moe_noaux": noaux, "debugmodel_moe_loop": loop}


if __name__ == "__main__":
    QWEN3_FLAVORS.update(variants())  # the spec's flavors: titan-train finds them by name
    sys.exit(main())
