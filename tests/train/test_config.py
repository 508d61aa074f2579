"""Job configuration: defaults, TOML < CLI precedence, flame's seed command, errors, --help and the TOML dump."""

import dataclasses
import os
import shlex
import tomllib

import pytest

from fla.train.config import ConfigError, JobConfig, format_help, load_toml, parse_job_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLA_TOML = os.path.join(REPO, "configs", "fla.toml")

# the paper's README command (after `bash train.sh`), unchanged
SEED_COMMAND = (
    "--job.config_file configs/fla.toml --job.dump_folder exp/gated-deltanet-lte-1.4B-30B "
    "--model.config configs/gated_delta_net_lte_1.4B.json --model.tokenizer_path fla-hub/transformer-1.3B-100B "
    "--optimizer.name AdamW --optimizer.lr 3e-4 --lr_scheduler.warmup_steps 512 --lr_scheduler.lr_min 0.1 "
    "--lr_scheduler.decay_type cosine --training.data_parallel_shard_degree 2 "
    "--training.data_parallel_replicate_degree 1 --training.batch_size 8 --training.seq_len 4096 "
    "--training.gradient_accumulation_steps 16 --training.steps 30720 --training.max_norm 1.0 "
    "--training.skip_nan_inf --training.dataset HuggingFaceFW/fineweb-edu --training.dataset_name sample-100BT "
    "--training.dataset_split train --training.num_workers 32 --training.prefetch_factor 2 --training.seed 42 "
    "--checkpoint.interval 320 --checkpoint.load_step -1 --metrics.log_freq 4 --profiling.profile_freq 5120"
)


def write(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_flames():
    c = parse_job_config([])
    assert c == JobConfig()
    assert c.job.config_file is None and c.job.dump_folder == "./torchtitan/outputs"
    assert c.model.config == "fla-hub/transformer-1.3B-100B" and c.model.converters == []
    o = c.optimizer
    assert (o.name, o.lr, o.eps, o.implementation) == ("AdamW", 8e-4, 1e-8, "fused")
    assert (c.lr_scheduler.warmup_steps, c.lr_scheduler.decay_ratio, c.lr_scheduler.decay_type,
            c.lr_scheduler.lr_min) == (200, None, "linear", 0.0)
    t = c.training
    assert (t.batch_size, t.seq_len, t.context_len, t.gradient_accumulation_steps, t.steps) == (8, 2048, 2048, 1, 10000)
    assert (t.max_norm, t.skip_nan_inf, t.varlen, t.streaming, t.compile) == (1.0, False, False, False, False)
    assert (t.dataset, t.dataset_name, t.dataset_split) == ("HuggingFaceFW/fineweb-edu", None, None)
    assert (t.num_workers, t.prefetch_factor, t.seed) == (32, 2, 42)
    assert (t.data_parallel_replicate_degree, t.data_parallel_shard_degree) == (1, -1)
    assert (t.mixed_precision_param, t.mixed_precision_reduce) == ("bfloat16", "float32")
    assert (c.metrics.log_freq, c.metrics.enable_tensorboard, c.metrics.enable_wandb) == (10, False, False)
    assert (c.profiling.enable_profiling, c.profiling.profile_freq) == (False, 10)
    ck = c.checkpoint
    assert (ck.enable_checkpoint, ck.folder, ck.interval) == (False, "checkpoint", 500)
    assert (ck.load_step, ck.keep_latest_k) == (-1, 0)
    assert ck.exclude_from_loading == []
    assert (c.activation_checkpoint.mode, c.activation_checkpoint.selective_ac_option) == ("selective", "2")
    assert (c.comm.init_timeout_seconds, c.comm.train_timeout_seconds) == (300, 100)


def test_every_field_has_help():
    for section in dataclasses.fields(JobConfig):
        for f in dataclasses.fields(section.default_factory):
            assert f.metadata.get("help"), f"{section.name}.{f.name}"


def test_toml_overrides_defaults(tmp_path):
    path = write(tmp_path, '[training]\nbatch_size = 3\nseq_len = 128\n[optimizer]\nlr = 1\n'
                           '[checkpoint]\nexclude_from_loading = ["optimizer", "dataloader"]\n')
    c = parse_job_config(["--job.config_file", path])
    assert c.job.config_file == path
    assert (c.training.batch_size, c.training.seq_len) == (3, 128)
    assert c.optimizer.lr == 1.0 and isinstance(c.optimizer.lr, float)  # TOML int accepted for a float
    assert c.checkpoint.exclude_from_loading == ["optimizer", "dataloader"]
    assert c.training.steps == 10000  # untouched keys keep their defaults


def test_cli_overrides_toml_in_any_order(tmp_path):
    path = write(tmp_path, "[training]\nbatch_size = 3\nsteps = 7\n[metrics]\nenable_wandb = true\n")
    for argv in (["--training.batch_size", "5", f"--job.config_file={path}"],
                 [f"--job.config_file={path}", "--training.batch_size=5"]):
        c = parse_job_config(argv + ["--metrics.enable_wandb", "false"])
        assert (c.training.batch_size, c.training.steps, c.metrics.enable_wandb) == (5, 7, False)
    # the last occurrence of a flag wins
    assert parse_job_config(["--training.steps", "1", "--training.steps", "2"]).training.steps == 2


def test_seed_command(monkeypatch):
    monkeypatch.chdir(REPO)  # the command names configs/fla.toml relative to the repository root
    c = parse_job_config(shlex.split(SEED_COMMAND))
    assert c.job.config_file == "configs/fla.toml"
    assert c.job.dump_folder == "exp/gated-deltanet-lte-1.4B-30B"
    assert c.model.config == "configs/gated_delta_net_lte_1.4B.json"
    assert c.model.tokenizer_path == "fla-hub/transformer-1.3B-100B"
    assert (c.optimizer.name, c.optimizer.lr) == ("AdamW", 3e-4)
    assert (c.lr_scheduler.warmup_steps, c.lr_scheduler.lr_min, c.lr_scheduler.decay_type) == (512, 0.1, "cosine")
    t = c.training
    assert (t.data_parallel_shard_degree, t.data_parallel_replicate_degree) == (2, 1)
    assert (t.batch_size, t.seq_len, t.gradient_accumulation_steps, t.steps) == (8, 4096, 16, 30720)
    assert (t.max_norm, t.skip_nan_inf) == (1.0, True)
    assert (t.dataset, t.dataset_name, t.dataset_split) == ("HuggingFaceFW/fineweb-edu", "sample-100BT", "train")
    assert (t.num_workers, t.prefetch_factor, t.seed) == (32, 2, 42)
    assert (c.checkpoint.interval, c.checkpoint.load_step) == (320, -1)
    assert (c.metrics.log_freq, c.profiling.profile_freq) == (4, 5120)
    # from configs/fla.toml, not overridden by the command
    assert (c.checkpoint.enable_checkpoint, c.profiling.enable_profiling, c.metrics.enable_wandb) == (True, True, True)
    assert (c.optimizer.eps, c.activation_checkpoint.mode) == (1e-15, "none")
    assert (t.context_len, t.varlen, t.compile) == (4096, False, False)
    for v in (t.batch_size, t.steps, c.checkpoint.interval):
        assert type(v) is int
    assert type(c.optimizer.lr) is float


@pytest.mark.parametrize("argv, expected", [
    (["--training.skip_nan_inf"], True),
    (["--training.skip_nan_inf", "true"], True),
    (["--training.skip_nan_inf", "False"], False),
    (["--training.skip_nan_inf=false"], False),
    (["--training.skip_nan_inf=1"], True),
    (["--training.skip-nan-inf", "no"], False),
    (["--training.skip_nan_inf", "--training.steps", "3"], True),
])
def test_booleans(argv, expected):
    assert parse_job_config(argv).training.skip_nan_inf is expected


def test_boolean_false_overrides_toml_true(tmp_path):
    path = write(tmp_path, "[training]\nskip_nan_inf = true\n")
    c = parse_job_config(["--job.config_file", path, "--training.skip_nan_inf", "false"])
    assert c.training.skip_nan_inf is False


def test_lists_and_optionals(tmp_path):
    c = parse_job_config(["--checkpoint.exclude_from_loading", "optimizer, lr_scheduler,dataloader",
                          "--model.converters=float8",
                          "--experimental.pipeline_parallel_split_points", "layers.0,layers.2"])
    assert c.checkpoint.exclude_from_loading == ["optimizer", "lr_scheduler", "dataloader"]
    assert c.model.converters == ["float8"]
    assert c.experimental.pipeline_parallel_split_points == ["layers.0", "layers.2"]
    # a bare list flag is an empty list; a comma string in TOML is split
    path = write(tmp_path, '[checkpoint]\nexclude_from_loading = "optimizer,dataloader"\n')
    c = parse_job_config(["--job.config_file", path])
    assert c.checkpoint.exclude_from_loading == ["optimizer", "dataloader"]
    c = parse_job_config(["--job.config_file", path, "--checkpoint.exclude_from_loading"])
    assert c.checkpoint.exclude_from_loading == []
    # optionals
    c = parse_job_config(["--lr_scheduler.decay_ratio", "0.2", "--training.dataset_name", "none"])
    assert (c.lr_scheduler.decay_ratio, c.training.dataset_name) == (0.2, None)
    assert parse_job_config(["--lr_scheduler.decay_ratio=null"]).lr_scheduler.decay_ratio is None


@pytest.mark.parametrize("argv, match", [
    (["--training.bach_size", "3"], r"unknown option 'training.bach_size'; did you mean 'training.batch_size'"),
    (["--trainig.steps", "3"], r"unknown section 'trainig'; did you mean 'training'"),
    (["--optimizer.learning_rate", "1e-3"], r"unknown option 'optimizer.learning_rate'"),
    (["--lr_scheduler.lr_mn=0.1"], r"did you mean 'lr_scheduler.lr_min'"),
    (["--steps", "3"], r"--section.field"),
    (["train"], r"unexpected argument 'train'"),
    (["--training.steps"], r"--training.steps: missing value \(int\)"),
])
def test_unknown_and_malformed_flags(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_job_config(argv)


def test_unknown_keys_in_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option 'training.bach_size'; did you mean 'training.batch_size'"):
        parse_job_config(["--job.config_file", write(tmp_path, "[training]\nbach_size = 3\n")])
    with pytest.raises(ConfigError, match=r"unknown section 'optimiser'; did you mean 'optimizer'"):
        parse_job_config(["--job.config_file", write(tmp_path, "[optimiser]\nlr = 0.1\n")])
    with pytest.raises(ConfigError, match=r"training.batch_size must be int, got '8'"):
        parse_job_config(["--job.config_file", write(tmp_path, '[training]\nbatch_size = "8"\n')])
    with pytest.raises(ConfigError, match=r"training.skip_nan_inf must be bool"):
        parse_job_config(["--job.config_file", write(tmp_path, "[training]\nskip_nan_inf = 1\n")])
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        parse_job_config(["--job.config_file", write(tmp_path, "[training\n")])
    with pytest.raises(ConfigError, match=r"no such file"):
        parse_job_config(["--job.config_file", str(tmp_path / "missing.toml")])
    # ranges are checked on TOML values too
    with pytest.raises(ConfigError, match=r"--training.seq_len: 0 is not allowed"):
        parse_job_config(["--job.config_file", write(tmp_path, "[training]\nseq_len = 0\n")])


@pytest.mark.parametrize("argv, match", [
    (["--optimizer.lr", "-1e-3"], r"--optimizer.lr: -0.001 is not allowed; must be >= 0"),
    (["--optimizer.lr", "fast"], r"--optimizer.lr: expected a number, got 'fast'"),
    (["--optimizer.lr", "inf"], r"--optimizer.lr: inf is not allowed; must be finite"),
    (["--optimizer.eps", "0"], r"--optimizer.eps.*must be > 0"),
    (["--optimizer.name", "SGD"], r"--optimizer.name: 'SGD' is not allowed; choose one of Adam, AdamW"),
    (["--lr_scheduler.lr_min", "1.5"], r"--lr_scheduler.lr_min: 1.5 is not allowed; must be a ratio in \[0, 1\]"),
    (["--lr_scheduler.lr_min", "-0.1"], r"--lr_scheduler.lr_min"),
    (["--lr_scheduler.decay_type", "cosin"], r"choose one of linear, sqrt, cosine; did you mean 'cosine'"),
    (["--lr_scheduler.decay_ratio", "2"], r"--lr_scheduler.decay_ratio"),
    (["--lr_scheduler.warmup_steps", "-1"], r"--lr_scheduler.warmup_steps"),
    (["--training.seq_len", "0"], r"--training.seq_len: 0 is not allowed; must be >= 1"),
    (["--training.batch_size", "0"], r"--training.batch_size: 0 is not allowed"),
    (["--training.batch_size", "2.5"], r"--training.batch_size: expected an integer, got '2.5'"),
    (["--training.gradient_accumulation_steps", "0"], r"--training.gradient_accumulation_steps"),
    (["--training.steps", "0"], r"--training.steps"),
    (["--training.data_parallel_shard_degree", "0"], r"must be -1 \(remaining ranks\) or >= 1"),
    (["--training.data_parallel_shard_degree", "-2"], r"--training.data_parallel_shard_degree"),
    (["--training.data_parallel_replicate_degree", "0"], r"--training.data_parallel_replicate_degree"),
    (["--training.num_workers", "-1"], r"--training.num_workers"),
    (["--training.max_norm", "0"], r"--training.max_norm"),
    (["--training.varlen"], r"--training.batch_size: 8 is not allowed; must be 1 with --training.varlen"),
    (["--training.skip_nan_inf", "maybe"], r"unexpected argument 'maybe'"),
    (["--training.skip_nan_inf=maybe"], r"expected a boolean \(true/false\), got 'maybe'"),
    (["--training.mixed_precision_param", "float16"], r"choose one of bfloat16, float32"),
    (["--checkpoint.interval", "0"], r"--checkpoint.interval: 0 is not allowed; must be >= 1"),
    (["--checkpoint.load_step", "-2"], r"--checkpoint.load_step"),
    (["--checkpoint.async_mode", "sync"], r"--checkpoint.async_mode"),
    (["--activation_checkpoint.mode", "partial"], r"choose one of none, full, selective"),
    (["--activation_checkpoint.selective_ac_option", "x"], r"positive integer or 'op'"),
    (["--metrics.log_freq", "0"], r"--metrics.log_freq"),
    (["--profiling.profile_freq", "0"], r"--profiling.profile_freq"),
    (["--float8.recipe_name", "fast"], r"--float8.recipe_name"),
])
def test_bad_values(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_job_config(argv)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_varlen_with_batch_size_one():
    c = parse_job_config(["--training.varlen", "--training.batch_size", "1"])
    assert c.training.varlen and c.training.batch_size == 1


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        parse_job_config(["--training.steps", "3", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out == format_help()
    for section in ("job", "model", "profiling", "optimizer", "lr_scheduler", "training", "metrics", "experimental",
                    "checkpoint", "activation_checkpoint", "float8", "comm"):
        assert f"\n[{section}]\n" in out
    assert "--training.skip_nan_inf (bool, default: False)" in out
    assert "--lr_scheduler.decay_type (str, default: 'linear'; one of linear, sqrt, cosine)" in out
    assert "--lr_scheduler.decay_ratio (float or none, default: None)" in out
    with pytest.raises(SystemExit):
        parse_job_config(["-h"])


def test_dump_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    c = parse_job_config(shlex.split(SEED_COMMAND) + [
        "--checkpoint.exclude_from_loading", "optimizer,dataloader", "--lr_scheduler.decay_ratio", "0.25",
        "--job.description", 'quotes " and \\ and unicode é', "--optimizer.eps", "1e-15"])
    text = c.to_toml()
    assert tomllib.loads(text)["training"]["steps"] == 30720
    assert JobConfig.from_dict(tomllib.loads(text)) == c
    path = tmp_path / "job_config.toml"
    c.save_toml(str(path))
    assert load_toml(str(path)) == tomllib.loads(text)
    # re-launching from the dump gives the same job (only config_file differs: it names the dump)
    again = parse_job_config(["--job.config_file", str(path)])
    again.job.config_file = c.job.config_file
    assert again == c
    # None values are written as comments and come back as None
    d = parse_job_config([]).to_dict()
    assert d["training"]["dataset_name"] is None
    assert JobConfig.from_dict(tomllib.loads(JobConfig().to_toml())) == JobConfig()
    # to_dict is plain data, independent of the config
    d = c.to_dict()
    d["checkpoint"]["exclude_from_loading"].append("x")
    assert c.checkpoint.exclude_from_loading == ["optimizer", "dataloader"]


def test_from_dict_checks():
    with pytest.raises(ConfigError, match=r"did you mean 'training.seq_len'"):
        JobConfig.from_dict({"training": {"seq_lne": 3}})
    with pytest.raises(ConfigError, match=r"--training.seq_len"):
        JobConfig.from_dict({"training": {"seq_len": 0}})


def test_repo_fla_toml_loads():
    data = load_toml(FLA_TOML)
    c = parse_job_config(["--job.config_file", FLA_TOML])
    expected = JobConfig.from_dict(data)
    expected.job.config_file = FLA_TOML
    assert c == expected
    assert (c.job.dump_folder, c.job.print_args) == ("exp", True)
    t = c.training
    assert (t.batch_size, t.seq_len, t.context_len, t.steps) == (32, 4096, 4096, 20480)
    assert (c.training.skip_nan_inf, c.training.dataset_name, c.training.pin_memory) == (True, "default", False)
    assert (c.optimizer.eps, c.optimizer.lr) == (1e-15, 3e-4)
    assert (c.lr_scheduler.warmup_steps, c.lr_scheduler.decay_type, c.lr_scheduler.lr_min) == (1024, "cosine", 0.1)
    assert (c.checkpoint.enable_checkpoint, c.checkpoint.interval, c.checkpoint.interval_type) == (True, 2048, "steps")
    p = c.profiling
    assert (p.enable_profiling, p.save_traces_folder, p.profile_freq) == (True, "profile_trace", 512)
    assert (c.metrics.log_freq, c.metrics.enable_wandb) == (32, True)
    assert c.activation_checkpoint.mode == "none"
    # every key the file sets is a real field (parse would have failed otherwise) and the file sets flame's sections
    assert set(data) == {"model", "job", "training", "optimizer", "lr_scheduler", "checkpoint", "profiling",
                         "metrics", "experimental", "float8", "activation_checkpoint"}
