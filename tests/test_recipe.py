"""The measured recipe as the default (issue 25): teacher-corrected pairs made by the run, a regression warm-up, then
DMD, on the tiny SD1.5/SD3.5 demo models; each phase interrupted and resumed; each part switched off."""

import json
import os

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:No demo Bridge")  # no Bridge demo run here: an untrained Bridge

PROMPTS = ["a red circle on a blue background", "a green square", "a yellow triangle on black"]


class _Killed(Exception):
    """A kill: nothing after it runs."""


def _models():
    from training.models.assemble import demo_distill_models

    return demo_distill_models(0)[0]  # fresh: a resumed process rebuilds everything from scratch


def _config(out, **kw):
    """What the Distill Student node builds: the library's defaults, only the sizes cut to the tiny models (the
    recipe itself, pairs -> warm-up -> DMD, is never switched on here: it is the default)."""
    from training.distill import DistillConfig

    base = dict(out_dir=str(out), prompts=PROMPTS, resolution=64, batch_size=2, steps=3, fake_updates=1,
                regression_n=6, regression_warmup_steps=3, regression_student_steps=3, regression_teacher_steps=3,
                log_every=1, sample_every=1000, ckpt_every=1000)
    base.update(kw)
    return DistillConfig(**base)


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _pairs(out):
    from training.pairs import load_pairs

    return load_pairs(os.path.join(out, "pairs.safetensors"), 4, 8)


def test_the_default_config_and_command_are_the_recipe(tmp_path):
    """Without any regression option the library, the command and the demo run pairs, warm-up and DMD; the shapes
    run keeps making its own pairs (its figures unchanged)."""
    import argparse

    from training.cli.distill import add_arguments, config_from_args
    from training.distill import DistillConfig

    cfg = DistillConfig(out_dir=str(tmp_path), prompts=["a"])
    cfg.validate()
    assert cfg.pairs_file == os.path.join(str(tmp_path), "pairs.safetensors")
    assert (cfg.regression_n, cfg.regression_warmup_steps, cfg.steps, cfg.regression_weight) == (800, 2000, 2000, 0)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv, want in ((["--out", str(tmp_path)], (800, 2000, 2000)), (["--demo", "--out", str(tmp_path)], (16, 40, 60)),
                       (["--regression-n", "0", "--out", str(tmp_path)], (0, 0, 2000))):
        args = parser.parse_args(argv)
        c = config_from_args(args, ["a"])
        c.validate()
        assert (c.regression_n, c.regression_warmup_steps, c.steps) == want, argv
    # A pairs file made elsewhere: used instead of making any, with the warm-up.
    c = config_from_args(parser.parse_args(["--regression-pairs", "p.safetensors", "--out", str(tmp_path)]), ["a"])
    assert (c.regression_n, c.regression_warmup_steps, c.pairs_file) == (0, 2000, "p.safetensors")


def test_bad_combinations_are_one_clear_error_each(tmp_path):
    from training.distill import DistillConfig

    cases = [(dict(steps=0, regression_warmup_steps=0), "steps 0 (no DMD, regression only) needs a regression warm-up"),
             (dict(steps=0, regression_n=0, regression_warmup_steps=5), "steps 0"),
             (dict(regression_n=0), "regression_warmup_steps needs pairs to fit: regression_n > 0"),
             (dict(regression_n=0, regression_warmup_steps=0, regression_weight=1.0), "regression_weight > 0 needs"),
             (dict(regression_n=-1), "regression_n must be >= 0"), (dict(regression_s0=1.5), "regression_s0"),
             (dict(regression_student_steps=0), "regression_student_steps"), (dict(steps=-1), "steps must be >= 0")]
    for kw, text in cases:
        with pytest.raises(ValueError, match="Invalid distillation config") as e:
            DistillConfig(out_dir=str(tmp_path), prompts=["a"], **kw).validate()
        assert text in str(e.value), (kw, str(e.value))
    # Each part off on its own is fine.
    for kw in (dict(regression_n=0, regression_warmup_steps=0), dict(regression_warmup_steps=0), dict(steps=0)):
        DistillConfig(out_dir=str(tmp_path), prompts=["a"], **kw).validate()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, as the node makes it."""
    from training.distill import Distiller

    out = tmp_path_factory.mktemp("reference")
    models = _models()
    result = Distiller(_config(out), models).run()
    return out, result, {k: v.detach().clone() for k, v in models.student.unet.state_dict().items()}


def test_the_node_call_makes_pairs_then_warms_up_then_distils(reference):
    out, result, _ = reference
    noise, targets, prompts, meta = _pairs(out)
    assert noise.shape == targets.shape == (6, 4, 8, 8) and set(prompts) <= set(PROMPTS)
    assert json.loads(meta["student_steps"]) == 3 and json.loads(meta["s0"]) == 0.9
    assert not os.path.exists(os.path.join(out, "pairs.safetensors.partial"))  # merged and cleaned up
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [bool(r.get("warmup")) for r in rows] == [True] * 3 + [False] * 3  # warm-up rows, then DMD rows
    assert all("regression_loss" in r for r in rows[:3]) and all("fake_loss" in r and "loss" in r for r in rows[3:])
    assert result["step"] == 6 and result["pairs"] == os.path.join(str(out), "pairs.safetensors")
    assert result["pairs_seconds"] > 0 and result["warmup_steps"] == 3


def _stop_at(stop, at_step=None, at_pairs_batch=None):
    """A ComfyUI-like progress callback that cancels at a training step or after a pairs batch."""
    from training import loop

    def callback(step, total, metrics, preview=None):
        if at_pairs_batch is not None and metrics.get("pairs_batches") == at_pairs_batch:
            stop.set()
        if at_step is not None and "pairs_batches" not in metrics and step == at_step:
            stop.set()
    return loop.ProgressReporter(total=1, disable=True, callback=callback)


@pytest.mark.parametrize("phase", ["pairs-killed", "pairs-cancelled", "warmup-cancelled", "dmd-killed"])
def test_interrupted_in_each_phase_the_resumed_run_ends_with_the_uninterrupted_student(tmp_path, monkeypatch,
                                                                                         reference, phase):
    """Killed or cancelled while making the pairs (after one of three batches), in the warm-up or in the DMD steps,
    the next run continues there and ends with exactly the uninterrupted run's pairs, metrics and student."""
    from training import loop, pairs
    from training.distill import Distiller

    ref_out, ref_result, ref_student = reference
    out = tmp_path / "run"
    stop = loop.StopFlag()
    if phase == "pairs-killed":
        real, calls = pairs.teacher_correct, {"n": 0}

        def killed_on_the_second_batch(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise _Killed()
            return real(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(pairs, "teacher_correct", killed_on_the_second_batch)
            with pytest.raises(_Killed):
                Distiller(_config(out), _models()).run()
    else:
        progress = {"pairs-cancelled": _stop_at(stop, at_pairs_batch=1), "warmup-cancelled": _stop_at(stop, at_step=2),
                    "dmd-killed": None}[phase]
        if phase == "dmd-killed":  # an error in the 5th step (the 2nd DMD step): the 4th is saved first
            real_step, steps = Distiller.train_step, []

            def train_step(self, step):
                steps.append(step)
                if step == 4:
                    raise _Killed()
                return real_step(self, step)

            with monkeypatch.context() as m:
                m.setattr(Distiller, "train_step", train_step)
                with pytest.raises(_Killed):
                    Distiller(_config(out), _models()).run()
        else:
            first = Distiller(_config(out), _models(), progress=progress, stop=stop).run()
            assert first["stopped_early"]
            assert first["step"] == (0 if phase == "pairs-cancelled" else 2)
    partial = out / "pairs.safetensors.partial"
    if phase.startswith("pairs"):  # one batch of three kept, nothing trained yet
        assert sorted(os.listdir(partial)) == ["batch_000000.safetensors", "job.json"]
        assert not (out / "pairs.safetensors").exists() and not (out / "train_state.safetensors").exists()
    result = Distiller(_config(out), _models()).run()
    assert result["resumed_from"] == {"pairs-killed": 0, "pairs-cancelled": 0, "warmup-cancelled": 2,
                                      "dmd-killed": 4}[phase]
    assert result["step"] == 6 and not partial.exists()
    for a, b in zip(_pairs(ref_out)[:2], _pairs(out)[:2]):
        assert torch.equal(a, b)
    assert _pairs(ref_out)[2] == _pairs(out)[2]
    rows_ref, rows = _rows(ref_out), _rows(out)
    assert [r["step"] for r in rows] == [r["step"] for r in rows_ref]
    for ra, rb in zip(rows_ref, rows):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-7)
    from safetensors.torch import load_file

    got = load_file(str(out / "student_unet.safetensors"))
    want = load_file(str(ref_out / "student_unet.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def test_each_part_switches_off(tmp_path):
    """regression_n 0 (and no warm-up): plain DMD, no pairs; regression_warmup_steps 0: DMD only; steps 0: the
    warm-up alone, the fake score never trained."""
    from training.distill import Distiller

    Distiller(_config(tmp_path / "dmd", regression_n=0, regression_warmup_steps=0), _models()).run()
    assert not (tmp_path / "dmd" / "pairs.safetensors").exists()
    assert [("loss" in r, bool(r.get("warmup"))) for r in _rows(tmp_path / "dmd")] == [(True, False)] * 3

    # No warm-up and no regression term: nothing would use pairs, so none are made (minutes saved at real size).
    Distiller(_config(tmp_path / "nowarm", regression_warmup_steps=0), _models()).run()
    assert not (tmp_path / "nowarm" / "pairs.safetensors").exists()
    assert [("loss" in r, bool(r.get("warmup"))) for r in _rows(tmp_path / "nowarm")] == [(True, False)] * 3
    # No warm-up but the regression term inside the DMD steps: pairs made and used in every step.
    Distiller(_config(tmp_path / "term", regression_warmup_steps=0, regression_weight=0.5), _models()).run()
    assert (tmp_path / "term" / "pairs.safetensors").exists()
    assert all("regression_scale" in r and not r.get("warmup") for r in _rows(tmp_path / "term"))

    models = _models()
    result = Distiller(_config(tmp_path / "regression", steps=0), models).run()
    rows = _rows(tmp_path / "regression")
    assert result["step"] == 3 and [bool(r.get("warmup")) for r in rows] == [True] * 3
    assert not any("fake_loss" in r for r in rows) and (tmp_path / "regression" / "student_unet.safetensors").exists()


def test_a_resumed_run_refuses_pairs_made_with_other_settings(tmp_path, reference):
    """The run folder's pairs were fitted by its training: other pair settings on resume are one clear error (and
    start over with resume off, which makes them again)."""
    import shutil

    from training.distill import Distiller
    from training.errors import UserError

    ref_out = reference[0]
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    with pytest.raises(UserError, match="other regression settings"):
        Distiller(_config(out, regression_n=4), _models()).run()
    result = Distiller(_config(out, regression_n=4, resume=False), _models()).run()
    assert result["resumed_from"] == 0 and _pairs(out)[0].shape[0] == 4


@pytest.mark.slow
def test_distill_demo_by_default_makes_pairs_warms_up_then_distils(tmp_path, monkeypatch, capsys):
    """`distill --demo` with no regression option (only fewer DMD steps): 16 pairs, 40 warm-up steps, then DMD."""
    from training.run import main

    monkeypatch.chdir(tmp_path)
    assert main(["distill", "--demo", "--steps", "2", "--log-every", "1", "--fake-updates", "1", "--no-export"]) == 0
    out = tmp_path / "runs" / "distill-demo"
    assert "Plan: regression pairs (16 pairs made in" in capsys.readouterr().out
    assert _pairs(out)[0].shape[0] == 16
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 43))
    assert [bool(r.get("warmup")) for r in rows] == [True] * 40 + [False] * 2
    assert all("fake_loss" in r for r in rows[40:])


def test_the_benchmark_breaks_down_the_recipes_phases():
    """`python -m training.bench.distill` times a batch of pairs and warm-up steps beside the DMD step (tiny size) and
    counts their FLOPs; a warm-up step costs less than a DMD step, and the default recipe's phases add up."""
    from training.bench.distill import bench, count_flops, format_flops, format_table

    r = bench("tiny", batch=1, fake_updates=1, steps=1, warmup=0, checkpointing=False, pairs=True)
    assert r["pair_s"] > 0 and 0 < r["warmup_step_s"] < r["step_s"]
    assert r["recipe_s"]["pairs"] == pytest.approx(800 * r["pair_s"])
    assert r["recipe_s"]["dmd"] == pytest.approx(2000 * r["step_s"])
    assert "pairs (per pair)" in format_table(r) and "warm-up step" in format_table(r)
    f = count_flops("tiny", 2, 5)
    assert 0 < f["warmup_step_tflop"] < f["step_tflop"] and f["pair_tflop"] > 0
    assert f["recipe_tflop"]["pairs"] == pytest.approx(800 * f["pair_tflop"])
    assert "one regression pair" in format_flops(f)


_DDP_SCRIPT = """
import json, os, sys, warnings
sys.path.insert(0, {tests!r})
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
import test_recipe as T
from training.distill import Distiller

out = sys.argv[1]
models = T._models()
d = Distiller(T._config(out), models)
result = d.run()
with open(os.path.join(out, f"rank{{d.accel.process_index}}.json"), "w") as f:
    json.dump({{"student": sum(p.double().sum().item() for p in models.student.parameters()),
               "pairs": d.pairs[1].double().sum().item(), "step": result["step"]}}, f)
"""


@pytest.mark.slow
def test_two_processes_share_the_pairs_the_main_one_makes(tmp_path):
    """Under DDP (2 CPU processes, gloo) the main process makes the pairs, the other waits for the merged file; both
    fit the same pairs and end with the same student."""
    from conftest import launch_two_cpu_processes

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    proc = launch_two_cpu_processes([str(script), str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["step"] == 6
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5, 6]
