"""benchmarks/gpu_summary.py (the GPU suite's one JSON and table) and graph_check.py's verdict (issue 24):
a target is marked met or not from the parts' JSON as the real scripts write it, a missing part reads
"not run (why)", and graph_check fails when a variant meant to run as a CUDA graph ran eagerly."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    """A module of benchmarks/ by file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


summary = bench("gpu_summary")


def speed_row(workload: str, procs: int, each: float, *, mfu: float = 0.1, graph: bool = True) -> dict:
    """One summarised row as train_speed.py's summarise() writes it (batch 128)."""
    return {
        "workload": workload,
        "procs": procs,
        "ok": procs,
        "steps_per_s_each": each,
        "steps_per_cpu_s": each,
        "steps_per_s_total": each * procs,
        "img_per_s_total": each * procs * 128,
        "tflops": 1.0,
        "mfu": mfu,
        "peak_mib": 100.0,
        "warmup_s": 1.0,
        "setup_s": 1.0,
        "params": 1,
        "threads": 4,
        "data": "DeviceBatches",
        "graph": graph,
        "speed_log": "speed: ...",
        "runs": [],
    }


def graph_row(workload: str, variant: str, expects: bool, replays: int, rel: float = 0.0) -> dict:
    """One row as graph_check.py writes it."""
    cause = None if replays else "CUDA graph capture failed (RuntimeError: boom); running the static step eagerly"
    return {
        "workload": workload,
        "variant": variant,
        "expects_graph": expects,
        "planned_graph": expects,
        "captured": replays > 0,
        "steps": 40,
        "replays": replays,
        "cause": cause if expects else "static eager step (train.cuda_graph=false)",
        "data": "DeviceBatches",
        "max_abs_diff": rel,
        "max_rel_diff": rel,
        "bit_identical": rel == 0.0,
    }


def write_suite(
    folder: Path,
    *,
    device: str = "cuda",
    alone: float = 320.0,
    many_each: float = 120.0,
    vit_b_mfu: float = 0.56,
    graph_replays: int = 37,
    parts: str | None = None,
) -> None:
    """A suite folder: parts.tsv, graph_check.json and train_speed.json; backbones never recorded."""
    rows = [speed_row("cifar", 1, alone), speed_row("cifar", 4, many_each), speed_row("vit_b", 1, 3.0, mfu=vit_b_mfu)]
    speed = {"device": device, "peak_tflops": 800.0, "device_name": "NVIDIA H100", "smoke": False, "results": rows}
    (folder / "train_speed.json").write_text(json.dumps(speed))
    checks = [
        graph_row("quickstart", "graph, device data", True, graph_replays),
        graph_row("quickstart", "eager, device data", False, 0),
    ]
    ok = graph_replays > 0
    findings = [] if ok else ["quickstart, graph, device data: graph path did not run: CUDA graph capture failed"]
    check = {"device": device, "steps": 40, "ok": ok, "allow_eager": False, "findings": findings, "results": checks}
    (folder / "graph_check.json").write_text(json.dumps(check))
    default = "graph_check\t0\t30\t90\t\ntrain_speed\t0\t150\t190\t\npareto_l0\t-\t0\t3\tskipped: 3 s left of the 450 s budget\n"
    (folder / "parts.tsv").write_text(default if parts is None else parts)


def find(report: dict, start: str) -> dict:
    return next(c for c in report["checks"] if c["check"].startswith(start))


def test_targets_met_and_unmet(tmp_path):
    # alone 320 >= 300: met; 4 at once 4 x 120 = 480 = 1.5x alone: met; MFU 56% >= 55%: met
    write_suite(tmp_path)
    report, table = summary.summarise(tmp_path, 450)
    assert find(report, "CIFAR pixel ViT alone")["met"] == "yes"
    assert find(report, "CIFAR pixel ViT, several")["met"] == "yes"
    assert "1.50x" in find(report, "CIFAR pixel ViT, several")["measured"]
    assert find(report, "ViT-B/2 MFU")["met"] == "yes"
    assert find(report, "CUDA graph path")["met"] == "yes"
    assert find(report, "train_speed runs replay")["met"] == "yes"
    # just under each target: not met
    write_suite(tmp_path, alone=299.0, many_each=299.0 * 1.49 / 4, vit_b_mfu=0.549, graph_replays=0)
    report, table = summary.summarise(tmp_path, 450)
    for start in ("CIFAR pixel ViT alone", "CIFAR pixel ViT, several", "ViT-B/2 MFU", "CUDA graph path"):
        assert find(report, start)["met"] == "NO", start
    assert "0/1 graph variants replayed" in find(report, "CUDA graph path")["measured"]
    assert "| NO |" in table


def test_eager_train_speed_row_fails_the_graph_check(tmp_path):
    write_suite(tmp_path)
    speed = json.loads((tmp_path / "train_speed.json").read_text())
    speed["results"][2]["graph"] = False
    (tmp_path / "train_speed.json").write_text(json.dumps(speed))
    row = find(summary.summarise(tmp_path)[0], "train_speed runs replay")
    assert row["met"] == "NO" and "eager: vit_b x1" in row["measured"]


def test_missing_and_skipped_parts_read_not_run(tmp_path):
    write_suite(tmp_path)
    report, table = summary.summarise(tmp_path, 450)
    backbone = find(report, "backbone alone, eager: vit_b")
    assert backbone["met"] == "info" and backbone["measured"].startswith("not run (no record")
    assert (
        find(report, "Pareto objective (eq. 11, lambda 0)")["measured"]
        == "not run (skipped: 3 s left of the 450 s budget)"
    )
    assert report["parts"]["backbones"]["status"].startswith("not run")
    assert "| pareto_l0 | not run (skipped: 3 s left of the 450 s budget) |" in table
    # a part that ran but stopped at its limit before writing its JSON
    write_suite(tmp_path, parts="graph_check\t0\t30\t90\t\ntrain_speed\t124\t190\t190\t\n")
    (tmp_path / "train_speed.json").unlink()
    report, _ = summary.summarise(tmp_path)
    assert report["parts"]["train_speed"]["status"] == "stopped at its 190 s limit"
    for start in ("CIFAR pixel ViT alone", "ViT-B/2 MFU"):
        assert find(report, start)["met"].startswith("not run (train_speed stopped at its 190 s limit")
    # a row train_speed.py skipped for its budget
    write_suite(tmp_path)
    speed = json.loads((tmp_path / "train_speed.json").read_text())
    speed["results"][2] = {"workload": "vit_b", "procs": 1, "error": "skipped: 175 s budget spent"}
    (tmp_path / "train_speed.json").write_text(json.dumps(speed))
    assert find(summary.summarise(tmp_path)[0], "ViT-B/2 MFU")["met"] == "not run (skipped: 175 s budget spent)"


def test_cpu_numbers_meet_no_target(tmp_path):
    write_suite(tmp_path, device="cpu", alone=1.0, graph_replays=0)
    report, _ = summary.summarise(tmp_path)
    targets = [c for c in report["checks"] if c["met"] != "info"]
    assert len(targets) == 5 and {c["met"] for c in targets} == {"n/a on cpu"}


def test_main_merges_every_part_into_one_json(tmp_path, capsys):
    write_suite(tmp_path)
    models = {"device": "cuda", "dtype": "bf16", "batch": 256, "results": [{"images_per_s": 2000.0, "mfu": 0.4}]}
    (tmp_path / "vit_b.json").write_text(json.dumps(models))
    with (tmp_path / "parts.tsv").open("a") as f:
        f.write("backbones\t0\t20\t35\t\n")
    assert summary.main([str(tmp_path), "--budget", "450"]) == 0
    merged = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert merged["budget_s"] == 450 and merged["total_s"] == 30 + 150 + 20
    assert merged["parts"]["train_speed"]["rc"] == 0 and merged["parts"]["train_speed"]["seconds"] == 150
    speed = json.loads((tmp_path / "train_speed.json").read_text())
    assert merged["parts"]["train_speed"]["results"]["train_speed.json"] == speed
    assert merged["parts"]["backbones"]["results"]["vit_b.json"] == models
    assert merged["parts"]["backbones"]["results"]["vit_xl.json"] is None
    assert "machine" in merged and list(merged["parts"]) == list(summary.PARTS)
    out = capsys.readouterr().out
    assert "| check | target | measured | met |" in out and "2000 img/s at batch 256 (bf16), MFU 40.0%" in out
    assert find(merged, "backbone alone, eager: vit_xl")["measured"].startswith("not run (backbones ok, no vit_xl.json")


# ---- graph_check's verdict -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_check():
    return bench("graph_check")


def test_verdict_fails_when_a_graph_variant_ran_eagerly(graph_check):
    rows = [
        {**graph_row("cifar", "graph, device data", True, 37), "max_rel_diff": 0.0},
        {**graph_row("cifar", "eager, device data", False, 0), "max_rel_diff": 1e-6},
        {**graph_row("cifar", "graph, host loader", True, 0), "max_rel_diff": 0.0},
    ]
    ok, findings = graph_check.verdict(rows, allow_eager=False)
    assert not ok
    assert findings == [
        "cifar, graph, host loader: graph path did not run: CUDA graph capture failed (RuntimeError: boom); "
        "running the static step eagerly"
    ]
    ok, findings = graph_check.verdict(rows, allow_eager=True)  # the CPU smoke: passes, still says so
    assert ok and len(findings) == 1 and findings[0].endswith("(allowed by --allow-eager)")
    rows[2]["replays"] = 37
    assert graph_check.verdict(rows, allow_eager=False) == (True, [])


def test_verdict_fails_on_a_mismatch_or_a_failed_run_even_allowing_eager(graph_check):
    rows = [graph_row("vit_b", "graph, host loader", True, 0), graph_row("vit_b", "eager, host loader", False, 0, 2e-4)]
    ok, findings = graph_check.verdict(rows, allow_eager=True)
    assert not ok and "MISMATCH" in findings[-1] and "vit_b, eager, host loader" in findings[-1]
    rows = [
        {"workload": "vit_b", "variant": "graph, host loader", "expects_graph": True, "error": "OutOfMemoryError: x"}
    ]
    ok, findings = graph_check.verdict(rows, allow_eager=True)
    assert not ok and findings == ["vit_b, graph, host loader: run failed (OutOfMemoryError: x)"]


def test_graph_path_counts_replays_after_the_warmup(graph_check):
    train = SimpleNamespace(grad_accum=1, cuda_graph=True, compile=False, compile_mode="default")
    static = SimpleNamespace(calls=40, warmup=3, graph=object())
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(train=train), static=static, device=SimpleNamespace(type="cuda"), world=1
    )
    row = graph_check.graph_path(trainer, [])
    assert row == {"planned_graph": True, "captured": True, "steps": 40, "replays": 37, "cause": None}
    static.graph, static.calls = None, 3  # planned, but the run ended before the capture
    row = graph_check.graph_path(trainer, [])
    assert row["replays"] == 0 and row["cause"].startswith("capture not reached: 3 steps")
    train.cuda_graph = False
    assert graph_check.graph_path(trainer, [])["cause"] == "static eager step (train.cuda_graph=false)"


def test_capture_failure_is_the_cause(graph_check, tmp_path):
    """A real (CPU) Trainer whose capture raises: StaticStep falls back to eager and logs why; graph_check's
    log wrapper keeps that line and reports it as the cause, and the verdict fails."""
    from minsnr.config import load_config
    from minsnr.train import Trainer

    sets = ["model.args={patch_size: 2, depth: 1, width: 16, num_heads: 2}", "train.batch_size=8", "train.steps=6"]
    sets += ["log.preview_every=0", "log.tensorboard=false", "checkpoint.every=0", "train.device=cpu"]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [*sets, f"run_dir={tmp_path}", "resume=never"])
    trainer = Trainer(cfg)
    assert trainer.static is not None and not trainer.static.capture  # the CPU plans no graph

    def boom() -> None:
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    trainer.static.capture, trainer.static._capture = True, boom  # as if on CUDA with an op that cannot be captured
    failures = graph_check.watch_capture(trainer)
    trainer.run()
    row = graph_check.graph_path(trainer, failures)
    assert row["captured"] is False and row["replays"] == 0 and row["steps"] == 6
    assert row["cause"].startswith("CUDA graph capture failed (RuntimeError: operation not permitted when stream")
    assert "second line" not in row["cause"]
    ok, findings = graph_check.verdict(
        [{"workload": "quickstart", "variant": "graph", "expects_graph": True, **row}], allow_eager=False
    )
    assert not ok and findings[0].startswith("quickstart, graph: graph path did not run: CUDA graph capture failed")
