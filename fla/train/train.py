"""The training loop: ``python -m fla.train.train <flame flags>`` or ``torchrun ... -m fla.train.train <flags>``.

Steps (flame's, on PyTorch's own distributed engine):

1. parse the job (:func:`fla.train.config.parse_job_config`); bad flags exit with status 2 and one message;
2. with ``WORLD_SIZE > 1`` initialise the process group (NCCL on CUDA, gloo on CPU) and a device mesh
   ``(data_parallel_replicate_degree, data_parallel_shard_degree)``; seed every RNG with ``training.seed``;
3. tokenizer (``model.tokenizer_path``; the shipped ``assets/tokenizer`` when the path is ``default``/empty), model
   config (``model.config``; ``vocab_size`` raised to the tokenizer's size), the model built on the meta device;
   optional per-block activation checkpointing and ``torch.compile``; FSDP2 ``fully_shard`` per block then on the
   root when distributed (bf16 parameters / fp32 reductions on CUDA, fp32 on CPU; a 2-D mesh gives HSDP);
   ``to_empty`` then ``post_init`` initialise every parameter and buffer (GDN ``A_log`` / ``dt_bias``, rotary
   ``inv_freq``); single-device CUDA runs use bf16 autocast;
4. AdamW (``no_weight_decay_names`` taken before sharding), the warm-up/decay scheduler, the packed data loader
   sharded by data-parallel rank;
5. resume from ``<dump>/<checkpoint.folder>/step-N`` (``checkpoint.load_step``: -1 the latest) when checkpoints are
   enabled;
6. ``training.steps`` optimizer steps of ``gradient_accumulation_steps`` micro-batches (each micro-loss divided by
   that number), ``clip_grad_norm_(max_norm)``, ``skip_nan_inf`` (a non-finite norm skips the update; the scheduler
   still steps), console metrics every ``metrics.log_freq`` steps, DCP checkpoints every ``checkpoint.interval``
   steps and at the last step;
7. the HuggingFace export ``<dump>/hf`` (config, safetensors, tokenizer), written by rank 0 from the gathered
   state dict; the resolved job TOML is saved as ``<dump>/job_config.toml`` and the model config as
   ``<dump>/config.json``.

Not implemented (accepted and ignored with a warning when set): profiling traces, W&B, tensor / context /
pipeline parallelism, float8, async checkpointing, interval_type ``seconds``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist

from fla.train.config import ConfigError, JobConfig, parse_job_config

__all__ = ["main", "train", "export_hf"]

EXIT_CONFIG_ERROR = 2


def _log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(f"[fla.train] {msg}", flush=True)


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _dp_degrees(cfg: JobConfig, world: int) -> tuple[int, int]:
    rep = cfg.training.data_parallel_replicate_degree
    shard = cfg.training.data_parallel_shard_degree
    if shard == -1:
        if world % rep:
            raise ConfigError(f"--training.data_parallel_replicate_degree={rep} does not divide the world size {world}")
        shard = world // rep
    if rep * shard != world:
        raise ConfigError(f"--training.data_parallel_replicate_degree={rep} x --training.data_parallel_shard_degree="
                          f"{shard} must equal the number of processes ({world})")
    for sec, name, ok in (("training", "tensor_parallel_degree", cfg.training.tensor_parallel_degree == 1),
                          ("experimental", "pipeline_parallel_degree", cfg.experimental.pipeline_parallel_degree == 1),
                          ("experimental", "context_parallel_degree", cfg.experimental.context_parallel_degree == 1)):
        if not ok:
            raise ConfigError(f"--{sec}.{name}={getattr(getattr(cfg, sec), name)}: only data parallelism (FSDP2 / "
                              f"HSDP) is supported; use 1")
    return rep, shard


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _tokenizer_path(path: str) -> str:
    from fla.train.data import DEFAULT_TOKENIZER

    return str(DEFAULT_TOKENIZER) if path in ("", "default", None) else path


def _model_config(cfg: JobConfig, tokenizer):
    import fla  # noqa: F401 - registers the model families
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.model.config, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--model.config={cfg.model.config!r} could not be loaded: {e}") from e
    vocab = max(len(tokenizer), config.vocab_size)
    if vocab != config.vocab_size:
        config.vocab_size = vocab
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


def _apply_activation_checkpointing(model, cfg: JobConfig) -> None:
    mode = cfg.activation_checkpoint.mode
    if mode == "none":
        return
    layers = list(model.model.layers)
    if mode == "full":
        chosen = layers
    else:
        opt = cfg.activation_checkpoint.selective_ac_option
        if not opt.isdigit() or int(opt) < 1:
            warnings.warn(f"activation_checkpoint.selective_ac_option={opt!r} (op-level) is not supported; "
                          "checkpointing every block", stacklevel=2)
            chosen = layers
        else:
            chosen = layers[:: int(opt)]
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for layer in chosen:  # FLABlock is a transformers GradientCheckpointingLayer: parameter names are unchanged
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


def _build_model(cfg: JobConfig, config, device: torch.device, mesh) -> tuple[Any, set]:
    from transformers import AutoModelForCausalLM

    from fla.train.optim import no_weight_decay_names

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    no_decay = no_weight_decay_names(model)
    _apply_activation_checkpointing(model, cfg)
    if cfg.training.compile:
        for layer in model.model.layers:
            layer.compile()
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.training.mixed_precision_param),
                                      reduce_dtype=getattr(torch, cfg.training.mixed_precision_reduce))
        else:
            mp = MixedPrecisionPolicy()  # fp32 on CPU (gloo has no bf16 reductions worth having)
        policy = cfg.training.fsdp_reshard_after_forward
        layers = list(model.model.layers)
        for i, layer in enumerate(layers):
            reshard = {"always": True, "never": False}.get(policy, i < len(layers) - 1)
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=policy == "always")
    model.to_empty(device=device)
    for module in model.modules():  # the meta build marked everything initialised; initialise for real now
        module._is_hf_initialized = False
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        if mesh is not None and device.type != "cuda":
            # DTensor has no offset-based RNG on CPU meshes: every rank would draw its local shard from the same
            # stream (identical shards). Give each shard position its own stream; replicas of a shard stay equal.
            warnings.filterwarnings("ignore", message=".*DTensor random operators.*")
            torch.manual_seed(cfg.training.seed + 1_000_003 * mesh.get_local_rank("dp_shard"))
        with torch.no_grad():
            model.post_init()
    model.train()
    return model, no_decay


def export_hf(model, config, tokenizer, out_dir: str, dtype: torch.dtype = torch.float32, rank: int = 0) -> None:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files) from a possibly sharded model.
    Collective under FSDP: every rank calls it; rank 0 writes."""
    from transformers import AutoModelForCausalLM

    from fla.train.checkpoint import full_model_state_dict

    state = full_model_state_dict(model)
    if rank == 0:
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config)
        hf.to_empty(device="cpu")
        for module in hf.modules():
            module._is_hf_initialized = False
        with torch.no_grad():
            hf.post_init()  # buffers (rotary inv_freq); every parameter is overwritten below
        missing, unexpected = hf.load_state_dict(state, strict=False)
        tied = {k for k in missing if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"HF export: missing keys {sorted(set(missing) - tied)}, unexpected {unexpected}")
        hf.to(dtype)
        os.makedirs(out_dir, exist_ok=True)
        hf.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    if dist.is_initialized():
        dist.barrier()


def _peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one accelerator (None when unknown, e.g. on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("A10", 125e12)):
        if key in name:
            return flops
    return None


def _warn_unsupported(cfg: JobConfig, rank: int) -> None:
    notes = []
    if cfg.profiling.enable_profiling:
        notes.append("profiling.enable_profiling (no traces are written)")
    if cfg.checkpoint.async_mode != "disabled":
        notes.append(f"checkpoint.async_mode={cfg.checkpoint.async_mode} (saving synchronously)")
    if cfg.checkpoint.interval_type != "steps":
        notes.append("checkpoint.interval_type=seconds (treated as steps)")
    if cfg.model.converters:
        notes.append(f"model.converters={cfg.model.converters}")
    for n in notes:
        _log(f"warning: ignored: {n}", rank)


# the LTE metrics shown on the console line (all of them go to TensorBoard)
LTE_CONSOLE_METRICS = ("lte/overall_sparsity", "lte/l1_loss", "lte/overall_l1_lambda")


def _lte_controller(model, config, cfg: JobConfig):
    """The L1 sparsity controller (``fla.models.lte_controller``) of a model with LTE layers, else None."""
    attn = getattr(config, "attn", None)
    if not attn or attn.get("attn_type") != "lte":
        return None
    from fla.models.lte_controller import LTESparsityController

    return LTESparsityController(model, attn, cfg.training.seq_len)


def train(cfg: JobConfig) -> dict:
    """Run the job; returns ``{"losses": {step: loss}, "step": last step}`` (rank 0's view)."""
    from transformers import AutoTokenizer

    from fla.train import checkpoint as ckpt
    from fla.train.data import build_dataloader
    from fla.train.metrics import MetricsLogger, start_wandb
    from fla.train.optim import build_lr_scheduler, build_optimizer

    world = int(os.environ.get("WORLD_SIZE", 1))
    rep, shard = _dp_degrees(cfg, world)
    device = _device()
    mesh = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        from torch.distributed.device_mesh import init_device_mesh

        if rep > 1:  # HSDP (shard > 1) or pure replication (shard == 1): fully_shard on a 2-D mesh
            mesh = init_device_mesh(device.type, (rep, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
        else:
            mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
    rank = dist.get_rank() if dist.is_initialized() else 0
    dp_rank, dp_world = rank, world
    _warn_unsupported(cfg, rank)
    dump = cfg.job.dump_folder
    os.makedirs(dump, exist_ok=True)
    if cfg.job.print_args:
        _log("job config:\n" + cfg.to_toml(), rank)
    _seed(cfg.training.seed)
    if cfg.training.deterministic:
        torch.use_deterministic_algorithms(True)

    tok_path = _tokenizer_path(cfg.model.tokenizer_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=True, model_max_length=int(1e10))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--model.tokenizer_path={cfg.model.tokenizer_path!r} could not be loaded: {e}") from e
    config = _model_config(cfg, tokenizer)
    if rank == 0:
        cfg.save_toml(os.path.join(dump, "job_config.toml"))
        config.save_pretrained(dump)

    model, no_decay = _build_model(cfg, config, device, mesh)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model {config.model_type}: {n_params:,} parameters; world {world} (replicate {rep} x shard {shard}); "
         f"device {device.type}", rank)
    opt_cfg = cfg.optimizer
    if opt_cfg.implementation == "fused" and device.type != "cuda":
        opt_cfg = dataclasses.replace(opt_cfg, implementation="foreach")  # fused AdamW is CUDA-only
    optimizer = build_optimizer(model, opt_cfg, no_decay)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.training.steps)
    loader = build_dataloader(cfg.training, tokenizer, dp_rank, dp_world)

    ck_root = os.path.join(dump, cfg.checkpoint.folder)
    step, skipped, tokens_seen = 0, 0, 0
    if cfg.checkpoint.create_seed_checkpoint:
        if world > 1:
            raise ConfigError("--checkpoint.create_seed_checkpoint must run in a single process")
        ckpt.save_checkpoint(ckpt.checkpoint_dir(dump, cfg.checkpoint.folder, 0), model, weights_only=True)
        _log(f"seed checkpoint written to {ck_root}/step-0", rank)
        return {"losses": {}, "step": 0}
    if cfg.checkpoint.enable_checkpoint:
        load = ckpt.find_step(ck_root, cfg.checkpoint.load_step)
        if load is not None:
            state = ckpt.load_checkpoint(ckpt.checkpoint_dir(dump, cfg.checkpoint.folder, load), model, optimizer,
                                         scheduler, loader, tuple(cfg.checkpoint.exclude_from_loading))
            step = int(state.get("step", 0))
            skipped = int(state.get("skipped_steps", 0))
            tokens_seen = int(state.get("tokens", 0))
            _log(f"resumed from {ck_root}/step-{load} (step {step})", rank)

    controller = _lte_controller(model, config, cfg)
    if controller is not None:  # after the checkpoint load: lambda and num_kept come from it on resume
        controller.initialize(step)
    accum = cfg.training.gradient_accumulation_steps
    total = cfg.training.steps
    tb_dir = os.path.join(dump, cfg.metrics.save_tb_folder) if cfg.metrics.enable_tensorboard else None
    # MFU: 6 FLOPs per parameter per token (forward + backward, embeddings excluded) against the devices' peak
    n_embed = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    flops_per_token = 6 * (n_params - n_embed)
    peak = _peak_flops(device)
    wandb_run = start_wandb(dump, json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), rank) \
        if cfg.metrics.enable_wandb else None
    logger = MetricsLogger(total, step, device, rank, tb_dir, wandb_run=wandb_run, flops_per_token=flops_per_token,
                           peak_flops=peak * world if peak else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and mesh is None and cfg.training.mixed_precision_param == "bfloat16"
                else contextlib.nullcontext())
    fsdp = mesh is not None
    losses: dict[int, float] = {}
    data_iter = iter(loader)
    if step >= total:
        _log(f"nothing to train: step {step} >= --training.steps {total}", rank)
    while step < total:
        step += 1
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.prepare_step(step)
        loss_sum = torch.zeros((), device=device)
        n_tok = 0
        for micro in range(accum):
            batch = next(data_iter)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if fsdp:
                model.set_requires_gradient_sync(micro == accum - 1)
            with autocast:
                out = model(input_ids=batch["input_ids"], labels=batch["labels"],
                            cu_seqlens=batch.get("cu_seqlens"))
            loss = out.loss.float()
            loss_sum += loss.detach() / accum  # the LM loss is what is logged; the L1 term is an LTE metric
            if controller is not None:
                loss = loss + controller.loss(out.routing_stats)
            (loss / accum).backward()
            n_tok += batch["input_ids"].numel()
        if controller is not None:  # the lambda update, before clipping (as the reference)
            controller.update(step, batch["input_ids"].shape[1])
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.max_norm, foreach=True)
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        gnorm = float(gnorm)
        if cfg.training.skip_nan_inf and not math.isfinite(gnorm):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            _log(f"step {step}: grad norm {gnorm}, update skipped ({skipped} so far)", rank)
        else:
            optimizer.step()
        lr = scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # a skipped first update makes torch warn about the call order
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step.*")
            scheduler.step()
        if dist.is_initialized():
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            loss_sum /= world
        tokens_seen += n_tok * world
        logger.add_tokens(n_tok * world)
        loss_val = float(loss_sum)
        losses[step] = loss_val
        if step % cfg.metrics.log_freq == 0 or step == total or step == 1:
            extra = controller.metrics(step) if controller is not None else {}
            logger.log(step, loss_val, lr, gnorm, {k: v for k, v in extra.items() if k in LTE_CONSOLE_METRICS})
            logger.scalars(step, extra)
        if cfg.checkpoint.enable_checkpoint and (step % cfg.checkpoint.interval == 0 or step == total):
            path = ckpt.checkpoint_dir(dump, cfg.checkpoint.folder, step)
            weights_only = step == total and cfg.checkpoint.model_weights_only
            ckpt.save_checkpoint(path, model, optimizer, scheduler,
                                 {"step": step, "skipped_steps": skipped, "tokens": tokens_seen},
                                 loader, weights_only=weights_only,
                                 export_dtype=getattr(torch, cfg.checkpoint.export_dtype) if weights_only else None)
            if rank == 0:
                ckpt.prune_checkpoints(ck_root, cfg.checkpoint.keep_latest_k)
            _log(f"checkpoint saved: {path}", rank)
        if cfg.training.gc_freq > 0 and step % cfg.training.gc_freq == 0:
            import gc

            gc.collect()
    logger.close()
    hf_dir = os.path.join(dump, "hf")
    export_hf(model, config, tokenizer, hf_dir, getattr(torch, cfg.checkpoint.export_dtype), rank)
    _log(f"HuggingFace model exported to {hf_dir}", rank)
    if rank == 0:
        path = os.path.join(dump, "losses.json")  # per-step losses, merged across resumed runs
        merged = {}
        if os.path.isfile(path):
            with open(path) as f:
                merged = {int(k): v for k, v in json.load(f).items()}
        merged.update(losses)
        with open(path, "w") as f:
            json.dump({str(k): merged[k] for k in sorted(merged)}, f)
    return {"losses": losses, "step": step}


def main(argv: Optional[list[str]] = None) -> int:
    from fla.train.data import DataConfigError

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_job_config(argv)
        train(cfg)
    except (ConfigError, DataConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
