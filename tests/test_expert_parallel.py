"""Expert parallel: the mesh it borrows, its refusals, its token dispatch, and the MoE parity
matrix (every layout with expert parallel trains like one process).

The matrix trains qwen3 ``debugmodel_moe`` (fp32, gloo, 4 processes, 6 steps) with its
auxiliary loss off (flavor ``debugmodel_moe_noaux``, registered by
``dist_scripts/train_moe_variant.py``): that loss is computed over the tokens each rank,
pipeline stage and microbatch sees, so its value depends on the layout by definition. The
expert-bias update stays on (token counts summed over every rank of a stage are the same under
any layout). Losses and gradient norms must equal the single-process run's to 1e-5 relative.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import FAST, REPO, read_metrics
from titan_core.config import build_config
from titan_core.errors import UserError
from titan_core.parallel import ParallelDims, check_supported, validate_layout
from titan_core.parallel.expert_parallel import expert_major_order
from titan_qwen3 import QWEN3_FLAVORS

P = "--parallelism."
MOE = ["--model.name", "qwen3", "--model.flavor", "debugmodel_moe"]
VARIANT = REPO / "tests" / "dist_scripts" / "train_moe_variant.py"

# ---- the mesh ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, world, in_ep, mod_ep, divide",
    [
        ([f"{P}expert_parallel_degree", "2"], 4, 2, 2, 4),  # EP 2 x FSDP 2
        ([f"{P}expert_parallel_degree", "4"], 4, 4, 1, 4),
        ([f"{P}expert_parallel_degree", "2", f"{P}tensor_parallel_degree", "2"], 4, 1, 2, 2),
        ([f"{P}expert_parallel_degree", "2", f"{P}context_parallel_degree", "2"], 4, 1, 2, 4),
        (
            [f"{P}expert_parallel_degree", "4", f"{P}data_parallel_replicate_degree", "2"],
            8, 4, 1, 8,
        ),
    ],
)  # fmt: skip
def test_expert_parallel_borrows_dp_shard_cp_and_tp(argv, world, in_ep, mod_ep, divide):
    dims = ParallelDims.from_config(build_config(argv).parallelism, world)
    assert dims.ep == dims.dp_shard_in_ep * dims.cp * dims.tp
    assert (dims.dp_shard_in_ep, dims.dp_shard_mod_ep) == (in_ep, mod_ep)
    assert dims.dp_shard_in_ep * dims.dp_shard_mod_ep == dims.dp_shard
    # The experts' summed gradients are divided by the ranks the loss is averaged over.
    assert dims.expert_grad_divide_factor == divide == dims.dp_replicate * dims.dp_shard * dims.cp


def test_received_tokens_are_resorted_by_local_expert():
    # 3 source ranks x 2 local experts; rows arrive rank-major: r0e0 r0e1 r1e0 r1e1 r2e0 r2e1.
    counts = torch.tensor([[2, 1], [0, 3], [1, 0]])
    labels = [f"r{r}e{e}" for r in range(3) for e in range(2) for _ in range(counts[r, e])]
    order = expert_major_order(counts, int(counts.sum()))
    resorted = [labels[i] for i in order]
    expected = ["r0e0", "r0e0", "r2e0", "r0e1", "r1e1", "r1e1", "r1e1"]
    assert resorted == expected


# ---- refusals: one line naming keys and numbers, exit 2, before any process group ----------


def check(argv: list[str], world: int, args) -> None:
    config = build_config(argv)
    dims = ParallelDims.from_config(config.parallelism, world)
    check_supported(dims)
    validate_layout(dims, config, args)


def test_top_k_beyond_the_expert_count_is_refused():
    args = SimpleNamespace(moe=SimpleNamespace(num_experts=4, top_k=6), n_heads=8, n_kv_heads=4)
    with pytest.raises(UserError) as e:
        check(MOE, 1, args)
    assert "top_k=6" in str(e.value) and "num_experts=4" in str(e.value)


@pytest.fixture
def refuse(monkeypatch, tmp_path, capsys):
    """Run titan-train in-process as rank 0 of ``world`` ranks; assert it stops with exit 2 and
    one line, without starting a process group or touching the dump folder; return the line."""
    import titan_core.distributed
    import titan_core.trainer
    from titan_core.train import main

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started before the refusal")

    monkeypatch.setattr(titan_core.trainer, "init_process_group", no_process_group)
    monkeypatch.setattr(titan_core.distributed, "exit_now", lambda code: None)

    def run(argv: list[str], world: int) -> str:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        dump = tmp_path / "run"
        assert main([*argv, "--job.dump_folder", str(dump)]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert not dump.exists()
        return err

    return run


@pytest.mark.parametrize(
    "argv, world, needles",
    [
        (  # EP on a dense model
            ["--model.name", "qwen3", "--model.flavor", "debugmodel", f"{P}expert_parallel_degree", "2"],
            2,
            ["parallelism.expert_parallel_degree=2", "needs an MoE model"],
        ),
        (
            [f"{P}expert_parallel_degree", "2"],  # llama3 debugmodel, the default
            2,
            ["parallelism.expert_parallel_degree=2", "needs an MoE model"],
        ),
        (  # 8 experts do not split over 3 ranks
            [*MOE, f"{P}expert_parallel_degree", "3"],
            3,
            ["parallelism.expert_parallel_degree=3", "num_experts=8"],
        ),
        (  # more than dp_shard x cp x tp
            [*MOE, f"{P}expert_parallel_degree", "4", f"{P}data_parallel_replicate_degree", "2"],
            4,
            ["parallelism.expert_parallel_degree=4", "= 2 x 1 x 1 = 2"],
        ),
        (  # not a multiple of cp x tp
            [*MOE, f"{P}expert_parallel_degree", "2", f"{P}tensor_parallel_degree", "4"],
            4,
            ["parallelism.expert_parallel_degree=2", "tensor_parallel_degree = 1 x 4 = 4"],
        ),
        (  # TP without EP: routed experts are never tensor-parallel
            [*MOE, f"{P}tensor_parallel_degree", "2"],
            2,
            ["parallelism.tensor_parallel_degree=2", "expert_parallel_degree > 1"],
        ),
        (
            [*MOE, f"{P}expert_parallel_degree", "2", f"{P}expert_tensor_parallel_degree", "2"],
            2,
            ["parallelism.expert_tensor_parallel_degree=2", "only 1"],
        ),
    ],
)  # fmt: skip
def test_impossible_expert_parallel_layouts_are_refused(refuse, argv, world, needles):
    err = refuse(argv, world)
    assert all(n in err for n in needles), err


# ---- token dispatch on its own (GroupedExperts, no model) -----------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_dispatch_and_combine_match_one_device(nproc):
    worker = REPO / "tests" / "dist_scripts" / "ep_dispatch_check.py"
    proc = torchrun(nproc, [str(worker)], timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.distributed
def test_shared_experts_and_router_under_tp_and_ep_match_one_device():
    worker = REPO / "tests" / "dist_scripts" / "moe_tp_ep_check.py"
    proc = torchrun(4, [str(worker)], timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


# ---- the parity matrix ------------------------------------------------------------------------

STEPS = ["--training.steps", "6"]
FLAVOR = "debugmodel_moe"
NOAUX = "debugmodel_moe_noaux"  # pipeline layouts: each stage pools only its own layers
LAYOUTS = {
    "ep2-fsdp2": [f"{P}expert_parallel_degree", "2", "--training.local_batch_size", "2"],
    "ep4": [f"{P}expert_parallel_degree", "4", "--training.local_batch_size", "2"],
    "ep2-tp2": [
        f"{P}expert_parallel_degree", "2", f"{P}tensor_parallel_degree", "2",
        "--training.local_batch_size", "4",
    ],
    "pp2-ep2": [
        f"{P}pipeline_parallel_degree", "2", f"{P}expert_parallel_degree", "2",
        "--training.local_batch_size", "4", f"{P}pipeline_parallel_microbatch_size", "2",
        "--model.flavor", NOAUX,
    ],
    "ep2-cp2": [
        f"{P}expert_parallel_degree", "2", f"{P}context_parallel_degree", "2",
        "--training.local_batch_size", "4",
    ],
    # The experts as a loop over experts under EP, against grouped_mm in one process.
    "ep2-fsdp2-loop": [
        f"{P}expert_parallel_degree", "2", "--training.local_batch_size", "2",
        "--model.flavor", f"{FLAVOR}_loop",
    ],
    "ep2-hsdp2": [
        f"{P}expert_parallel_degree", "2", f"{P}data_parallel_replicate_degree", "2",
        "--training.local_batch_size", "2",
    ],
    "ep2-fsdp2-ac-full": [
        f"{P}expert_parallel_degree", "2", "--training.local_batch_size", "2",
        "--activation_checkpoint.mode", "full",
    ],
    "ep2-fsdp2-ac-op": [
        f"{P}expert_parallel_degree", "2", "--training.local_batch_size", "2",
        "--activation_checkpoint.mode", "selective",
        "--activation_checkpoint.selective_ac_option", "op",
    ],
}  # fmt: skip


def torchrun(nproc: int, argv: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``argv`` (a script and its arguments) under torchrun, or plain python for one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2", "PYTHONUNBUFFERED": "1"}
    if nproc > 1:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc),
        ]  # fmt: skip
    else:
        launcher = [sys.executable]
    return subprocess.run(
        launcher + argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def train(dump, extra: list[str], nproc: int) -> list[dict]:
    """6 steps of ``FLAVOR`` (or the flavor ``extra`` names), global batch 8, on ``nproc``."""
    args = [
        *FAST, *STEPS, "--model.name", "qwen3", "--model.flavor", FLAVOR,
        "--training.global_batch_size", "8", *extra, "--job.dump_folder", str(dump),
    ]  # fmt: skip
    proc = torchrun(nproc, [str(VARIANT), *args])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_metrics(dump)


@pytest.fixture(scope="module")
def moe_references(tmp_path_factory) -> dict[str, list[dict]]:
    """The single-process runs the layouts are compared with, by flavor."""
    references = {}
    for flavor in (FLAVOR, NOAUX):
        dump = tmp_path_factory.mktemp(f"moe-reference-{flavor}")
        metrics = train(dump, ["--training.local_batch_size", "8", "--model.flavor", flavor], 1)
        assert len(metrics) == 6
        assert all(m["moe_load_max_over_mean"] > 1.0 for m in metrics)  # routing is uneven
        references[flavor] = metrics
    assert references[FLAVOR][1]["loss"] != references[NOAUX][1]["loss"]  # the aux loss acts
    return references


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("extra", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_moe_layout_matches_single_process(tmp_path, moe_references, extra):
    metrics = train(tmp_path, extra, 4)
    reference = moe_references[NOAUX if NOAUX in extra else FLAVOR]
    keys = ["loss", "grad_norm", "moe_load_max_over_mean"]
    keys += [] if NOAUX in extra else ["aux_loss"]  # under PP: the mean of per-stage values
    for key in keys:
        got, want = [m[key] for m in metrics], [m[key] for m in reference]
        assert got == pytest.approx(want, rel=1e-5, abs=0), key


@pytest.mark.distributed
@pytest.mark.slow
def test_compiled_moe_blocks_under_ep_match_single_process(tmp_path, moe_references):
    """Per-block compile (MoE blocks with graph breaks, their experts eager) under EP 2 over
    FSDP 2, on 2 ranks (each rank compiles: 4 would double the compile time on a 2-core CI
    machine; TP under compile runs in the llama3 parity matrix)."""
    ep = [f"{P}expert_parallel_degree", "2", "--training.local_batch_size", "4"]
    metrics = train(tmp_path, [*ep, "--compile.enable"], 2)
    for key in ("loss", "grad_norm", "moe_load_max_over_mean", "aux_loss"):
        got, want = [m[key] for m in metrics], [m[key] for m in moe_references[FLAVOR]]
        assert got == pytest.approx(want, rel=1e-5, abs=0), key


def test_the_parity_variants_differ_from_debugmodel_moe_in_one_field_each():
    import dataclasses
    import runpy

    variants = runpy.run_path(str(VARIANT))["variants"]()  # registers nothing here
    base = QWEN3_FLAVORS[FLAVOR]
    assert NOAUX not in QWEN3_FLAVORS and base.moe.aux_loss_coef > 0
    assert variants[NOAUX].moe.aux_loss_coef == 0
    assert dataclasses.replace(variants[NOAUX], moe=base.moe) == base
    assert variants[f"{FLAVOR}_loop"].moe.use_grouped_mm is False
    assert dataclasses.replace(variants[f"{FLAVOR}_loop"], moe=base.moe) == base


@pytest.mark.distributed
@pytest.mark.slow
def test_the_aux_loss_reaches_the_gradients_under_pipeline_parallel(tmp_path, moe_references):
    """Each stage attaches its own layers' aux loss to its output: PP 2 with the aux loss on
    trains differently from the same layout without it (which equals one process, above)."""
    pp = [f"{P}pipeline_parallel_degree", "2", "--training.local_batch_size", "8"]
    pp += [f"{P}pipeline_parallel_microbatch_size", "2"]
    metrics = train(tmp_path, pp, 2)
    noaux = moe_references[NOAUX]
    assert metrics[0]["loss"] == pytest.approx(noaux[0]["loss"], rel=1e-5)  # same start
    # NOTE: at coef 1e-3 the term moves step 1's gradient norm by ~1e-7 relative (about one
    # float32 ulp, as in one process); its effect on the weights shows in the later losses,
    # which the parity runs reproduce to ~1e-8.
    later = [(m["loss"], n["loss"]) for m, n in zip(metrics[2:], noaux[2:], strict=True)]
    assert all(abs(a - b) > 2e-6 * b for a, b in later), later
    assert 1.9 < metrics[0]["aux_loss"] < 8.0


@pytest.mark.distributed
@pytest.mark.slow
def test_an_ep_checkpoint_resumes_in_one_process_and_in_its_layout(tmp_path, moe_references):
    """The experts are saved as DTensors sharded over (dp_shard_mod_ep, ep); DCP reshards them
    into one process, which continues the EP 2 x FSDP 2 run as one process would have; resumed
    in EP 2 x FSDP 2 again it continues bit for bit."""
    ep, one, again = tmp_path / "ep", tmp_path / "one", tmp_path / "again"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "3"]
    layout = [f"{P}expert_parallel_degree", "2", "--training.local_batch_size", "2", *ckpt]
    full = train(ep, layout, 4)
    shutil.copytree(ep / "checkpoint" / "step-3", one / "checkpoint" / "step-3")
    resumed = train(one, ["--training.local_batch_size", "8", *ckpt], 1)
    assert [m["step"] for m in resumed] == [4, 5, 6]
    want = [m["loss"] for m in moe_references[FLAVOR][3:]]
    assert [m["loss"] for m in resumed] == pytest.approx(want, rel=1e-5, abs=0)
    # and in the same layout, exactly
    shutil.copytree(ep / "checkpoint" / "step-3", again / "checkpoint" / "step-3")
    same = train(again, layout, 4)
    assert [m["loss"] for m in same] == [m["loss"] for m in full[3:]]
