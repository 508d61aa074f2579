"""The training loop end to end on CPU: single process, kill-and-resume, 2-process FSDP2 (gloo), HF export, bad flags.

Every run is a tiny hybrid GatedDeltaNet + sliding-window-attention model on the shipped corpus and tokenizer.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from fla.train.train import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable

TINY = {
    "model_type": "gated_deltanet", "attn_mode": "chunk", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2,
    "head_dim": 16, "expand_v": 1, "use_gate": True, "use_short_conv": True, "conv_size": 4, "hidden_act": "swish",
    "hidden_ratio": 4, "intermediate_size": None, "norm_eps": 1e-6, "initializer_range": 0.02,
    "max_position_embeddings": 1024, "vocab_size": 8192, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": True, "use_cache": True, "fuse_cross_entropy": True,
    "attn": {"layers": [1], "num_heads": 2, "num_kv_heads": 2, "qkv_bias": False, "window_size": 16,
             "rope_theta": 10000.0},
}


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def flags(model_config, dump, steps, **extra):
    args = {
        "job.dump_folder": str(dump), "model.config": model_config,
        "model.tokenizer_path": os.path.join(REPO, "assets", "tokenizer"),
        "training.dataset": os.path.join(REPO, "assets", "corpus"), "training.num_workers": 0,
        "training.batch_size": 2, "training.seq_len": 32, "training.context_len": 32, "training.steps": steps,
        "training.gradient_accumulation_steps": 2, "training.seed": 7, "optimizer.lr": 3e-3,
        "lr_scheduler.warmup_steps": 2, "lr_scheduler.decay_type": "cosine", "metrics.log_freq": 1,
        "activation_checkpoint.mode": "none", "checkpoint.export_dtype": "float32",
    }
    args.update({k.replace("__", "."): v for k, v in extra.items()})
    out = []
    for k, v in args.items():
        out += [f"--{k}", str(v)]
    return out


def losses(dump):
    with open(os.path.join(dump, "losses.json")) as f:
        return {int(k): v for k, v in json.load(f).items()}


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def test_single_process_loss_falls_and_export_generates(model_config, tmp_path, capsys):
    dump = tmp_path / "run"
    assert main(flags(model_config, dump, 30, optimizer__lr=1e-2, metrics__log_freq=10)) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4  # steps 1, 10, 20, 30
    for key in ("loss", "lr", "gnorm", "tok/s", "mem", "eta"):
        assert f"| {key} " in lines[-1]
    ls = losses(dump)
    assert sorted(ls) == list(range(1, 31))
    first, last = sum(ls[i] for i in range(1, 4)) / 3, sum(ls[i] for i in range(28, 31)) / 3
    assert last < first - 1.0, (first, last)
    assert (dump / "job_config.toml").is_file() and (dump / "config.json").is_file()

    # HF export: config + safetensors + tokenizer, loadable and generating
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fla  # noqa: F401

    hf = dump / "hf"
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    assert (hf / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    tok = AutoTokenizer.from_pretrained(str(hf))
    ids = tok("In the beginning", return_tensors="pt").input_ids
    # the exported weights reproduce the trained model: loss of the loaded model on a batch is finite and sane
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and loss < 9.5
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5)
    assert torch.equal(gen[:, : ids.shape[1]], ids)


def test_kill_and_resume_reproduces_losses(model_config, tmp_path):
    ref = tmp_path / "ref"
    common = dict(checkpoint__enable_checkpoint="true", checkpoint__interval=3)
    assert main(flags(model_config, ref, 6, **common)) == 0
    want = losses(ref)
    assert sorted(os.listdir(ref / "checkpoint")) == ["step-3", "step-6"]

    # the same job, killed (SIGKILL) as soon as the step-3 checkpoint is written
    dump = tmp_path / "killed"
    cmd = [PYTHON, "-u", "-m", "fla.train.train"] + flags(model_config, dump, 6, **common)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "checkpoint saved" in line and "step-3" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    ck = dump / "checkpoint"
    for name in os.listdir(ck):  # steps the killed process may have begun after step 3 are lost, as in a real kill
        if name != "step-3":
            import shutil

            shutil.rmtree(ck / name)
    assert not (dump / "losses.json").exists()

    # resume with the same command: --checkpoint.load_step -1 picks step-3
    assert main(flags(model_config, dump, 6, checkpoint__load_step=-1, **common)) == 0
    got = losses(dump)
    assert sorted(got) == [4, 5, 6]
    for s in (4, 5, 6):
        assert abs(got[s] - want[s]) < 1e-6, (s, got[s], want[s])


def test_torchrun_two_process_fsdp2(model_config, tmp_path):
    dump = tmp_path / "fsdp"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fla.train.train"]
    cmd += flags(model_config, dump, 4, training__data_parallel_shard_degree=2, checkpoint__enable_checkpoint="true",
                 checkpoint__interval=2)
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "world 2 (replicate 1 x shard 2)" in out
    assert "step 4/4 | loss" in out
    assert sorted(os.listdir(dump / "checkpoint")) == ["step-2", "step-4"]
    assert len([f for f in os.listdir(dump / "checkpoint" / "step-4") if f.endswith(".distcp")]) == 2
    assert (dump / "hf" / "model.safetensors").is_file()
    ls = losses(dump)
    assert sorted(ls) == [1, 2, 3, 4] and all(v == v and v < 10 for v in ls.values())

    # the export gathered the shards: it equals the DCP checkpoint's {"model": ...} (flame's converter path)
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(dump / "checkpoint" / "step-4"), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=False)["model"]
    exported = load_file(str(dump / "hf" / "model.safetensors"))
    assert set(exported) <= set(full) and "model.layers.0.attn.A_log" in exported
    for k, v in exported.items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=0)

    # sharded resume: drop the last checkpoint, rerun the same command, steps 3-4 repeat exactly
    import shutil

    shutil.rmtree(dump / "checkpoint" / "step-4")
    os.remove(dump / "losses.json")
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "resumed from" in res.stdout + res.stderr
    again = losses(dump)
    assert sorted(again) == [3, 4]
    for s in (3, 4):
        assert abs(again[s] - ls[s]) < 1e-6, (s, again[s], ls[s])


def test_bad_flags_fail_clearly(model_config, tmp_path):
    res = subprocess.run([PYTHON, "-m", "fla.train.train", "--training.stepz", "3"], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "training.stepz" in res.stderr and "Traceback" not in res.stderr
    # a bad value, and a data-parallel layout that does not match the world size
    assert main(["--training.steps", "many"]) == 2
    assert main(flags(model_config, tmp_path / "x", 2, training__data_parallel_shard_degree=2)) == 2


def test_train_sh_launches_torchrun_with_logs(model_config, tmp_path):
    dump = tmp_path / "sh"
    e = env()
    e.update(NGPU="1", NNODE="1", LOG_RANK="0", MASTER_PORT="0", PYTHON=PYTHON)
    args = flags(model_config, dump, 2, activation_checkpoint__mode="full")
    res = subprocess.run(["bash", os.path.join(REPO, "train.sh")] + args, cwd=str(tmp_path), env=e,
                         capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "[rank0]:step 2/2 | loss" in out
    logs = list((dump / "logs").rglob("stdout.log"))
    assert logs and any("step 2/2" in p.read_text() for p in logs)
    assert (dump / "hf" / "model.safetensors").is_file()
    bad = subprocess.run(["bash", os.path.join(REPO, "train.sh"), "--job.dump_folder", str(tmp_path / "bad"),
                          "--optimizer.nme", "AdamW"], cwd=str(tmp_path), env=e, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "optimizer.nme" in bad.stdout + bad.stderr


def test_skip_nan_inf_skips_updates(model_config, tmp_path, capsys, monkeypatch):
    stepped = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("nan")))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: stepped.append(1))
    assert main(flags(model_config, tmp_path / "nan", 2, training__skip_nan_inf="true")) == 0
    out = capsys.readouterr().out
    assert "update skipped (2 so far)" in out and not stepped


TINY_LTE = dict(TINY, model_type="hybrid_gated_deltanet", attn={
    "layers": [1], "attn_type": "lte", "num_heads": 2, "num_kv_heads": 2, "qkv_bias": False, "window_size": 6,
    "rope_theta": 10000.0, "conv_size": [3, 3], "conv_dilation": [1, 2], "dropout_prob": 0.0, "buffer_size": 2,
    "sink_size": 1, "routing_method": "sigmoid", "routing_grad": True, "routing_shared": "head",
    "l1_lambda_shared": "head", "l1_warmup_steps": 0, "routing_freeze_steps": 0, "l1_lambda_initial_steps": 0,
    "l1_lambda_update_steps": 2, "l1_lambda_tolerate": [0.95, 1.0], "l1_alpha": 1.5, "l1_alpha_neg": 2,
    "l1_lambda_init": 1e-3, "l1_lambda_min": 1e-9, "l1_lambda_max": 1.0})


def test_lte_controller_runs_in_the_loop_and_resumes(tmp_path, capsys):
    """laLTE: the L1 term is added, lambda rises on over-budget heads (the router starts keeping everything: 32
    kept of a budget of 2), the controller buffers are checkpointed and a resumed run continues them exactly."""
    cfg = tmp_path / "lte.json"
    cfg.write_text(json.dumps(TINY_LTE))
    common = dict(checkpoint__enable_checkpoint="true", checkpoint__interval=3, checkpoint__keep_latest_k=0)
    ref = tmp_path / "ref"
    assert main(flags(str(cfg), ref, 6, **common)) == 0
    out = capsys.readouterr().out
    assert "lte/overall_sparsity" in out and "lte/l1_loss" in out
    from safetensors.torch import load_file

    weights = {}
    for name in os.listdir(ref / "hf"):
        if name.endswith(".safetensors"):
            weights.update(load_file(str(ref / "hf" / name)))
    lam = weights["model.l1_lambda"]
    # the conversion command turns the last DCP checkpoint into the same HF folder as the end-of-run export
    from fla.train.convert import main as convert_main

    assert convert_main(["--checkpoint", str(ref / "checkpoint" / "step-6"), "--output", str(tmp_path / "conv")]) == 0
    converted = {}
    for name in os.listdir(tmp_path / "conv"):
        if name.endswith(".safetensors"):
            converted.update(load_file(str(tmp_path / "conv" / name)))
    assert converted.keys() == weights.keys() and all(torch.equal(converted[k], weights[k]) for k in weights)
    assert convert_main(["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert lam.shape == (1, 2) and (lam > 0).all()  # the first update set lambda_init, later ones raised it
    printed = [float(line.split("lte/overall_l1_lambda ")[1].split(" |")[0]) for line in out.splitlines()
               if "lte/overall_l1_lambda " in line]
    assert printed and abs(printed[-1] - lam.mean().item()) <= 1e-3 * lam.mean().item()  # step 6 updates lambda
    assert (weights["model.num_kept"] > 2).all()
    import shutil

    resumed = tmp_path / "resumed"  # a copy of the job as it stood at the step-3 checkpoint, then resumed
    shutil.copytree(ref / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    assert main(flags(str(cfg), resumed, 6, checkpoint__load_step=-1, **common)) == 0
    want, got = losses(ref), losses(resumed)
    for s in (4, 5, 6):
        assert abs(got[s] - want[s]) < 1e-6, (s, got[s], want[s])
    again = {}
    for name in os.listdir(resumed / "hf"):
        if name.endswith(".safetensors"):
            again.update(load_file(str(resumed / "hf" / name)))
    assert torch.equal(again["model.l1_lambda"], lam) and torch.equal(again["model.num_kept"], weights["model.num_kept"])


def test_wandb_when_installed_and_asked_for(model_config, tmp_path, monkeypatch, capsys):
    """--metrics.enable_wandb logs through wandb when it is importable (a stand-in module here) and only warns when
    it is not."""
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, values, step=None):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert main(flags(model_config, tmp_path / "w", 2, metrics__enable_wandb="true")) == 0
    assert len(calls["init"]) == 1 and calls["init"][0]["mode"] == "offline" and calls["init"][0]["name"] == "w"
    assert calls["finish"] == 1 and [s for s, _ in calls["log"]] == [1, 2]
    assert "train/loss" in calls["log"][0][1]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: the run goes on, with a note
    assert main(flags(model_config, tmp_path / "x", 2, metrics__enable_wandb="true")) == 0
    assert "wandb is not installed" in capsys.readouterr().out


def test_torchrun_two_process_fsdp2_lte(tmp_path):
    """laLTE under FSDP2 on 2 processes: the controller finds its buffers and routers through the sharded model,
    its all-reduce of num_kept runs across the ranks, lambda rises and is exported."""
    cfg = tmp_path / "lte.json"
    cfg.write_text(json.dumps(TINY_LTE))
    dump = tmp_path / "fsdp_lte"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fla.train.train"]
    cmd += flags(str(cfg), dump, 4, training__data_parallel_shard_degree=2)
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "step 4/4 | loss" in out and "lte/overall_l1_lambda" in out
    from safetensors.torch import load_file

    weights = load_file(str(dump / "hf" / "model.safetensors"))
    assert (weights["model.l1_lambda"] > 0).all() and torch.isfinite(weights["model.num_kept"]).all()
