"""Console (and optional TensorBoard) metrics of the trainer.

One line per ``metrics.log_freq`` steps on rank 0::

    step 40/300 | loss 6.1234 | lr 2.9e-04 | gnorm 1.234 | tok/s 12,345 | mem 1.23GiB | eta 00:01:23

Extra metrics (the LTE controller's) follow as `` | name value``, floats with 4 significant digits (a lambda of 1e-09
stays 1e-09). ``tok/s`` counts the tokens of all data-parallel ranks since the previous line; on GPUs with a known
peak an ``mfu`` (percent, 6 FLOPs per non-embedding parameter per token) is appended; ``mem`` is the peak CUDA memory
allocated (CPU runs: the process's peak resident set size); ``eta`` extrapolates the mean step time since the start
of this run (resumed runs count from the resume).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch

__all__ = ["MetricsLogger", "format_eta", "peak_memory_gib", "start_wandb"]


def format_eta(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return kib / 2**20
    except Exception:  # noqa: BLE001
        return float("nan")


def start_wandb(dump_folder: str, config: dict, rank: int = 0):
    """A Weights & Biases run (rank 0) when ``wandb`` is installed, else None with a printed note. The run is named
    after the dump folder and resumes with it; with ``HF_HUB_OFFLINE=1`` and no ``WANDB_MODE`` it logs offline."""
    if rank != 0:
        return None
    try:
        import wandb
    except ImportError:
        print("[fla.train] --metrics.enable_wandb: wandb is not installed; metrics go to the console only", flush=True)
        return None
    mode = os.environ.get("WANDB_MODE") or ("offline" if os.environ.get("HF_HUB_OFFLINE") == "1" else None)
    name = os.path.basename(os.path.normpath(dump_folder))
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "fla"), name=name, id=os.environ.get("WANDB_RUN_ID"),
                      dir=dump_folder, config=config, resume="allow", mode=mode)


class MetricsLogger:
    """Formats and prints the step lines (rank 0 only) and mirrors them to TensorBoard and Weights & Biases when
    asked and available."""

    def __init__(self, total_steps: int, start_step: int, device: torch.device, rank: int = 0,
                 tb_dir: Optional[str] = None, stream=None, flops_per_token: Optional[float] = None,
                 peak_flops: Optional[float] = None, wandb_run=None):
        self.total = total_steps
        self.start_step = start_step
        self.device = device
        self.rank = rank
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()
        self.last_t = self.t0
        self.tokens_since = 0
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.writer = None
        self.wandb = wandb_run
        if tb_dir is not None and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                os.makedirs(tb_dir, exist_ok=True)
                self.writer = SummaryWriter(tb_dir)
            except Exception as e:  # noqa: BLE001 - tensorboard is optional
                self.print(f"TensorBoard disabled ({e})")

    def print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=self.stream, flush=True)

    def add_tokens(self, n: int) -> None:
        self.tokens_since += n

    def log(self, step: int, loss: float, lr: float, gnorm: float, extra: Optional[dict] = None) -> None:
        now = time.perf_counter()
        tps = self.tokens_since / max(now - self.last_t, 1e-9)
        done = step - self.start_step
        eta = (now - self.t0) / max(done, 1) * (self.total - step)
        mem = peak_memory_gib(self.device)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3e} | gnorm {gnorm:.3f} | "
                f"tok/s {tps:,.0f} | mem {mem:.2f}GiB | eta {format_eta(eta)}")
        extra = dict(extra or {})
        if self.flops_per_token and self.peak_flops:
            extra["mfu"] = 100.0 * self.flops_per_token * tps / self.peak_flops
        for k, v in extra.items():
            line += f" | {k} {v:.4g}" if isinstance(v, float) else f" | {k} {v}"
        self.print(line)
        self.scalars(step, {"loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_second": tps,
                            "memory_gib": mem, **extra}, prefix="train/")
        self.last_t = now
        self.tokens_since = 0

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        """Write numeric ``values`` to TensorBoard / W&B only (e.g. the LTE controller's per-layer / per-head
        metrics, too many for the console line)."""
        numeric = {prefix + k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for k, v in numeric.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None and numeric:
            self.wandb.log(numeric, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
