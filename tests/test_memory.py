"""The memory estimator, the plan chooser and the preflight (training/memory.py) on the tiny and mid-size worlds of the
real model classes. Fake-tensor profiles take about a minute each on one core: the tests share them (the module's
in-process cache) and use few."""

import subprocess
import sys
from dataclasses import replace

import pytest

from training import memory
from training.errors import UserError
from training.memory import MemorySettings, choose_plan, estimate, preflight

TINY = MemorySettings(teacher="tiny", batch_size=2, resolution=64, device="cpu")
TINY_CUDA = replace(TINY, device="cuda")
STEP_PHASES = ("student_step", "fake_update", "optimizer_step")


def step_peak(e) -> float:
    return max(e.allocated[p] for p in STEP_PHASES)


def test_module_imports_nothing_heavy():
    code = "import sys, training.memory; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_estimates_are_sane_and_move_the_right_way():
    base = estimate(TINY)
    assert set(base.phases) == {"loading", "encoding", "student_step", "fake_update", "optimizer_step", "saving"}
    assert all(v > 0 for v in base.allocated.values())
    # the step holds the loaded weights plus optimizer states and activations
    assert base.allocated["student_step"] > base.allocated["saving"] > base.allocated["loading"]
    # activations grow with the batch; accumulation brings the micro-batch's back
    b4 = estimate(replace(TINY, batch_size=4))
    assert b4.allocated["student_step"] > base.allocated["student_step"]
    ga = estimate(replace(TINY, batch_size=4, gradient_accumulation=2))
    assert ga.allocated["student_step"] == pytest.approx(base.allocated["student_step"])
    # checkpointing and a student LoRA lower the step's peak
    ckpt = estimate(replace(TINY, gradient_checkpointing=True))
    assert step_peak(ckpt) < step_peak(base)
    lora = estimate(replace(TINY, gradient_checkpointing=True, student_lora_rank=4))
    assert step_peak(lora) < step_peak(ckpt)
    # CUDA's analytic options: fp8 storage, then offload, lower the resident teacher (sizes of a 24-block teacher:
    # the tiny one has 2 blocks, which offload cannot thin); 8-bit AdamW lowers the states
    sizes = {"teacher": 4 * 2**30, "teacher_blocks": int(3.8 * 2**30), "teacher_max_block": 2**30 // 6,
             "teacher_max_layer": 2**30 // 25}
    bf16, _ = memory._teacher_resident(TINY_CUDA, sizes)
    fp8, _ = memory._teacher_resident(replace(TINY_CUDA, teacher_storage="fp8"), sizes)
    off, _ = memory._teacher_resident(replace(TINY_CUDA, teacher_storage="fp8", teacher_offload=True), sizes)
    assert bf16 == sizes["teacher"] and off < fp8 < bf16 and fp8 == sizes["teacher"] // 2 + sizes["teacher_max_layer"]
    cuda = estimate(TINY_CUDA)
    bit8 = estimate(replace(TINY_CUDA, optimizer="adamw8bit"))
    assert bit8.allocated["student_step"] < cuda.allocated["student_step"]
    # the device figure adds the CUDA context and the allocator's slack
    assert cuda.phases["loading"] == pytest.approx(memory.ALLOCATOR_SLACK * cuda.allocated["loading"]
                                                   + memory.CUDA_CONTEXT_GIB)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(UserError, match="gradient_accumulation must be a positive divisor"):
        estimate(replace(TINY, gradient_accumulation=3))
    with pytest.raises(ValueError, match="Unknown teacher"):
        estimate(replace(TINY, teacher="sdxl"))
    with pytest.raises(UserError, match="--memory must be auto, check, off or a positive number"):
        memory.parse_memory("lots")
    assert memory.parse_memory("22") == 22.0 and memory.parse_memory("auto") == "auto"


def test_validate_estimate_within_10_percent_of_a_real_cpu_step():
    """The estimate of a mid-size step (batch 4: extrapolated from the measured micro-batches 1 and 2) against the
    real Distiller's step on real tensors, both counted by MemTracker."""
    s = MemorySettings(teacher="mid", batch_size=4, resolution=128, device="cpu", gradient_checkpointing=True)
    out = memory.validate(s, log=lambda *_: None)
    assert out["measured_gib"] > 0.05  # activations dominate: well above the mid world's weights (~17 MiB)
    assert abs(out["ratio"] - 1) <= 0.10, out


def test_plan_chosen_for_a_small_budget_runs_under_it():
    """A budget between what checkpointing alone and checkpointing + a student LoRA need: the chooser picks the
    latter, and the real step with those settings stays under the budget."""
    features = {"gradient_checkpointing", "student_lora"}
    ckpt = estimate(replace(TINY, gradient_checkpointing=True))
    lora = estimate(replace(TINY, gradient_checkpointing=True, student_lora_rank=64))
    assert lora.peak_gib < ckpt.peak_gib
    budget = (lora.peak_gib + ckpt.peak_gib) / 2
    plan, tried = choose_plan(TINY, budget, features)
    assert plan.fits and plan.settings.gradient_checkpointing and plan.settings.student_lora_rank == 64
    assert [p.fits for p in tried] == [False, False, True] and plan.cost > 0
    measured = memory.measure_distill_step(plan.settings)["peak_gib"]
    assert measured + memory.HOST_OVERHEAD_GIB <= budget
    assert measured == pytest.approx(step_peak(plan.estimate), rel=0.10)


def test_preflight_passes_refuses_or_plans(monkeypatch):
    lines = []
    assert preflight(TINY, 1000.0, log=lines.append) is None and "fits" in lines[-1]
    # nothing fits: one line with the estimate, the budget and the way out
    with pytest.raises(UserError) as e:
        preflight(TINY, 0.001, log=lines.append)
    msg = str(e.value)
    assert "\n" not in msg and "estimated peak" in msg and "0.0 GiB given by --memory" in msg
    assert "--memory off" in msg
    # check: refuses and names the settings that would fit
    need = estimate(TINY).peak_gib
    fit = estimate(replace(TINY, gradient_checkpointing=True, student_lora_rank=64)).peak_gib
    monkeypatch.setattr(memory, "free_memory_gib", lambda device: ((need + fit) / 2, "available host RAM"))
    with pytest.raises(UserError, match="settings that fit: gradient checkpointing on"):
        preflight(TINY, "check", features={"gradient_checkpointing", "student_lora"})
    # auto: returns the plan and says so
    plan = preflight(TINY, "auto", features={"gradient_checkpointing", "student_lora"}, log=lines.append)
    assert plan is not None and plan.fits and "plan:" in lines[-1]
    # off: nothing is estimated
    monkeypatch.setattr(memory, "estimate", lambda *a, **k: pytest.fail("estimated with --memory off"))
    assert preflight(TINY, "off") is None


def test_distill_command_applies_and_prints_the_plan(tmp_path, monkeypatch, capsys):
    """`distill --demo --memory GiB`: the preflight runs before any model loads and writes its plan onto the config."""
    from training.models import assemble
    from training.run import main

    def stop(*args, **kwargs):
        raise RuntimeError("models would load here")

    monkeypatch.setattr(assemble, "demo_distill_models", stop)
    need = estimate(replace(TINY, tap=memory._bridge_tap(assemble.DEMO_BRIDGE))).peak_gib
    with pytest.raises(RuntimeError, match="models would load here"):
        main(["distill", "--demo", "--out", str(tmp_path / "run"), "--memory", f"{need * 0.999:.4f}"])
    out = capsys.readouterr().out
    assert "Memory: the requested settings need about" in out and "plan: gradient checkpointing on" in out
    # and --memory off does not look
    monkeypatch.setattr(memory, "estimate", lambda *a, **k: pytest.fail("estimated with --memory off"))
    with pytest.raises(RuntimeError, match="models would load here"):
        main(["distill", "--demo", "--out", str(tmp_path / "run2"), "--memory", "off"])


def test_preflight_applies_the_plan_to_config_and_args():
    from types import SimpleNamespace

    from training.distill import DistillConfig

    cfg = DistillConfig(out_dir="x", prompts=["a"])
    args = SimpleNamespace()
    plan = memory.Plan(replace(TINY, gradient_checkpointing=True, student_lora_rank=64, gradient_accumulation=2,
                               teacher_storage="fp8", optimizer="adamw8bit", teacher_offload=True), None, 1.0, [], True)
    memory.apply_plan(plan, cfg, args)
    assert cfg.gradient_checkpointing and cfg.student_lora_rank == 64
    assert args.gradient_accumulation == 2 and args.teacher_storage == "fp8" and args.optimizer == "adamw8bit"
    assert args.teacher_offload is True
