"""What a person can get wrong, checked before any process group, model or write.

:class:`InputChecks` is the first part of :class:`~titan_core.trainer.Trainer`: ``check_inputs``
resolves the model, layout, tokenizer, data and checkpoint sources from the config and refuses
bad input in one line (exit 2) while nothing has been started or written yet.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from titan_core.checkpoint import LOADABLE_PARTS, check_initial_source, resume_candidates
from titan_core.checkpoint_safety import check_resume_source
from titan_core.config import JobConfig
from titan_core.data import Tokenizer, load_tokenizer
from titan_core.data.tokenizer import EMBEDDED
from titan_core.determinism import apply_moe_debug, resolve_debug
from titan_core.distributed import Runtime
from titan_core.errors import UserError
from titan_core.hf import flavor_name
from titan_core.hf_load import check_hf_source, hf_model_args
from titan_core.metrics import check_metrics_sinks
from titan_core.optim import check_optimizer, validate_lr_scheduler
from titan_core.parallel import ParallelDims, check_supported, validate_layout
from titan_core.precision import param_and_reduce_dtypes
from titan_core.preflight import (
    architecture_positions,
    flavor_args,
    training_args,
    validate_training,
)
from titan_core.profiling import check_profiling
from titan_core.quantize import build_converters, warn_unused_sections
from titan_core.run_folder import check_dump_folder
from titan_core.train_spec import get_train_spec
from titan_core.validate import build_validator

logger = logging.getLogger("titan")


class InputChecks:
    """The trainer's checks of its config and inputs; they set what later steps build on
    (``spec``, ``model_args``, ``dims``, ``tokenizer``, ``loader``, ``resume_steps``, ...)."""

    config: JobConfig
    runtime: Runtime

    def check_inputs(self) -> None:
        """Everything a person can get wrong, checked before any process group or model."""
        c = self.config
        resolve_debug(c)  # [debug] -> [training]: the rest reads training.seed/deterministic
        check_profiling(c.profiling)
        self.dump = check_dump_folder(c.job.dump_folder)
        self.spec = get_train_spec(c.model.name)
        self.resolve_model()
        self.dims = ParallelDims.from_config(c.parallelism, self.runtime.world_size)
        check_supported(self.dims)
        validate_layout(self.dims, c, self.model_args)
        self.global_batch_size = validate_training(c, self.dims)
        check_optimizer(c.optimizer)
        validate_lr_scheduler(c.lr_scheduler, c.training.steps)
        check_metrics_sinks(c.metrics, self.runtime.is_main)
        self.converters = build_converters(c, self.runtime.device)
        if self.runtime.is_main:
            warn_unused_sections(c)
        if self.dims.pp > 1:
            self.check_pipeline()
        self.resume_steps: list[int] = []
        if c.checkpoint.create_seed_checkpoint:
            c.checkpoint.enable = True
        if c.checkpoint.enable:
            folder = Path(c.job.dump_folder) / c.checkpoint.folder
            self.resume_steps = resume_candidates(folder, c.checkpoint.load_step)
            if c.checkpoint.create_seed_checkpoint and self.resume_steps:
                raise UserError(
                    f"checkpoint.create_seed_checkpoint: {folder} already holds checkpoints "
                    f"(steps {sorted(self.resume_steps)}); use an empty job.dump_folder"
                )
            # Another model's checkpoint, or one holding code, is refused before the dump
            # folder is touched.
            check_resume_source(
                folder, self.resume_steps, self.spec, self.model_args, c.model.name, c.model.flavor
            )
        self.check_checkpoint_keys()
        self.param_dtype, _ = param_and_reduce_dtypes(c.training, self.runtime.device.type)
        # Opening the data checks the path and format now, before any process group.
        self.loader = self.build_loader()
        self.validator = build_validator(c, self.dims, self.runtime.rank, self.tokenizer)

    def check_checkpoint_keys(self) -> None:
        """The [checkpoint] keys that name modes, parts and paths."""
        ck = self.config.checkpoint
        if ck.async_mode == "async_with_pinned_mem" and self.runtime.device.type != "cuda":
            raise UserError(
                "checkpoint.async_mode=async_with_pinned_mem needs CUDA (pinned host memory "
                "for device-to-host copies); on CPU use --checkpoint.async_mode async"
            )
        unknown = sorted(set(ck.exclude_from_loading) - set(LOADABLE_PARTS))
        if unknown:
            raise UserError(
                f"checkpoint.exclude_from_loading: unknown {unknown}; choose from "
                f"{', '.join(LOADABLE_PARTS)}"
            )
        if ck.last_save_in_hf and self.spec.state_dict_adapter is None:
            raise UserError(
                f"checkpoint.last_save_in_hf: model {self.spec.name} has no Hugging Face "
                "adapter; its package does not support HF weights"
            )
        if ck.initial_load_path and not self.resume_steps:
            source = Path(ck.initial_load_path)
            if not source.exists():
                raise UserError(f"checkpoint.initial_load_path: {source} does not exist")
            if ck.initial_load_in_hf:
                check_hf_source(self.spec, self.model_args, source)
            else:
                m = self.config.model
                check_initial_source(self.spec, self.model_args, source, m.name, m.flavor)

    def resolve_model(self) -> None:
        """The model args (``model_args``: RoPE table sized for training; ``max_positions``:
        the positions the architecture handles, recorded in checkpoints) and the tokenizer,
        whose vocabulary the model's grows to."""
        c = self.config
        args = flavor_args(self.spec, c)  # an unknown flavor is refused even with HF weights
        if c.checkpoint.initial_load_in_hf:
            args = self.hf_model_args()
            self.use_hf_tokenizer(args)
        build_tokenizer = self.spec.build_tokenizer_fn or load_tokenizer
        self.tokenizer: Tokenizer = build_tokenizer(c.model.hf_assets_path)
        args = self.fit_vocabulary(args)
        self.max_positions = architecture_positions(args, c.training.seq_len)
        self.model_args = apply_moe_debug(training_args(args, c.training.seq_len), c)

    def use_hf_tokenizer(self, args: Any) -> None:
        """Starting from HF weights with no ``model.hf_assets_path``: the HF folder's own
        tokenizer, never the embedded one (whose ids name other tokens to those weights)."""
        c = self.config
        if c.model.hf_assets_path:
            return
        folder = Path(c.checkpoint.initial_load_path)
        if not (folder / "tokenizer.json").is_file():
            check_hf_source(self.spec, args, folder)  # a damaged or hostile folder is named first
            raise UserError(
                f"model.hf_assets_path: not set, and the Hugging Face folder {folder} "
                "(checkpoint.initial_load_path) has no tokenizer.json; pass "
                "--model.hf_assets_path with the folder of the tokenizer these weights were "
                f"trained with (or '{EMBEDDED}' for titan's embedded tokenizer)"
            )
        c.model.hf_assets_path = str(folder)
        logger.info("model.hf_assets_path: using the tokenizer of %s", folder)

    def fit_vocabulary(self, args: Any) -> Any:
        """``args`` with the vocabulary of a larger tokenizer (as torchtitan does); Hugging
        Face weights have a fixed vocabulary, so a tokenizer larger than theirs is refused."""
        c = self.config
        vocab, tokens = getattr(args, "vocab_size", None), self.tokenizer.vocab_size
        if vocab is None or tokens <= vocab:
            return args
        source = c.model.hf_assets_path or EMBEDDED
        if c.checkpoint.initial_load_in_hf:
            raise UserError(
                f"model.hf_assets_path: the tokenizer of {source} has {tokens} tokens but the "
                f"Hugging Face weights in {c.checkpoint.initial_load_path} have vocab_size "
                f"{vocab}; use the tokenizer they were trained with (leave "
                "model.hf_assets_path empty for the folder's own)"
            )
        logger.info(
            "model vocab_size %d -> %d: the tokenizer of model.hf_assets_path (%s) has %d tokens",
            vocab, tokens, source, tokens,
        )  # fmt: skip
        return dataclasses.replace(args, vocab_size=tokens)

    def hf_model_args(self) -> Any:
        """With ``initial_load_in_hf``, the model is the one the HF folder's config.json
        describes (any size, not only the named flavors)."""
        c = self.config
        if not c.checkpoint.initial_load_path:
            raise UserError(
                "checkpoint.initial_load_in_hf: set checkpoint.initial_load_path to the Hugging "
                "Face folder to load"
            )
        if self.spec.state_dict_adapter is None:
            raise UserError(
                f"checkpoint.initial_load_in_hf: model {self.spec.name} has no Hugging Face "
                "adapter; its package does not support HF weights"
            )
        folder = Path(c.checkpoint.initial_load_path)
        if not folder.is_dir():
            raise UserError(f"checkpoint.initial_load_path: {folder} is not a folder")
        args = hf_model_args(self.spec, folder)
        if flavor_name(self.spec, args) != c.model.flavor:
            logger.info("model args from %s/config.json (not flavor %s's)", folder, c.model.flavor)
        return args

    def check_pipeline(self) -> None:
        """Schedule name, layer split and microbatch count, before any process starts work."""
        from titan_core.parallel.pipeline import (
            layer_split,
            microbatch_count,
            schedule_class,
            stages_per_rank,
        )

        p = self.config.parallelism
        if self.spec.pipelining_fn is None:
            raise UserError(
                f"parallelism.pipeline_parallel_degree={self.dims.pp}: model "
                f"'{self.spec.name}' does not support pipeline parallel; leave it at 1"
            )
        schedule_class(p.pipeline_parallel_schedule)
        per_rank = stages_per_rank(p.pipeline_parallel_schedule)
        layer_split(
            self.model_args.n_layers,
            self.dims.pp * per_rank,
            p.pipeline_parallel_layers_per_stage,
            stages_per_rank=per_rank,
        )
        microbatch_count(
            p.pipeline_parallel_schedule,
            self.dims.pp,
            self.config.training.local_batch_size,
            p.pipeline_parallel_microbatch_size,
        )
