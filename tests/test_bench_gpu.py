"""The GPU measurement script (training/bench/gpu.py) in its reduced CPU size: every part runs and reports."""

import json

import pytest


def test_reduced_run_measures_both_taps_and_every_distillation_variant(tmp_path, capsys):
    from training.bench import gpu as bench_gpu

    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--reduced", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["reduced"] is True
    assert [r["method"] for r in result["bridge"]] == ["features", "image", "round_trip"]
    assert all(r["fwd_bwd_s"] > 0 and r["flops_fwd_bwd"] > 0 for r in result["bridge"])
    variants = [(r["gradient_checkpointing"], r["student_lora_rank"] > 0) for r in result["distill"]]
    assert variants == [(False, False), (True, False), (False, True), (True, True)]
    for r in result["distill"]:
        assert r["step_s"] > 0 and r["peak_memory_gb"] > 0 and 0 < r["non_teacher_share"] < 1
    text = capsys.readouterr().out
    assert "round trip / features" in text and "outside teacher" in text and "bench_gpu done" in text


def test_real_size_needs_cuda(capsys):
    import torch

    from training.bench import gpu as bench_gpu

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert bench_gpu.main([]) == 2
    assert "error: No CUDA device" in capsys.readouterr().err


def test_reduced_run_measures_a_users_runs_with_the_estimator_beside(tmp_path, capsys):
    """Part 3: both teachers (Flux-dev with fp8 storage and checkpointing) x both taps, loading and run peaks, s/step;
    the estimator's column is "n/a" until training/memory.py exists."""
    from training.bench import gpu as bench_gpu

    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--reduced", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["memory"]
    assert [(r["teacher"], r["tap"]) for r in rows] == [("sd35_medium", "image"), ("sd35_medium", "features"),
                                                        ("flux_dev", "image"), ("flux_dev", "features")]
    assert [r["settings"]["teacher_storage"] for r in rows] == ["bf16", "bf16", "fp8", "fp8"]
    for r in rows:
        assert r["step_s"] > 0 and r["nan_steps"] == 0 and r["batch"] == 2
        assert 0 < r["loading_allocated_gib"] <= r["allocated_gib"] and r["reserved_gib"] >= r["allocated_gib"]
    text = capsys.readouterr().out
    assert "ratio = measured / estimated" in text
    try:
        import training.memory  # noqa: F401
    except ImportError:
        assert all(r["estimate"] is None for r in rows) and "n/a" in text
