"""Shared training pieces: per-step generators, NaN guard, metrics log, stop/interrupt, progress, grids."""

import itertools
import json
import os
import signal
import threading

import pytest
import torch
from PIL import Image

from training import loop


def test_step_generator_is_deterministic_and_distinct():
    def draw(*a):
        return torch.randn(4, generator=loop.step_generator(*a))

    assert torch.equal(draw(1, 5, 0), draw(1, 5, 0))
    samples = [draw(1, 5, 0), draw(2, 5, 0), draw(1, 6, 0), draw(1, 5, 1)]
    for i in range(len(samples)):
        for j in range(i + 1, len(samples)):
            assert not torch.equal(samples[i], samples[j])
    assert loop.step_generator(0, 0).initial_seed() < 2**63


def test_nan_guard_skips_then_stops():
    guard = loop.NaNGuard(max_consecutive=3)
    assert guard.check(torch.tensor(1.0))
    assert not guard.check(torch.tensor(float("nan")))
    assert not guard.check(float("inf"))
    assert guard.check(0.5)  # a finite value resets the run
    assert guard.consecutive == 0 and guard.skipped_total == 2
    assert not guard.check(float("nan")) and not guard.check(float("nan"))
    with pytest.raises(loop.TrainingDiverged, match=r"3 steps in a row.*learning rate.*mixed_precision"):
        guard.check(torch.tensor([1.0, float("nan")]))
    assert guard.skipped_total == 5


def test_jsonl_logger_appends_and_converts(tmp_path):
    import numpy as np

    path = tmp_path / "sub" / "metrics.jsonl"
    loop.JsonlLogger(path).log({"step": 1, "loss": torch.tensor(0.25), "n": np.float32(2.0),
                                "val": {"a": torch.tensor([1.0, 2.0])}})
    loop.JsonlLogger(path).log({"step": 2})  # a resumed run appends
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.25, "n": 2.0, "val": {"a": [1.0, 2.0]}}, {"step": 2}]


def test_stop_flag_and_graceful_interrupt():
    stop = loop.StopFlag()
    old = signal.getsignal(signal.SIGINT)
    with loop.graceful_interrupt(stop):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is old
    stop.clear()
    assert not stop.is_set()

    # In a worker thread (ComfyUI) nothing is installed and nothing fails.
    seen = []

    def worker():
        with loop.graceful_interrupt(stop):
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [old]


def test_progress_reporter_calls_back_and_propagates(tmp_path):
    calls = []
    grid = loop.save_image_grid(torch.rand(2, 3, 8, 8), tmp_path / "g.png")
    rep = loop.ProgressReporter(total=5, disable=True, callback=lambda *a: calls.append(a))
    rep.start(2)
    rep.update(3, {"loss": torch.tensor(0.5), "lr": 1e-4})
    rep.update(4, {}, preview=grid)  # a saved grid's path arrives as a PIL image
    rep.close()
    assert [c[:3] for c in calls] == [(3, 5, {"loss": torch.tensor(0.5), "lr": 1e-4}), (4, 5, {})]
    assert calls[0][3] is None and isinstance(calls[1][3], Image.Image)

    class Cancelled(Exception):
        pass

    def cancel(*a):
        raise Cancelled

    rep = loop.ProgressReporter(total=3, callback=cancel, disable=True)
    with pytest.raises(Cancelled):
        rep.update(1, {"loss": 1.0})


def test_lr_schedule_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = loop.lr_schedule(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in itertools.pairwise(lrs[4:])) and lrs[-1] < 0.05


def test_accelerator_is_full_precision_on_cpu():
    accel = loop.make_accelerator("auto")
    assert accel.mixed_precision == "no" and accel.device.type == "cpu"
    with accel.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_image_grid_layout_resizing_and_labels(tmp_path):
    small = torch.zeros(3, 3, 8, 8)
    small[:, 0] = 1.0  # red
    big = torch.ones(3, 3, 16, 16)  # white
    img = loop.grid_image([small, big])
    assert img.size == (3 * 18 + 2, 2 * 18 + 2)
    assert img.getpixel((2, 2)) == (255, 0, 0) and img.getpixel((17, 17)) == (255, 0, 0)  # upscaled to 16 px
    labelled = loop.grid_image([small, big], labels=["student", "teacher"])
    assert labelled.size[0] > img.size[0] and labelled.size[1] == img.size[1]
    margin = labelled.size[0] - img.size[0]
    assert any(labelled.getpixel((x, y)) != (255, 255, 255) for x in range(margin) for y in range(18))  # text

    path = loop.save_image_grid(torch.rand(2, 3, 8, 8), tmp_path / "out" / "grid.png", labels=["one row"])
    assert path == str(tmp_path / "out" / "grid.png")
    assert Image.open(path).size[1] == 8 + 4
    assert os.listdir(tmp_path / "out") == ["grid.png"]  # no temp file left behind

    with pytest.raises(ValueError, match="same number of images"):
        loop.grid_image([torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)])
    with pytest.raises(ValueError, match="one label per grid row"):
        loop.grid_image(torch.rand(2, 3, 8, 8), labels=["a", "b"])
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        loop.grid_image(torch.rand(3, 8, 8))


def test_no_heavy_imports_at_module_level():
    import subprocess
    import sys

    code = ("import sys; import training.loop, training.state; "
            "print([m for m in ('diffusers', 'transformers', 'PIL') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


def test_jsonl_logger_drops_lines_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = loop.JsonlLogger(path)
    for step in (1, 2, 3, 4):
        log.log({"step": step, "loss": float(step)})
    loop.JsonlLogger(path, resume_step=2).log({"step": 3, "loss": 30.0})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_cpu_flag_keeps_training_off_cuda_even_where_cuda_exists(monkeypatch):
    """ComfyUI started with --cpu on a CUDA machine: the trainers must load and train on the CPU in fp32."""
    from training import loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loop.default_device() == "cuda"
    assert loop.default_device(cpu=True) == "cpu"
    accel = loop.make_accelerator("auto", cpu=True)
    assert accel.device.type == "cpu" and accel.mixed_precision == "no"
