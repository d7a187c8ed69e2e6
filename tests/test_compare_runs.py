"""`minsnr compare` end to end on tiny runs: common random numbers, a killed comparison resuming to the
same numbers, divergence reported as a result, a changed config refused."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import minsnr.checkpoint as ck
import minsnr.data.loader as loader
import minsnr.evaluate.periodic as periodic
import minsnr.run as run_module
from minsnr.compare import cli, worker
from minsnr.compare.presets import Settings, run_config, run_folder, run_matrix
from minsnr.compare.runner import _flatten
from minsnr.config import dump_yaml, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "configs" / "compare" / "cpu.yaml"
TINY = [
    "model.args={patch_size: 2, depth: 2, width: 32, num_heads: 2}",
    "train.batch_size=16",
    "log.every=2",
    "log.eval_every=4",
    "log.eval_num=20",
    "log.preview_every=0",
    "checkpoint.every=10",
    "checkpoint.keep=3",
    "optim.warmup_steps=2",
    "ema.decay=0.9",
    "sample.steps=2",
]


def test_runs_see_the_same_randomness_and_differ_only_in_the_loss(tmp_path, monkeypatch, classifier):
    base = load_config(CPU, [*TINY, f"run_dir={tmp_path}", "train.steps=6", "log.eval_every=2", "train.grad_accum=2"])
    specs = run_matrix(Settings(targets=["x0", "v"]), base.loss.gamma)
    assert [s.name for s in specs] == ["x0_const", "x0_min_snr", "v_plain", "v_min_snr"]
    rec: dict[str, dict] = {}
    current = {"run": ""}

    real_build = run_module.build_model

    def build(cfg):
        model = real_build(cfg)
        r = rec[current["run"]]

        def pre(module, args):  # what the network sees: x_t, t, labels after dropout
            if module.training:
                if r["init"] is None:
                    r["init"] = {k: v.clone() for k, v in module.state_dict().items()}
                r["inputs"].append([a.clone() for a in args[:3]])

        model.register_forward_pre_hook(pre)
        return model

    real_next = loader.Batches.__next__

    def next_batch(self):
        x, labels = real_next(self)
        rec[current["run"]]["batches"].append((x.clone(), labels.clone()))
        return x, labels

    real_sample = periodic.sample_images

    def sample(model, cfg, labels, num, seed, **kw):
        rec[current["run"]]["sampler"].append((None if labels is None else labels.tolist(), num, seed))
        return real_sample(model, cfg, labels, num, seed, **kw)

    monkeypatch.setattr(run_module, "build_model", build)
    monkeypatch.setattr(loader.Batches, "__next__", next_batch)
    monkeypatch.setattr(periodic, "sample_images", sample)
    for spec in specs:
        cfg = run_config(base, spec, tmp_path, classifier, threads=1, metric="fid_cls")
        path = tmp_path / f"{spec.name}.yaml"
        dump_yaml(cfg, path)
        current["run"] = spec.name
        rec[spec.name] = {"init": None, "inputs": [], "batches": [], "sampler": []}
        assert worker.main([str(path), "--bin-images", "50"]) == 0  # the subprocess's code, in this process
        changed = {k for k, v in _flatten(to_dict(cfg)).items() if _flatten(to_dict(base))[k] != v}
        assert changed <= {
            "run_dir",
            "loss.target",
            "loss.weighting",
            "loss.gamma",
            "log.eval_classifier",
            "train.threads",
            "loss.timesteps",
            "log.eval_metric",
        }

    first = rec["x0_const"]
    assert len(first["inputs"]) == 12 and len(first["sampler"]) == 3 * 2  # 6 steps x 2 micro-batches; 3 evals
    for name in ["x0_min_snr", "v_plain", "v_min_snr"]:
        r = rec[name]
        for key in first["init"]:
            assert torch.equal(first["init"][key], r["init"][key]), f"{name}: initial {key} differs"
        assert len(r["batches"]) == len(first["batches"]) and len(r["inputs"]) == len(first["inputs"])
        for (xa, la), (xb, lb) in zip(first["batches"], r["batches"]):
            assert torch.equal(xa, xb) and torch.equal(la, lb), f"{name}: another batch"
        for (xa, ta, ya), (xb, tb, yb) in zip(first["inputs"], r["inputs"]):
            # same timesteps and label drops, and the same x_t = alpha x0 + sigma noise from the same batch:
            # the same noise
            assert torch.equal(ta, tb) and torch.equal(ya, yb) and torch.equal(xa, xb), f"{name}: other randomness"
        assert r["sampler"] == first["sampler"], f"{name}: evaluation with other labels or noise seeds"
    drops = torch.cat([y for _, _, y in first["inputs"]]) == 10
    assert 0 < int(drops.sum()) < len(drops)  # label dropout happened, identically everywhere
    a, b = (
        ck.load_checkpoint(run_folder(tmp_path, 0, n) / "checkpoints" / "latest.pt")["model"]
        for n in ("x0_const", "x0_min_snr")
    )
    assert any(not torch.equal(a[k], b[k]) for k in a), "the weighting changed nothing"
    metrics = [
        [json.loads(line) for line in (run_folder(tmp_path, 0, s.name) / "metrics.jsonl").read_text().splitlines()]
        for s in specs
    ]
    assert all([m["step"] for m in ms if "fid_cls" in m] == [2, 4, 6] for ms in metrics)


def _compare_args(run_dir: Path, classifier: str, steps: int) -> list[str]:
    return [
        str(CPU),
        *TINY,
        f"run_dir={run_dir}",
        f"train.steps={steps}",
        "--targets",
        "x0",
        "--classifier",
        classifier,
        "--jobs",
        "2",
        "--eval-every",
        "10",
        "--bin-images",
        "100",
    ]


def test_killed_comparison_resumes_to_the_same_numbers(tmp_path, classifier):
    steps = 120
    assert cli.main(_compare_args(tmp_path / "ref", classifier, steps)) == 0  # uninterrupted
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "minsnr", "compare", *_compare_args(killed, classifier, steps)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpts = [run_folder(killed, 0, n) / "checkpoints" / "step_000000010.pt" for n in ("x0_const", "x0_min_snr")]
    deadline = time.time() + 300
    while not any(p.exists() for p in ckpts) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the comparison and its runs, as a crash would
    proc.wait()
    statuses = [run_folder(killed, 0, n) / worker.STATUS for n in ("x0_const", "x0_min_snr")]
    assert any(p.exists() for p in ckpts) and not all(p.exists() for p in statuses), "the kill landed too late"
    assert cli.main(_compare_args(killed, classifier, steps)) == 0  # the same command continues
    a = json.loads((tmp_path / "ref" / "compare.json").read_text())["report"]["runs"]
    b = json.loads((killed / "compare.json").read_text())["report"]["runs"]
    assert [r["name"] for r in a] == [r["name"] for r in b] == ["x0_const", "x0_min_snr"]
    for ra, rb in zip(a, b):
        sa, sb = ra["seeds"][0], rb["seeds"][0]
        assert sa["steps"] == sb["steps"] == list(range(10, steps + 1, 10))
        assert sa["values"] == sb["values"] and sa["cls_acc"] == sb["cls_acc"], ra["name"]
        assert sa["bin_mse"] == sb["bin_mse"] and ra["race"] == rb["race"]
    assert len(set(np.round(a[0]["seeds"][0]["values"], 6))) > 1  # the scores did move


def test_divergence_is_a_result_and_a_changed_config_is_refused(tmp_path, classifier, capsys):
    # max_snr with gamma 3e38 overflows the float32 loss at the first step; const trains normally
    args = [
        str(CPU),
        *TINY,
        f"run_dir={tmp_path}",
        "train.steps=4",
        "--targets",
        "x0",
        "--weightings",
        "max_snr:3e38,baseline",
        "--classifier",
        classifier,
        "--jobs",
        "1",
        "--bin-images",
        "100",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    runs = {r["name"]: r for r in json.loads((tmp_path / "compare.json").read_text())["report"]["runs"]}
    bad = runs["x0_max_snr_g3e+38"]["seeds"][0]
    assert bad["status"] == "diverged" and bad["status_step"] == 1 and bad["values"] == []
    assert runs["x0_const"]["seeds"][0]["status"] == "finished" and runs["x0_const"]["seeds"][0]["steps"] == [4]
    assert "diverged seed0/x0_max_snr_g3e+38 at step 1" in out and "1 diverged at 1" in out and "1 finished" in out
    session = json.loads((tmp_path / "compare.json").read_text())["sessions"][-1]
    assert (
        session["runs"] == ["seed0/x0_max_snr_g3e+38", "seed0/x0_const"] and session["cpu_s"] > 1
    )  # the runs' CPU time
    assert cli.main(args) == 0  # nothing left to train: both reused
    out = capsys.readouterr().out
    assert "seed0/x0_max_snr_g3e+38: diverged earlier" in out and "seed0/x0_const: finished earlier" in out
    assert "started" not in out
    assert cli.main([*args, "--report-only"]) == 0 and "1 diverged at 1" in capsys.readouterr().out
    assert cli.main([*args, f"run_dir={tmp_path / 'none'}", "--report-only"]) == 2
    assert "nothing to report" in capsys.readouterr().err
    assert cli.main([*args, "optim.lr=0.5"]) == 2
    assert "optim.lr: 0.001 -> 0.5" in capsys.readouterr().err
    assert cli.main([*args, "train.steps=2"]) == 2
    assert "may grow, not shrink" in capsys.readouterr().err
    assert cli.main([*args, "--seeds", "0"]) == 2
    assert "--seeds 0: give at least 1" in capsys.readouterr().err
    assert cli.main([*args, "--metric", "bpd"]) == 2  # the runs were scored on fid_cls
    assert "scores with 'fid_cls', not 'bpd'" in capsys.readouterr().err
    with (tmp_path / "compare.lock").open("w") as lock:  # as a second comparison on the folder would
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert cli.main(args) == 2
    assert "another minsnr compare is running" in capsys.readouterr().err


def test_a_run_stops_and_saves_when_its_comparison_dies(tmp_path, classifier):
    base = load_config(CPU, [*TINY, f"run_dir={tmp_path}", "train.steps=100000", "checkpoint.every=100000"])
    spec = run_matrix(Settings(targets=["x0"]), None)[0]
    cfg = run_config(base, spec, tmp_path, classifier, threads=1, metric="fid_cls")
    folder = run_folder(tmp_path, 0, spec.name)
    folder.mkdir(parents=True)
    dump_yaml(cfg, folder / "config.yaml")
    parent = (
        "import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-m', 'minsnr.compare.worker', "
        f"{str(folder / 'config.yaml')!r}, '--parent', str(os.getpid())]); print(p.pid, flush=True); "
        "time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    run = int(proc.stdout.readline())
    metrics = folder / "metrics.jsonl"
    status = folder / worker.STATUS
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
            time.sleep(0.1)
        proc.kill()  # SIGKILL: the comparison cannot tell its runs anything
        proc.wait()
        deadline = time.time() + 120
        while not status.exists() and time.time() < deadline:
            time.sleep(0.1)
    finally:
        try:
            os.kill(run, signal.SIGKILL)  # the run, if it outlived its comparison (the failure this test catches)
        except ProcessLookupError:
            pass
    assert status.exists(), "the run kept training after its comparison died"
    state = json.loads(status.read_text())
    assert state["state"] == "stopped" and 0 < state["step"] < 100000
    saved = ck.load_checkpoint(folder / "checkpoints" / "latest.pt")
    assert saved["step"] == state["step"]  # it saved where it stopped: a rerun continues from there
