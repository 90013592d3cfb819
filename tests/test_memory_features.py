"""Issue 23's trainer-side memory features on tiny models on the CPU: gradient accumulation (one step with N
micro-batches is the full-batch step), the optimizer option (8-bit AdamW's clear refusal, its resume), gradient
checkpointing's auto setting, student checkpoints merged on the CPU, a save after running out of memory that the run
resumes from, and the student's CLIP-L freed after prompt encoding."""

import gc
import json
import os
import weakref

import pytest
import torch

from test_distill import _config, _metrics, _models, _StopAt, closed_form_world
from test_pairs import _pairs_file


def _run_one(tmp_path, name, **kw):
    """A Distiller run on a fresh closed-form world whose fake score starts away from the teacher; returns (world,
    metrics rows, the student's gradients before each clip, the fake score's gradients before each of its steps)."""
    from training.distill import Distiller

    world = closed_form_world()
    d = Distiller(_config(tmp_path / name, **kw), _models(*world))
    student_grads, fake_grads = [], []
    average, setup = d._average_fake_grads, d.setup

    def recording_average():
        fake_grads.append([p.grad.clone() for p in d.fake_params])
        average()

    def setup_and_record():
        # The fake score starts as the teacher: the first step's DMD gradient would be rounding noise. A fixed
        # offset makes every step's gradient a real one.
        setup()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in d.fake_params:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        clip = d.accel.clip_grad_norm_

        def recording_clip(params, threshold):
            params = list(params)
            student_grads.append([p.grad.clone() for p in params])
            return clip(params, threshold)

        d.accel.clip_grad_norm_ = recording_clip

    d._average_fake_grads, d.setup = recording_average, setup_and_record
    d.run()
    return world, _metrics(tmp_path / name), student_grads, fake_grads


def _assert_same_gradients(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        scale = max(x.abs().max().item() for x in b)
        assert scale > 0
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("options", [
    {},
    dict(grad_norm="both", grad_clip_relative=1.5, ema_decay=0.9),
    dict(grad_norm="student", regression=True, regression_weight=0.7, regression_warmup_steps=1),
], ids=["dmd2", "student-space-normalisation", "regression-and-warmup"])
def test_gradient_accumulation_step_equals_the_full_batch_step(tmp_path, options):
    """Accumulation 2 and 4 draw the same batch and noise as accumulation 1 and make the same steps: the student's
    gradient before its clip (the DMD part, with the per-sample normalisers, plus the regression term rescaled to the
    accumulated DMD gradient), the fake score's gradient at each of its updates (they accumulate too), the logged
    figures. The learning rates are small: Adam turns rounding-level gradient entries into full-size steps, which
    would part the runs after the first step; and Adam would hide a wrongly scaled gradient in the weights, so the
    gradients carry the test."""
    options = dict(options)
    if options.pop("regression", False):
        options["regression_pairs"] = _pairs_file(tmp_path / "pairs.safetensors", closed_form_world()[0])
    kw = dict(steps=2, batch_size=4, fake_updates=2, student_lr=1e-6, fake_lr=1e-6, regression_warmup_lr=1e-6,
              regression_warmup_cross_attention_lr=1e-6, **options)
    ref_world, ref_rows, ref_student, ref_fake = _run_one(tmp_path, "acc1", **kw)
    assert len(ref_fake) == 2 * kw["steps"] and len(ref_student) == kw["steps"]
    for acc in (2, 4):
        world, rows, student_grads, fake_grads = _run_one(tmp_path, f"acc{acc}", gradient_accumulation=acc, **kw)
        _assert_same_gradients(student_grads, ref_student)
        _assert_same_gradients(fake_grads, ref_fake)
        assert len(rows) == len(ref_rows)
        for r, q in zip(rows, ref_rows):
            assert r.keys() == q.keys()
            assert r == pytest.approx(q, rel=1e-3, abs=1e-6), acc
        # Weights: equal up to Adam's steps on rounding-level gradient entries (at most 2 lr per step each).
        for (name, a), b in zip(ref_world[0].named_parameters(), world[0].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=2 * kw["steps"] * 1e-6, msg=name)


def test_gradient_accumulation_skips_a_nan_step_as_a_whole(tmp_path):
    """A non-finite teacher output in one micro-batch skips the whole step (no partial update), as with one batch."""
    from training.distill import Distiller

    student, bridge, teacher = closed_form_world()
    before = [p.detach().clone() for p in student.parameters()]
    real_predict, calls = teacher.predict_x0, []

    def second_call_nan(*a, **k):
        calls.append(1)
        out = real_predict(*a, **k)
        return out * float("nan") if len(calls) == 3 else out  # step 0, micro-batch 1, real score

    teacher.predict_x0 = second_call_nan
    result = Distiller(_config(tmp_path, steps=1, batch_size=4, fake_updates=1, gradient_accumulation=2),
                       _models(student, bridge, teacher)).run()
    assert result["nan_skipped"] == 1 and len(calls) == 4
    for a, b in zip(before, student.parameters()):
        assert torch.equal(a, b)


def test_memory_settings_are_checked_before_anything_loads(tmp_path, monkeypatch):
    import importlib.util

    from training.distill import DistillConfig

    with pytest.raises(ValueError) as e:
        DistillConfig(out_dir=str(tmp_path), prompts=["a"], batch_size=6, gradient_accumulation=4,
                      optimizer="sgd", gradient_checkpointing="yes").validate()
    for text in ("batch_size (6) must be divisible by gradient_accumulation (4)", "optimizer must be one of adamw, "
                 "adamw8bit, got 'sgd'", "gradient_checkpointing must be None"):
        assert text in str(e.value)
    with pytest.raises(ValueError, match="gradient_accumulation must be >= 1"):
        DistillConfig(out_dir=str(tmp_path), prompts=["a"], gradient_accumulation=0).validate()
    with pytest.raises(ValueError, match=r"regression_batch \(6\) must be divisible by gradient_accumulation \(4\)"):
        DistillConfig(out_dir=str(tmp_path), prompts=["a"], regression_pairs="p.safetensors", regression_batch=6,
                      gradient_accumulation=4).validate()
    # 8-bit AdamW: a CUDA GPU and bitsandbytes, each refusal naming the fix (installed or not, here).
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="optimizer adamw8bit needs a CUDA GPU"):
        DistillConfig(out_dir=str(tmp_path), prompts=["a"], optimizer="adamw8bit", cpu=True).validate()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        DistillConfig(out_dir=str(tmp_path), prompts=["a"], optimizer="adamw8bit").validate()


def test_cli_memory_options_reach_the_config_and_8bit_on_cpu_is_one_line(tmp_path, capsys, monkeypatch):
    import argparse

    from training import run
    from training.cli import distill as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    base = ["--demo", "--out", str(tmp_path)]
    cfg = cli.config_from_args(p.parse_args(base), ["a"])
    assert (cfg.gradient_checkpointing, cfg.gradient_accumulation, cfg.optimizer) == (None, 1, "adamw")
    args = p.parse_args(base + ["--no-gradient-checkpointing", "--gradient-accumulation", "2", "--optimizer",
                                "adamw8bit"])
    cfg = cli.config_from_args(args, ["a"])
    assert (cfg.gradient_checkpointing, cfg.gradient_accumulation, cfg.optimizer) == (False, 2, "adamw8bit")
    assert cli.config_from_args(p.parse_args(base + ["--gradient-checkpointing"]), ["a"]).gradient_checkpointing

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # bitsandbytes installed or not: the GPU is what is missing
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = []
    monkeypatch.setattr("training.models.assemble.demo_distill_models", lambda *a: loaded.append(1))
    assert run.main(["distill", "--demo", "--out", str(tmp_path), "--optimizer", "adamw8bit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adamw8bit needs a CUDA GPU" in err[0] and not loaded
    assert run.main(["distill", "--demo", "--out", str(tmp_path), "--batch-size", "3",
                     "--gradient-accumulation", "2"]) == 2
    assert "must be divisible by gradient_accumulation" in capsys.readouterr().err and not loaded


def test_gradient_checkpointing_auto_is_off_on_the_cpu_and_recorded(tmp_path):
    from training import loop
    from training.distill import Distiller
    from training.models.export import read_student_metadata

    assert loop.use_gradient_checkpointing(None, "cuda") and not loop.use_gradient_checkpointing(None, "cpu")
    assert loop.use_gradient_checkpointing(True, "cpu") and not loop.use_gradient_checkpointing(False, "cuda")
    for setting, used in ((None, False), (True, True)):
        student, bridge, teacher = closed_form_world()
        out = tmp_path / str(setting)
        result = Distiller(_config(out, steps=1, batch_size=2, fake_updates=1, gradient_checkpointing=setting),
                           _models(student, bridge, teacher)).run()
        assert result["gradient_checkpointing"] is used
        assert student.unet.is_gradient_checkpointing is used
        summary = read_student_metadata(out / "student_unet.safetensors")["training_summary"]
        assert summary["gradient_checkpointing"] is used


def test_optimizers_fused_only_on_cuda_and_8bit_resumes(tmp_path, monkeypatch):
    """On the CPU AdamW is the plain one (fused only when every parameter is on CUDA). 8-bit AdamW (bitsandbytes,
    whose 0.50 also runs on the CPU: allowed here for the test) keeps 8-bit moments for the UNet's large weights,
    and a stopped run resumes to the uninterrupted one; resuming with another optimizer is a clear error."""
    from training import loop
    from training.distill import Distiller
    from training.state import TrainingStateError

    opt = loop.make_optimizer([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, weight_decay=0.0)
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults["fused"]
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(loop, "optimizer_problem", lambda *a, **k: None)
    kw = dict(steps=4, batch_size=4, fake_updates=1, optimizer="adamw8bit", student_lr=1e-3)
    a = closed_form_world()
    da = Distiller(_config(tmp_path / "a", **kw), _models(*a))
    da.run()
    inner = da.opt_student.optimizer
    assert isinstance(inner, bnb.optim.AdamW8bit)
    assert any(st["state1"].dtype == torch.uint8 for st in inner.state.values())
    assert isinstance(da.opt_fake, torch.optim.AdamW)  # the fake LoRA keeps AdamW
    stop = loop.StopFlag()
    Distiller(_config(tmp_path / "b", **kw), _models(*closed_form_world()), progress=_StopAt(stop, 2),
              stop=stop).run()
    c = closed_form_world()
    second = Distiller(_config(tmp_path / "b", **kw), _models(*c)).run()
    assert second["resumed_from"] == 2 and second["step"] == 4
    for (name, pa), pc in zip(a[0].named_parameters(), c[0].parameters()):
        torch.testing.assert_close(pa, pc, msg=name)
    with pytest.raises(TrainingStateError, match="AdamW8bit in the file but is AdamW here"):
        Distiller(_config(tmp_path / "b", **dict(kw, optimizer="adamw", steps=6)),
                  _models(*closed_form_world())).run()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_student_checkpoint_is_merged_on_the_cpu_without_a_unet_copy(tmp_path, monkeypatch, lora):
    """The saved student equals peft's own fuse of a deep copy (the old way), with EMA weights; saving neither
    deep-copies the UNet nor builds a merged one."""
    import copy

    from safetensors.torch import load_file

    from training.models.export import save_student_unet
    from training.student import OneStepStudent

    student, _, _ = closed_form_world()
    if lora:
        student.add_lora(rank=4)
    student.enable_ema(0.5)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        student.ema_step()
        for p in student.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # live weights != EMA weights
    with student.ema_weights():
        reference = copy.deepcopy(student.unet)
    if lora:
        reference.fuse_lora()
        reference.unload_lora()
    expected = reference.state_dict()

    def refuse(*a, **k):
        raise AssertionError("saving copied the UNet")

    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: refuse() if isinstance(x, torch.nn.Module)
                        else real_deepcopy(x, *a))
    monkeypatch.setattr(OneStepStudent, "merged_unet", refuse)
    save_student_unet(tmp_path / "s.safetensors", student)
    saved = load_file(tmp_path / "s.safetensors")
    assert saved.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(saved[k], expected[k], msg=k, rtol=0, atol=1e-6)
    monkeypatch.undo()
    merged = student.merged_unet(device="cpu")
    assert not getattr(merged, "peft_config", None) and merged.device.type == "cpu"
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6)


class _OutOfMemoryAt:
    """Wraps a method: raises torch.OutOfMemoryError on its `at`-th call (counting from 1), recording what the
    failed step still held (weak references) and whether gradients existed then."""

    def __init__(self, fn, at, holder=None):
        self.fn, self.at, self.calls, self.holder = fn, at, 0, holder

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.at:
            if self.holder is not None:
                self.holder(a)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total)")
        return self.fn(*a, **k)


def test_out_of_memory_saves_frees_and_the_rerun_resumes_to_the_uninterrupted_run(tmp_path):
    """Issue 23: running out of memory mid-step (here in the real score's forward of step 4) frees the failed step's
    tensors and the gradients, saves the last finished step, reaches the user as one line; a rerun resumes from it
    and ends where the uninterrupted run ends."""
    from training.distill import Distiller
    from training.errors import explain, one_line

    kw = dict(steps=6, batch_size=4, fake_updates=2, ema_decay=0.9)
    a = closed_form_world()
    Distiller(_config(tmp_path / "a", **kw), _models(*a)).run()

    b = closed_form_world()
    d = Distiller(_config(tmp_path / "b", **kw), _models(*b))
    held = {}
    # Step 4's real score: 2 teacher calls per step (real, fake) -> its 7th call.
    d.m.teacher.predict_x0 = _OutOfMemoryAt(b[2].predict_x0, at=7,
                                            holder=lambda args: held.update(x_s=weakref.ref(args[0])))
    seen = {}
    save = d.save

    def checking_save(step, state=True):
        gc.collect()
        seen.update(step=step, x_s_alive=held["x_s"]() is not None,
                    grads=[p.grad for p in d.student_params + d.fake_params if p.grad is not None])
        save(step, state)

    d.save = checking_save
    with pytest.raises(torch.OutOfMemoryError) as e:
        d.run()
    assert seen["step"] == 3 and not seen["x_s_alive"] and not seen["grads"]
    message = one_line(str(explain(e.value)))
    assert "\n" not in message and message.startswith("Out of memory (CUDA out of memory.")
    assert "--batch-size" in message
    c = closed_form_world()
    resumed = Distiller(_config(tmp_path / "b", **kw), _models(*c)).run()
    assert resumed["resumed_from"] == 3 and resumed["step"] == 6
    for (name, pa), pc in zip(a[0].named_parameters(), c[0].parameters()):
        torch.testing.assert_close(pa, pc, msg=name)
    for pa, pc in zip(a[2].fake_parameters(), c[2].fake_parameters()):
        torch.testing.assert_close(pa, pc)
    rows_a, rows_b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(rows_a, rows_b):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-7)


def test_out_of_memory_after_the_student_update_counts_that_step_as_done(tmp_path):
    """Out of memory in a fake-score update, after the step's student update: the state saved holds that update, so
    it is saved as done (resuming would apply it twice); the rerun continues after it."""
    from training.distill import Distiller

    kw = dict(steps=4, batch_size=2, fake_updates=1)
    w = closed_form_world()
    d = Distiller(_config(tmp_path, **kw), _models(*w))
    d.m.teacher.velocity = _OutOfMemoryAt(w[2].velocity, at=2)  # step 1's fake update
    with pytest.raises(torch.OutOfMemoryError):
        d.run()
    resumed = Distiller(_config(tmp_path, **kw), _models(*closed_form_world())).run()
    assert resumed["resumed_from"] == 2 and resumed["step"] == 4


def test_out_of_memory_in_the_demo_command_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
    from training import run
    from training.distill import Distiller

    monkeypatch.chdir(tmp_path)
    real = Distiller.train_step
    monkeypatch.setattr(Distiller, "train_step", lambda self, step: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")) if step == 2 else real(self, step))
    argv = ["distill", "--demo", "--steps", "3", "--batch-size", "2", "--fake-updates", "1", "--resolution", "32",
            "--out", str(tmp_path / "run"), "--no-export"]
    with pytest.warns(UserWarning, match="untrained"):
        assert run.main(argv) == 2
    err = capsys.readouterr().err
    # (The progress bar may precede it on the same terminal line.)
    errors = [line[line.index("error: "):] for line in err.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(errors) == 1 and errors[0].startswith("error: Out of memory (CUDA out of memory."), err[-3000:]
    assert "Traceback" not in err
    assert os.path.exists(tmp_path / "run" / "train_state.safetensors")
    monkeypatch.setattr(Distiller, "train_step", real)
    with pytest.warns(UserWarning, match="untrained"):
        assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):out.index("}\n") + 1])["resumed_from"] == 2


def test_the_student_clip_is_freed_after_prompt_encoding(tmp_path, monkeypatch):
    """load_distill_models: after prepare_text (which calls free_text_encoders) nothing holds the student's CLIP-L."""
    from diffusers import StableDiffusionPipeline

    from bridge import checkpoint as bridge_checkpoint
    from bridge.model import Bridge
    from training.distill import Distiller
    from training.models import assemble, loading
    from training.models.tiny import tiny_clip_text, tiny_clip_tokenizer, tiny_unet, tiny_vae

    parts = {"unet": tiny_unet(), "vae": tiny_vae(4), "text_encoder": tiny_clip_text("L"),
             "tokenizer": tiny_clip_tokenizer()}
    StableDiffusionPipeline(**parts, scheduler=loading._scheduler(loading.config_dir("sd15")), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path / "sd15")
    del parts
    world = assemble.demo_bridge_models(0)
    bridge_path = str(tmp_path / "bridge.safetensors")
    bridge_checkpoint.save_bridge(bridge_path, Bridge.create("sd15", "sd3", k=2, student_vae=world.student_vae,
                                                             width=32, depth=1))
    monkeypatch.setattr(assemble, "load_bridge_models", lambda *a, **k: assemble.demo_bridge_models(0))
    clips = []
    real_load = loading.load_sd15

    def recording(*a, **k):
        out = real_load(*a, **k)
        if out.text_encoder is not None:
            clips.append(weakref.ref(out.text_encoder))
        return out

    monkeypatch.setattr(loading, "load_sd15", recording)
    models = assemble.load_distill_models(str(tmp_path / "sd15"), bridge_path, "sd35_medium", teacher="unused",
                                          cpu=True)
    assert len(clips) == 1 and clips[0]() is not None
    d = Distiller(_config(tmp_path / "run", steps=1, batch_size=2, fake_updates=1, resolution=32, cpu=True), models)
    d.prepare_text()
    assert len(d.text["student"]) == 2  # encoded with it
    gc.collect()
    assert clips[0]() is None, gc.get_referrers(clips[0]())
