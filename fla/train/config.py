"""Job configuration for the trainer: flame's sections, flags, TOML files and defaults.

The trainer keeps flame's command line. A job is described by a :class:`JobConfig`, one dataclass per flame section
(``[job]``, ``[model]``, ``[optimizer]``, ``[lr_scheduler]``, ``[training]``, ...). Values are resolved with the
precedence

    field defaults  <  the TOML file given by ``--job.config_file``  <  command-line flags

Command-line syntax (as flame's):

- ``--section.field value`` or ``--section.field=value``;
- booleans: ``--training.skip_nan_inf`` alone means true; ``--training.skip_nan_inf false`` / ``=false`` also works
  (true/false, yes/no, on/off, 1/0, any case);
- lists: comma-separated, ``--checkpoint.exclude_from_loading optimizer,lr_scheduler`` (an empty value is ``[]``);
- optional fields take ``none`` / ``null`` for ``None``;
- dashes in the field part are read as underscores (``--training.skip-nan-inf``);
- ``--help`` / ``-h`` prints every flag grouped by section and exits with status 0.

Errors: every unknown section or field (in the TOML or on the command line), unparsable value or value out of range
raises :class:`ConfigError`, a ``ValueError`` whose message names the flag, the value and what is allowed, with a
close-match suggestion for misspelled names. The trainer's entry point turns it into a one-line message and exit
status 2.

Beyond flame, ``[optimizer] weight_decay`` (flame fixes it at 0.1) is a field. ``[training] pin_memory`` /
``persistent_workers`` and ``[checkpoint] interval_type`` appear in flame's own ``fla.toml`` (though not as flags
there), so they are fields here too, so that flame's TOML files load unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "ConfigError",
    "JobConfig",
    "format_help",
    "load_toml",
    "parse_job_config",
]


class ConfigError(ValueError):
    """A bad job configuration: unknown section/field, unparsable or out-of-range value."""


def _f(default: Any, help: str, choices: Optional[tuple] = None) -> Any:
    """A dataclass field with flame's default, a one-line help string and optional allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    config_file: Optional[str] = _f(None, "TOML file loaded as the base configuration")
    dump_folder: str = _f("./torchtitan/outputs", "run folder: checkpoints, logs, TensorBoard, exported model")
    description: str = _f("default job", "free-text description of the job")
    use_for_integration_test: bool = _f(False, "mark this configuration for the integration tests")
    print_args: bool = _f(False, "print the resolved configuration at start")


@dataclass
class Model:
    name: str = _f("fla", "model family name (flame keeps 'fla'; the architecture comes from model.config)")
    config: str = _f(
        "fla-hub/transformer-1.3B-100B", "HF config: JSON file, folder or hub name; model_type picks the model"
    )
    tokenizer_path: str = _f("fla-hub/transformer-1.3B-100B", "tokenizer: local folder or hub name")
    converters: list[str] = _f([], "comma-separated model converters to apply (e.g. float8)")
    print_after_conversion: bool = _f(False, "print the model after converters are applied")


@dataclass
class Profiling:
    enable_profiling: bool = _f(False, "run the torch profiler")
    save_traces_folder: str = _f("profile_traces", "profiler traces folder, inside the dump folder")
    profile_freq: int = _f(10, "collect a profiler trace every N steps")
    enable_memory_snapshot: bool = _f(False, "dump CUDA memory snapshots")
    save_memory_snapshot_folder: str = _f("memory_snapshot", "memory snapshot folder, inside the dump folder")


@dataclass
class Optimizer:
    name: str = _f("AdamW", "optimizer", ("Adam", "AdamW"))
    eps: float = _f(1e-8, "epsilon of Adam/AdamW")
    lr: float = _f(8e-4, "peak learning rate")
    weight_decay: float = _f(0.1, "decoupled weight decay (flame fixes 0.1; here a field)")
    implementation: str = _f("fused", "optimizer implementation (fused is CUDA only)", ("for-loop", "foreach", "fused"))
    early_step_in_backward: bool = _f(False, "step the optimizer inside backward (incompatible with clipping)")


@dataclass
class LRScheduler:
    warmup_steps: int = _f(200, "linear warm-up steps")
    decay_ratio: Optional[float] = _f(
        None, "fraction of steps spent decaying (WSD); None: decay right after warm-up"
    )
    decay_type: str = _f("linear", "decay curve after warm-up", ("linear", "sqrt", "cosine"))
    lr_min: float = _f(0.0, "final learning rate as a ratio of optimizer.lr, in [0, 1]")


@dataclass
class Training:
    batch_size: int = _f(8, "per-device micro-batch size, in sequences (1 with varlen)")
    seq_len: int = _f(2048, "tokens per packed training sample")
    context_len: int = _f(2048, "with varlen: longest document piece, longer documents are split")
    varlen: bool = _f(False, "pack documents into one row with cu_seqlens at document boundaries")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    steps: int = _f(10000, "optimizer steps to train (the scheduler horizon)")
    max_norm: float = _f(1.0, "gradient clipping max norm")
    skip_nan_inf: bool = _f(False, "skip the optimizer step when the gradient norm is NaN/Inf")
    dataset: str = _f("HuggingFaceFW/fineweb-edu", "datasets.load_dataset path(s), comma-separated to interleave")
    dataset_name: Optional[str] = _f(None, "dataset config name(s), comma-separated")
    dataset_split: Optional[str] = _f(None, "dataset split(s), comma-separated")
    data_dir: Optional[str] = _f(None, "dataset data_dir(s), comma-separated")
    data_files: Optional[str] = _f(None, "dataset data_files, comma-separated")
    data_probs: Optional[str] = _f(None, "sampling probabilities of interleaved datasets, comma-separated")
    streaming: bool = _f(False, "stream the dataset instead of preparing it locally")
    num_workers: int = _f(32, "DataLoader worker processes (0: load in the main process)")
    prefetch_factor: int = _f(2, "batches prefetched per worker")
    pin_memory: bool = _f(False, "DataLoader pin_memory")
    persistent_workers: bool = _f(False, "DataLoader persistent_workers")
    data_parallel_replicate_degree: int = _f(1, "replicate degree (DDP, or HSDP with sharding); 1: off")
    data_parallel_shard_degree: int = _f(-1, "FSDP shard degree; -1: the remaining ranks; 1: off")
    enable_cpu_offload: bool = _f(False, "FSDP CPU offload of parameters, gradients and optimizer state")
    tensor_parallel_degree: int = _f(1, "tensor parallel degree; 1: off")
    disable_loss_parallel: bool = _f(False, "do not use loss parallel under tensor parallelism")
    fsdp_reshard_after_forward: str = _f(
        "default", "FSDP reshard_after_forward policy", ("default", "always", "never")
    )
    mixed_precision_param: str = _f("bfloat16", "FSDP parameter dtype for compute", ("bfloat16", "float32"))
    mixed_precision_reduce: str = _f("float32", "FSDP gradient reduction dtype", ("float32",))
    compile: bool = _f(False, "torch.compile each block")
    gc_freq: int = _f(50, "Python garbage collection every N steps")
    seed: int = _f(42, "base random seed (model init, data shuffle)")
    deterministic: bool = _f(False, "use deterministic algorithms (slower)")
    enable_l2wrap: bool = _f(False, "L2Wrap regularisation pulling logits towards 0")
    l2wrap_factor: float = _f(1e-4, "L2Wrap coefficient")


@dataclass
class Metrics:
    log_freq: int = _f(10, "log metrics every N steps")
    enable_tensorboard: bool = _f(False, "log metrics to TensorBoard")
    disable_color_printing: bool = _f(False, "plain console logs without colours")
    save_tb_folder: str = _f("tb", "TensorBoard folder, inside the dump folder")
    save_for_all_ranks: bool = _f(False, "write TensorBoard/W&B metrics from every rank, not only rank 0")
    enable_wandb: bool = _f(False, "log metrics to Weights & Biases (when installed)")


@dataclass
class Experimental:
    enable_async_tensor_parallel: bool = _f(False, "async tensor parallel (with compile)")
    pipeline_parallel_degree: int = _f(1, "pipeline parallel degree; 1: off")
    pipeline_parallel_split_points: list[str] = _f([], "comma-separated module names starting pipeline stages")
    pipeline_parallel_schedule: str = _f("1F1B", "pipeline schedule name")
    pipeline_parallel_schedule_csv: str = _f("", "pipeline schedule CSV file")
    pipeline_parallel_microbatches: Optional[int] = _f(None, "pipeline micro-batches; None: number of stages")
    enable_compiled_autograd: bool = _f(False, "compile the backward with compiled autograd")
    context_parallel_degree: int = _f(1, "context parallel degree; 1: off")
    context_parallel_rotate_method: str = _f(
        "allgather", "context parallel KV exchange collective", ("allgather", "alltoall")
    )
    custom_model_path: str = _f("", "import path of an extra model module to register")


@dataclass
class Checkpoint:
    enable_checkpoint: bool = _f(False, "save and resume distributed checkpoints")
    folder: str = _f("checkpoint", "checkpoint folder, inside the dump folder (step-N subfolders)")
    interval_type: str = _f("steps", "unit of checkpoint.interval", ("steps", "seconds"))
    interval: int = _f(500, "save a checkpoint every N steps (and at the last step)")
    model_weights_only: bool = _f(False, "at the end save model weights only (no optimizer/train state)")
    export_dtype: str = _f("float32", "dtype of a weights-only final save", ("float16", "bfloat16", "float32"))
    create_seed_checkpoint: bool = _f(False, "initialise the model unsharded, save it as step-0 and exit")
    async_mode: str = _f("disabled", "asynchronous saving", ("disabled", "async", "async_with_pinned_mem"))
    keep_latest_k: int = _f(0, "keep only the latest k checkpoints; 0: keep all")
    load_step: int = _f(-1, "resume from this step; -1: the latest checkpoint, if any")
    exclude_from_loading: list[str] = _f([], "comma-separated state keys not to load (e.g. optimizer,dataloader)")


@dataclass
class ActivationCheckpoint:
    mode: str = _f("selective", "activation checkpointing", ("none", "full", "selective"))
    selective_ac_option: str = _f("2", "selective mode: an integer N (every N-th block) or 'op'")


@dataclass
class ActivationOffload:
    mode: str = _f("none", "activation offloading (flame: unused)", ("none", "full"))


@dataclass
class Float8:
    enable_fsdp_float8_all_gather: bool = _f(False, "float8 all-gather in FSDP")
    precompute_float8_dynamic_scale_for_fsdp: bool = _f(False, "precompute float8 scales for FSDP")
    force_recompute_fp8_weight_in_bwd: bool = _f(False, "recompute float8 weights in backward")
    recipe_name: Optional[str] = _f(None, "float8 recipe", ("tensorwise", "rowwise", "rowwise_with_gw_hp"))


@dataclass
class Comm:
    init_timeout_seconds: int = _f(300, "collective timeout during start-up and the first step, seconds")
    train_timeout_seconds: int = _f(100, "collective timeout after the first step, seconds")
    trace_buf_size: int = _f(20000, "flight recorder buffer size; 0: off")


@dataclass
class MemoryEstimation:
    enabled: bool = _f(False, "estimate FSDP memory use before training")
    disable_fake_mode: bool = _f(False, "estimate without FakeTensorMode")


@dataclass
class FaultTolerance:
    enable: bool = _f(False, "TorchFT integration (not supported here)")
    replica_id: int = _f(0, "TorchFT replica id")
    group_size: int = _f(0, "TorchFT replica group count")
    min_replica_size: int = _f(1, "TorchFT minimum replicas per step")


@dataclass
class JobConfig:
    """The resolved job configuration: one attribute per flame section."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    profiling: Profiling = field(default_factory=Profiling)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    metrics: Metrics = field(default_factory=Metrics)
    experimental: Experimental = field(default_factory=Experimental)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    activation_offload: ActivationOffload = field(default_factory=ActivationOffload)
    float8: Float8 = field(default_factory=Float8)
    comm: Comm = field(default_factory=Comm)
    memory_estimation: MemoryEstimation = field(default_factory=MemoryEstimation)
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {field: value}}`` with fresh lists (None values kept)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]], source: str = "dict") -> "JobConfig":
        """Defaults overridden by ``data`` (``{section: {field: value}}``, TOML-typed values), then validated."""
        config = cls()
        _apply_mapping(config, data, source)
        validate(config)
        return config

    def to_toml(self) -> str:
        """The configuration as TOML text, loadable by :func:`load_toml` / ``--job.config_file``.

        TOML has no null: ``None`` values are written as comments and read back as the (``None``) default.
        """
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for name, value in values.items():
                if value is None:
                    lines.append(f"# {name} = None")
                else:
                    lines.append(f"{name} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def save_toml(self, path: str) -> None:
        """Write :meth:`to_toml` to ``path`` (e.g. ``<dump_folder>/job_config.toml``)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_toml())


# --------------------------------------------------------------------------------------------------------------------
# schema helpers
# --------------------------------------------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}


def _fields(section: str) -> dict[str, dataclasses.Field]:
    cls = _SECTIONS[section]
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]  # resolve the string annotation once
        out[f.name] = f
    return out


_FIELDS: dict[str, dict[str, dataclasses.Field]] = {s: _fields(s) for s in _SECTIONS}
_ALL_FLAGS = [f"{s}.{n}" for s, fs in _FIELDS.items() for n in fs]


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(base type, is Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list


def _type_name(tp: Any) -> str:
    base, optional = _unwrap(tp)
    name = "list[str]" if _is_list(base) else base.__name__
    return f"{name} or none" if optional else name


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _lookup(section: str, name: str, where: str) -> dataclasses.Field:
    """The field ``section.name``, or a ConfigError naming it with a close-match suggestion."""
    if section not in _FIELDS:
        raise ConfigError(
            f"{where}: unknown section {section!r}{_suggest(section, list(_FIELDS))} "
            f"(sections: {', '.join(_FIELDS)})"
        )
    if name not in _FIELDS[section]:
        full = f"{section}.{name}"
        raise ConfigError(f"{where}: unknown option {full!r}{_suggest(full, _ALL_FLAGS)} (see --help)")
    return _FIELDS[section][name]


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


def _from_string(f: dataclasses.Field, text: str, flag: str) -> Any:
    """Parse a command-line string into the type of field ``f``."""
    base, optional = _unwrap(f.type)
    if optional and text.strip().lower() in _NONE:
        return None
    if base is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"--{flag}: expected a boolean (true/false), got {text!r}")
    if _is_list(base):
        return [s.strip() for s in text.split(",") if s.strip()]
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--{flag}: expected an integer, got {text!r}") from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--{flag}: expected a number, got {text!r}") from None
    return text


def _from_toml(f: dataclasses.Field, value: Any, flag: str, source: str) -> Any:
    """Check a TOML-typed value against field ``f`` (ints are accepted for floats, comma strings for lists)."""
    base, optional = _unwrap(f.type)
    bad = ConfigError(f"{source}: {flag} must be {_type_name(f.type)}, got {value!r}")
    if value is None:
        if optional:
            return None
        raise bad
    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if _is_list(base):
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if isinstance(value, str):
        return value
    raise bad


def _apply_mapping(config: JobConfig, data: dict[str, Any], source: str) -> None:
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section!r} must be a [section] table, got {values!r}")
        for name, value in values.items():
            f = _lookup(section, name, source)
            setattr(getattr(config, section), name, _from_toml(f, value, f"{section}.{name}", source))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


# --------------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------------


def _check(ok: bool, flag: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"--{flag}: {value!r} is not allowed; {allowed}")


def validate(config: JobConfig) -> None:
    """Check choices, ranges and cross-field constraints; raise ConfigError naming the first bad flag."""
    for section, fields in _FIELDS.items():
        obj = getattr(config, section)
        for name, f in fields.items():
            choices = f.metadata.get("choices")
            value = getattr(obj, name)
            if choices and value is not None and value not in choices:
                raise ConfigError(
                    f"--{section}.{name}: {value!r} is not allowed; choose one of {', '.join(choices)}"
                    f"{_suggest(str(value), list(choices))}"
                )

    def at_least(section: str, name: str, low: int | float, strict: bool = False) -> None:
        value = getattr(getattr(config, section), name)
        if value is None:
            return
        ok = value > low if strict else value >= low
        if isinstance(value, float) and math.isnan(value):
            ok = False
        _check(ok, f"{section}.{name}", value, f"must be {'>' if strict else '>='} {low}")

    o, s, t = config.optimizer, config.lr_scheduler, config.training
    at_least("optimizer", "lr", 0.0)
    _check(math.isfinite(o.lr), "optimizer.lr", o.lr, "must be finite")
    at_least("optimizer", "eps", 0.0, strict=True)
    at_least("optimizer", "weight_decay", 0.0)

    at_least("lr_scheduler", "warmup_steps", 0)
    _check(0.0 <= s.lr_min <= 1.0, "lr_scheduler.lr_min", s.lr_min, "must be a ratio in [0, 1]")
    if s.decay_ratio is not None:
        _check(0.0 <= s.decay_ratio <= 1.0, "lr_scheduler.decay_ratio", s.decay_ratio, "must be in [0, 1] or none")

    for name in ("batch_size", "seq_len", "context_len", "gradient_accumulation_steps", "steps", "prefetch_factor",
                 "data_parallel_replicate_degree", "tensor_parallel_degree", "gc_freq"):
        at_least("training", name, 1)
    at_least("training", "num_workers", 0)
    at_least("training", "seed", 0)
    at_least("training", "max_norm", 0.0, strict=True)
    at_least("training", "l2wrap_factor", 0.0)
    _check(t.data_parallel_shard_degree == -1 or t.data_parallel_shard_degree >= 1,
           "training.data_parallel_shard_degree", t.data_parallel_shard_degree, "must be -1 (remaining ranks) or >= 1")
    _check(not t.varlen or t.batch_size == 1, "training.batch_size", t.batch_size,
           "must be 1 with --training.varlen (documents are packed into one row)")

    at_least("metrics", "log_freq", 1)
    at_least("profiling", "profile_freq", 1)

    at_least("checkpoint", "interval", 1)
    at_least("checkpoint", "keep_latest_k", 0)
    at_least("checkpoint", "load_step", -1)

    opt = config.activation_checkpoint.selective_ac_option
    _check(opt == "op" or (opt.isdigit() and int(opt) >= 1), "activation_checkpoint.selective_ac_option", opt,
           "must be a positive integer or 'op'")

    for name in ("pipeline_parallel_degree", "context_parallel_degree", "pipeline_parallel_microbatches"):
        at_least("experimental", name, 1)
    at_least("comm", "init_timeout_seconds", 1)
    at_least("comm", "train_timeout_seconds", 1)
    at_least("comm", "trace_buf_size", 0)
    at_least("fault_tolerance", "replica_id", 0)
    at_least("fault_tolerance", "group_size", 0)
    at_least("fault_tolerance", "min_replica_size", 1)


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def _split_flags(argv: list[str]) -> list[tuple[str, str, Optional[str]]]:
    """Tokens -> [(section, field, raw value or None)] in order; names are checked, values are not parsed yet."""
    out = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: options look like --section.field value")
        name, eq, raw = token[2:].partition("=")
        section, dot, fname = name.partition(".")
        if not dot:
            raise ConfigError(
                f"{token}: options look like --section.field{_suggest(name, _ALL_FLAGS)}"
            )
        fname = fname.replace("-", "_")
        f = _lookup(section, fname, token.partition("=")[0])
        base, _ = _unwrap(f.type)
        i += 1
        if eq:
            value: Optional[str] = raw
        elif base is bool:
            # a bare boolean flag means true; an explicit true/false may follow it
            if i < len(argv) and argv[i].strip().lower() in _TRUE | _FALSE:
                value = argv[i]
                i += 1
            else:
                value = "true"
        elif i < len(argv) and not argv[i].startswith("--"):
            value = argv[i]
            i += 1
        elif _is_list(base):
            value = ""  # like flame's nargs='*': the flag alone is an empty list
        else:
            raise ConfigError(f"--{section}.{fname}: missing value ({_type_name(f.type)})")
        out.append((section, fname, value))
    return out


def format_help() -> str:
    """Every flag grouped by section, with type, default, allowed values and help."""
    lines = [
        "usage: train.sh [--job.config_file FILE] [--section.field VALUE ...]",
        "",
        "Precedence: defaults < TOML file (--job.config_file) < command line. Booleans: --flag or --flag true/false;",
        "lists: comma-separated; optional values: none.",
    ]
    for section, fields in _FIELDS.items():
        lines += ["", f"[{section}]"]
        for name, f in fields.items():
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            extra = f"; one of {', '.join(f.metadata['choices'])}" if f.metadata.get("choices") else ""
            lines.append(f"  --{section}.{name} ({_type_name(f.type)}, default: {default!r}{extra})")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines) + "\n"


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML job file into ``{section: {field: value}}`` (no checks yet)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--job.config_file: no such file {path!r}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--job.config_file: {path!r} is not valid TOML: {e}") from None


def parse_job_config(argv: list[str]) -> JobConfig:
    """Resolve a job from flame-style command-line arguments (without the program name).

    Reads ``--job.config_file`` first, then applies the other flags in order (the last occurrence wins), then
    validates. ``--help``/``-h`` prints :func:`format_help` to stdout and raises ``SystemExit(0)``.

    Raises:
        ConfigError (a ValueError): unknown section/field, unparsable value or value out of range; the message
        names the flag, the value and what is allowed.
    """
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        sys.stdout.write(format_help())
        raise SystemExit(0)
    flags = _split_flags(argv)
    config = JobConfig()
    config_file = None
    for section, name, raw in flags:
        if (section, name) == ("job", "config_file"):
            config_file = _from_string(_FIELDS["job"]["config_file"], raw, "job.config_file")
    if config_file is not None:
        _apply_mapping(config, load_toml(config_file), config_file)
    for section, name, raw in flags:
        value = _from_string(_FIELDS[section][name], raw, f"{section}.{name}")
        setattr(getattr(config, section), name, value)
    validate(config)
    return config


if __name__ == "__main__":  # python -m fla.train.config [flags]: print the resolved job as TOML
    try:
        print(parse_job_config(sys.argv[1:]).to_toml(), end="")
    except ConfigError as e:
        sys.exit(f"error: {e}")
