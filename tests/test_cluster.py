"""Cluster jobs: SLURM templates (syntax, #SBATCH lines, dry runs, preemption -> requeue -> resume), SIGUSR1
in the trainer, --batch_size auto, and the benchmark's CPU run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from medgen.Generation.TrainGen.core.autobatch import largest_fitting, with_margin
from tests.conftest import background, ROOT, run_script

sys.path.insert(0, str(ROOT / "IDUN"))
from make_templates import MODES, STRATEGIES, templates  # noqa: E402

SLURM_DIR = ROOT / "IDUN" / "slurmT"
SBATCH_KEYS = {"job-name", "partition", "nodes", "ntasks-per-node", "gres", "constraint", "cpus-per-task", "mem",
               "time", "signal", "requeue", "open-mode", "output", "array"}
FILES = sorted(SLURM_DIR.glob("*.slurm"))


def sbatch_options(text: str) -> dict:
    opts = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            m = re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(\S+))?", line)
            assert m, f"unparseable #SBATCH line: {line!r}"
            opts[m.group(1)] = m.group(2)
    return opts


def test_templates_are_generated_and_complete():
    expected = templates()
    assert {p.name for p in FILES} == set(expected)
    for p in FILES:
        assert p.read_text() == expected[p.name], f"{p.name} differs from IDUN/make_templates.py's output"
    for s in STRATEGIES:
        for m in MODES:
            assert (SLURM_DIR / f"{s}_128_{m}.slurm").is_file() and (SLURM_DIR / f"{s}_128_{m}_multigpu.slurm").is_file()


@pytest.mark.parametrize("path", FILES + [ROOT / "IDUN" / "job_common.sh", ROOT / "IDUN" / "watch_job.sh"],
                         ids=lambda p: p.name)
def test_every_script_passes_bash_n(path):
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_sbatch_lines_parse(path):
    text = path.read_text()
    opts = sbatch_options(text)
    assert set(opts) <= SBATCH_KEYS
    assert opts["constraint"] == '"a100|h100"' and opts["signal"] == "B:SIGUSR1@90" and "requeue" in opts
    assert re.fullmatch(r"gpu:\d", opts["gres"]) and re.fullmatch(r"\d+-\d\d:\d\d:\d\d", opts["time"])
    assert "/home/" not in text and "/cluster/" not in text and "~/" not in text  # paths come from the environment


def dry_run(path, **env):
    res = subprocess.run(["bash", str(path)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "DRY_RUN": "1", "MEDGEN_REPO": str(ROOT), **env})
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", MODES)
def test_dry_run_prints_the_exact_training_command(mode, strategy):
    env = {"MEDGEN_OUTPUT_ROOT": "/out", "MEDGEN_DATA_ROOT": "/data", "SLURM_JOB_ID": "77"}
    single = dry_run(SLURM_DIR / f"{strategy}_128_{mode}.slurm", **env)
    assert single.endswith(f"Generation/TrainGen/train.py --config config/{mode}_128.yaml --mode {mode} --strategy "
                           f"{strategy} --image_size 128 --compute cluster --run_dir /out/runs/{strategy}_128_{mode}_77 "
                           "--resume auto")
    multi = dry_run(SLURM_DIR / f"{strategy}_128_{mode}_multigpu.slurm", **env, SLURM_NNODES="2")
    assert multi.startswith("srun --ntasks-per-node=1") and "-m torch.distributed.run --nnodes=2 --nproc_per_node=4" in multi
    assert "--rdzv_backend=c10d" in multi and "--rdzv_id=77" in multi and multi.endswith("--resume auto --multi_gpu")


def test_dry_run_of_generation_and_evaluation():
    gen = dry_run(SLURM_DIR / "generate_array.slurm", MEDGEN_OUTPUT_ROOT="/out", MEDGEN_DATA_ROOT="/d",
                  SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_COUNT="8", SLURM_ARRAY_JOB_ID="9", SEG_RUN="/r/seg",
                  IMAGE_RUN="/r/bravo")
    assert gen.endswith("generate.py --seg_model /r/seg --image_model /r/bravo --num_images 15000 --batch_size 256 "
                        "--output_dir /out/synthetic/9 --shard 3/8")
    ev = dry_run(SLURM_DIR / "evaluate.slurm", MEDGEN_OUTPUT_ROOT="/o", MEDGEN_DATA_ROOT="/d", SYNTH_DIR="/s",
                 REAL_DIR="/r")
    assert ev.endswith("run_evaluation.py --synthetic-dir /s --real-dir /r --metrics all --positive-only --output /s/eval")


def test_missing_environment_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEN_")}
    res = subprocess.run(["bash", str(SLURM_DIR / "ddpm_128_seg.slurm")], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "MEDGEN_REPO": str(ROOT)})
    assert res.returncode != 0 and "set MEDGEN_OUTPUT_ROOT" in res.stderr
    dry = subprocess.run(["bash", str(SLURM_DIR / "ddpm_128_seg.slurm")], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "MEDGEN_REPO": str(ROOT), "DRY_RUN": "1"})
    assert dry.returncode == 0 and "warning: MEDGEN_OUTPUT_ROOT is not set" in dry.stderr
    assert "warning: MEDGEN_DATA_ROOT is not set" in dry.stderr


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_has_a_preset_of_its_own(mode):
    from medgen.Generation.TrainGen.core.config import build_config, load_yaml
    cfg = build_config(load_yaml(ROOT / "config" / f"{mode}_128.yaml"))
    assert cfg.mode.name == mode and cfg.data.image_size == 128
    assert cfg.data.positive_only == (mode in ("seg", "bravo", "dual"))


def wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_sigusr1_checkpoints_requeues_and_resumes(demo_root, tmp_path):
    """The template's real mechanics, with a tiny config: SIGUSR1 to the batch shell -> the trainer checkpoints
    and stops -> the script calls `scontrol requeue` -> the next start resumes from that checkpoint."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "MEDGEN_REPO": str(ROOT), "MEDGEN_PYTHON": sys.executable, "MEDGEN_OUTPUT_ROOT": str(out),
           "MEDGEN_DATA_ROOT": str(demo_root), "MEDGEN_CACHE": str(tmp_path / "cache"), "SCONTROL": str(scontrol),
           "SLURM_JOB_ID": "4242",
           "EXTRA_ARGS": f"--config config/tiny.yaml --image_size 32 --data_dir {demo_root / 'brain'} --epochs 400 "
                         "--set runtime.log_interval=2 --set strategy.sample_steps=4 --set runtime.num_val_samples=4"}
    job = SLURM_DIR / "ddpm_128_bravo.slurm"
    run_dir = out / "runs" / "ddpm_128_bravo_4242"
    with background(["bash", str(job)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True) as proc:
        assert wait_for(lambda: (run_dir / "train.log").is_file() and "step 4:" in (run_dir / "train.log").read_text())
        proc.send_signal(signal.SIGUSR1)
        stdout, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, stdout[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "preempted at optimizer step" in (run_dir / "train.log").read_text()
    assert not (run_dir / ".requeue").exists() and not (run_dir / ".preempt").exists()
    ckpts = sorted(run_dir.glob("ckpt_*.pt"))
    assert ckpts
    env["EXTRA_ARGS"] = env["EXTRA_ARGS"].replace("--epochs 400", "--max_steps " + str(int(ckpts[-1].stem[5:]) + 2))
    res = subprocess.run(["bash", str(job)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"resumed from {run_dir} at step {int(ckpts[-1].stem[5:])}" in (run_dir / "train.log").read_text()


def test_sigusr1_to_the_trainer_itself(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    with background([sys.executable, "Generation/TrainGen/train.py", "--config", "config/tiny.yaml", "--mode", "seg",
                     "--data_dir", str(demo_root / "brain"), "--epochs", "400", "--run_dir", str(run_dir), "--set",
                     "runtime.log_interval=2", "--set", f"data.cache_dir={tmp_path / 'c'}", "--set",
                     "strategy.sample_steps=4"],
                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        assert wait_for(lambda: (run_dir / "train.log").is_file() and "step 4:" in (run_dir / "train.log").read_text())
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=60) == 0
    assert (run_dir / ".requeue").is_file() and list(run_dir.glob("ckpt_*.pt"))


def test_largest_fitting_batch_search():
    calls = []

    def fits(n):
        calls.append(n)
        return n <= 37
    assert largest_fitting(fits, start=8) == 37
    assert len(calls) < 12                                  # doubling then bisection, not a linear scan
    assert largest_fitting(lambda n: n <= 5000, limit=4096) == 4096
    assert with_margin(37) == 32 and with_margin(5) == 4 and with_margin(1) == 1


def test_batch_size_auto_needs_cuda(demo_root, tmp_path):
    res = run_script("Generation/TrainGen/train.py", "--config", "config/tiny.yaml", "--batch_size", "auto",
                     "--data_dir", str(demo_root / "brain"), "--run_dir", str(tmp_path / "r"), "--max_steps", "1",
                     "--set", "runtime.device=cpu", "--set", f"data.cache_dir={tmp_path / 'c'}")
    assert res.returncode == 2 and "--batch_size auto probes GPU memory and needs CUDA" in res.stderr
    bad = run_script("Generation/TrainGen/train.py", "--batch_size", "many")
    assert bad.returncode == 2 and "expected an integer or 'auto'" in bad.stderr


def test_benchmark_runs_on_cpu_and_writes_json(tmp_path):
    res = run_script("bench/benchmark.py", "--device", "cpu", "--preset", "ci", "--json", str(tmp_path / "b.json"),
                     timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    metrics = {(r["suite"], r["metric"]) for r in rows}
    for needed in [("training", "step-only ratio ours / tutorial"), ("training", "end-to-end ratio ours / tutorial"),
                   ("training", "MONAI tutorial step (same batch on device)"), ("training", "data path / step rate"),
                   ("sampling", "rflow euler-4"), ("sampling", "ddpm ddim-4"), ("sampling", "ddpm ddpm-8"),
                   ("sampling", "writing / sampling only"),
                   ("metrics", "FID features, Inception-v3"), ("data", "batches from cache"),
                   ("volumes", "pixel 32x32x16"), ("volumes", "latent (4x AE) 32x32x16")]:
        assert needed in metrics
    assert all(r["value"] is None or r["value"] > 0 for r in rows)
    memory = {r["metric"]: r["value"] for r in rows if r["metric"].endswith("memory")}
    # checkpointing and latents both keep less for the backward pass than pixel-space 3D training
    assert memory["pixel + checkpointing 32x32x16 memory"] < memory["pixel 32x32x16 memory"] / 4
    assert memory["latent (4x AE) 32x32x16 memory"] < memory["pixel 32x32x16 memory"] / 4
    assert "step-only ratio ours / tutorial" in res.stdout


def test_gpu_suite_runs_at_ci_size_on_cpu(tmp_path, monkeypatch):
    """bench/gpu_check.sh's own suite, on a CPU at the smallest size (compile rows are GPU-only)."""
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    from bench.benchmark import bench_gpu
    rows = {r["metric"]: r["value"] for r in bench_gpu("cpu", "ci", tmp_path)}
    assert rows["train ddpm, compile off"] > 0 and rows["train rflow, compile off: first step"] > 0
    assert rows["sampling ours / diffusers"] > 0
    assert rows["batch invariance: max |batch of 4 - one by one|"] == 0     # bit for bit on a CPU


def test_minsnr_suite_compares_both_settings(tmp_path, monkeypatch):
    """The Min-SNR side-by-side suite at a toy size: both settings trained, sampled and scored."""
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    from bench.benchmark import bench_minsnr
    rows = bench_minsnr("cpu", "ci", tmp_path, seeds=(0,))          # the ci preset's own 2 epochs
    assert [r["metric"].split(" ")[0] for r in rows] == ["mae", "psnr", "ms_ssim_quality", "ms_ssim_diversity",
                                                          "intensity_w1"]
    for r in rows:
        assert r["value"] > 0 and "on: " in r["note"] and "off " in r["note"]


def test_latent_3d_templates_chain_the_two_stages():
    env = {"MEDGEN_OUTPUT_ROOT": "/out", "MEDGEN_DATA_ROOT": "/data", "SLURM_JOB_ID": "9"}
    ae = dry_run(SLURM_DIR / "autoencoder_3d_bravo.slurm", **env)
    assert ae.endswith("train.py --stage autoencoder --mode bravo --config config/volume_128.yaml --epochs 100 "
                       "--batch_size 2 --compute cluster --run_dir /out/runs/autoencoder_3d_bravo_9 --resume auto")
    ld = dry_run(SLURM_DIR / "latent_3d_bravo.slurm", **env, AE_RUN="/out/runs/autoencoder_3d_bravo_8")
    assert "--latent /out/runs/autoencoder_3d_bravo_8" in ld and ld.endswith("--run_dir /out/runs/latent_3d_bravo_9 "
                                                                             "--resume auto")
