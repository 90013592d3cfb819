"""Bridge training on tiny models: losses fall, checkpoints resume exactly, bad input is refused."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from training import data, loop
from training.bridge_train import BridgeTrainConfig, BridgeTrainer
from training.models.assemble import demo_bridge_models


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    data.make_synthetic_images(str(folder), n=12, size=128, seed=0)
    return str(folder)


def _cfg(out, images, **kw):
    base = dict(out_dir=str(out), images=images, steps=40, batch_size=4, lr=3e-3, warmup_steps=2, val_every=40,
                ckpt_every=20, log_every=1, student_res=64, teacher_res=128, attn_weight=1.0, attn_queries=16,
                projector={"width": 32, "depth": 2}, val_batches=1, val_fraction=0.25)
    base.update(kw)
    return BridgeTrainConfig(**base)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_both_losses_fall_and_checkpoint_is_written(tmp_path, images):
    result = BridgeTrainer(_cfg(tmp_path / "run", images), demo_bridge_models()).run()
    rows = [r for r in _metrics(tmp_path / "run") if "rec" in r]
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "rec") < 0.7 * mean(first, "rec")
    assert mean(last, "attn") < mean(first, "attn")
    assert os.path.exists(result["bridge"])
    assert os.path.exists(tmp_path / "run" / "val" / "step_000040.png")
    val = result["last_val"]["val"]
    for name in ("bridge", "round_trip"):
        assert {"latent_mse", "latent_psnr", "image_psnr"} <= set(val[name])
        assert any(k.startswith("attn_sim/") for k in val[name])

    from bridge.checkpoint import load_bridge, read_bridge_metadata

    meta = read_bridge_metadata(result["bridge"])
    assert meta["training_summary"]["steps"] == 40
    bridge = load_bridge(result["bridge"])
    z = torch.randn(1, 4, 8, 8)
    assert bridge.project_image(torch.rand(1, 3, 64, 64)).shape == (1, 16, 16, 16)
    assert z.shape[1] == bridge.student_space.channels


def test_features_tap_trains_and_is_recorded(tmp_path, images):
    """tap 'features': both losses fall and the checkpoint records the tap (k = 2 here; k = 1 in test_cli)."""
    result = BridgeTrainer(_cfg(tmp_path / "run", images, steps=30, val_every=30, tap="features"),
                           demo_bridge_models()).run()
    rows = [r for r in _metrics(tmp_path / "run") if "rec" in r]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(rows[-5:], "rec") < 0.7 * mean(rows[:5], "rec")
    assert mean(rows[-5:], "attn") < mean(rows[:5], "attn")

    from bridge.checkpoint import load_bridge, read_bridge_metadata

    meta = read_bridge_metadata(result["bridge"])
    assert meta["tap"] == "features" and meta["training_summary"]["config"]["tap"] == "features"
    world = demo_bridge_models()
    bridge = load_bridge(result["bridge"], student_vae=world.student_vae)
    with torch.no_grad():
        assert bridge(torch.randn(1, 4, 8, 8)).shape == (1, 16, 16, 16)


def _stop_after(n_steps, action):
    """A progress reporter whose callback fires `action` once `n_steps` steps are done (like a user or ComfyUI)."""
    return loop.ProgressReporter(total=100, disable=True,
                                 callback=lambda step, total, metrics, preview: action() if step == n_steps else None)


def test_stopped_run_resumes_with_the_same_losses_as_an_uninterrupted_run(tmp_path, images):
    cfg = dict(steps=12, ckpt_every=100, val_every=100)
    straight = tmp_path / "straight"
    BridgeTrainer(_cfg(straight, images, **cfg), demo_bridge_models()).run()

    resumed = tmp_path / "resumed"
    stop = loop.StopFlag()
    first = BridgeTrainer(_cfg(resumed, images, **cfg), demo_bridge_models(), progress=_stop_after(5, stop.set),
                          stop=stop).run()
    assert first["stopped_early"] and first["step"] == 5
    assert os.path.exists(resumed / "train_state.safetensors") and os.path.exists(first["bridge"])
    second = BridgeTrainer(_cfg(resumed, images, **cfg), demo_bridge_models()).run()
    assert second["resumed_from"] == 5 and not second["stopped_early"]
    # Training time counts both invocations: the first one's loop seconds (up to its stop checkpoint) come back.
    assert 0 < second["train_seconds"] - second["seconds"] <= first["train_seconds"]
    a = [r["loss"] for r in _metrics(straight) if "loss" in r]
    b = [r["loss"] for r in _metrics(resumed) if "loss" in r]
    assert len(a) == len(b) == 12
    assert a == b  # bit-identical: same data, noise, timesteps, queries and optimizer state per step
    assert torch.equal(_weights(straight), _weights(resumed))


def _weights(run):
    tensors = load_file(str(run / "bridge.safetensors"))
    return torch.cat([t.flatten().float() for _, t in sorted(tensors.items())])


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, images):
    out = tmp_path / "run"
    progress = _stop_after(3, lambda: os.kill(os.getpid(), signal.SIGINT))
    result = BridgeTrainer(_cfg(out, images, steps=20, val_every=100, ckpt_every=100), demo_bridge_models(),
                           progress=progress).run()
    assert result["stopped_early"] and result["step"] == 3
    again = BridgeTrainer(_cfg(out, images, steps=5, val_every=100, ckpt_every=100), demo_bridge_models()).run()
    assert again["resumed_from"] == 3 and again["step"] == 5


def test_nan_steps_are_skipped_then_training_stops_with_a_clear_message(tmp_path, images):
    models = demo_bridge_models()
    trainer = BridgeTrainer(_cfg(tmp_path / "run", images, steps=20, val_every=100, ckpt_every=100,
                                 max_nan_steps=3, attn_weight=0.0), models)
    real_forward = models.student_vae.decode
    calls = {"n": 0}

    def poisoned(z, *a, **k):  # steps 3.. produce NaN images: a diverged run
        calls["n"] += 1
        out = real_forward(z, *a, **k)
        if trainer.nan_guard.skipped_total or calls["n"] > 2:
            out.sample.mul_(float("nan"))
        return out

    models.student_vae.decode = poisoned
    with pytest.raises(loop.TrainingDiverged, match="3"):
        trainer.run()
    assert trainer.nan_guard.skipped_total == 3
    # The last good step is saved and resumable; the projector never took a NaN update.
    assert os.path.exists(tmp_path / "run" / "train_state.safetensors")
    assert all(torch.isfinite(p).all() for p in trainer.bridge.projector.parameters())


def test_bad_config_is_refused_with_a_clear_message(tmp_path, images):
    with pytest.raises(ValueError, match="tap must be image or features, got 'pixels'"):
        BridgeTrainer(_cfg(tmp_path / "t", images, tap="pixels"), demo_bridge_models())
    with pytest.raises(ValueError, match="teacher_res"):
        BridgeTrainer(_cfg(tmp_path, images, teacher_res=100), demo_bridge_models())
    with pytest.raises(ValueError, match="k must be 1 or 2"):
        BridgeTrainer(_cfg(tmp_path, images, k=3, teacher_res=192), demo_bridge_models())


@pytest.mark.slow
def test_accelerate_launch_trains_on_two_cpu_processes(tmp_path):
    """`accelerate launch -m training.run bridge ...` with DDP on 2 CPU processes (gloo): one checkpoint,
    metrics logged once per step, and the summary records both processes."""
    import subprocess
    import sys

    from bridge.checkpoint import read_bridge_metadata

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "training.run", "bridge", "--demo", "--out", str(out), "--steps", "4", "--val-every", "4",
           "--log-every", "1"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_bridge_metadata(str(out / "bridge.safetensors"))
    assert meta["training_summary"]["processes"] == 2
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2, 3, 4]


def test_flux_teacher_trains_with_double_and_single_block_attention(tmp_path, images):
    result = BridgeTrainer(_cfg(tmp_path / "run", images, steps=30, val_every=30), demo_bridge_models(
        teacher_family="flux_dev")).run()
    rows = [r for r in _metrics(tmp_path / "run") if "rec" in r]
    assert all(r["attn"] > 0 for r in rows)
    assert sum(r["rec"] for r in rows[-5:]) < sum(r["rec"] for r in rows[:5])
    sims = result["last_val"]["val"]["bridge"]
    assert any(k.startswith("attn_sim/transformer_blocks.") for k in sims)
    assert any(k.startswith("attn_sim/single_transformer_blocks.") for k in sims)
    from bridge.checkpoint import read_bridge_metadata

    assert read_bridge_metadata(result["bridge"])["teacher_space"]["name"] == "flux"


def test_gradient_accumulation_gives_the_full_batch_step(tmp_path, images):
    """Issue 23: with accumulation 2 and 4 a step sees the same images, noise, timesteps and attention queries as
    with 1: the same reconstruction and attention losses and the same projector gradient before the clip, over the
    micro-batches' backward passes (learning rate tiny: Adam turns rounding-level gradient entries into full steps)."""
    runs = {}
    for acc in (1, 2, 4):
        trainer = BridgeTrainer(_cfg(tmp_path / str(acc), images, steps=3, lr=1e-7, val_every=100, ckpt_every=100,
                                     gradient_accumulation=acc), demo_bridge_models())
        grads, clip = [], trainer.accel.clip_grad_norm_

        def recording(params, max_norm, grads=grads, clip=clip):
            params = list(params)
            grads.append(torch.cat([p.grad.flatten() for p in params]).clone())
            return clip(params, max_norm)

        trainer.accel.clip_grad_norm_ = recording
        trainer.run()
        runs[acc] = (grads, _metrics(tmp_path / str(acc)))
    ref_grads, ref_rows = runs[1]
    assert len(ref_grads) == 3 and all(g.abs().max() > 0 for g in ref_grads)
    for acc in (2, 4):
        grads, rows = runs[acc]
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * r.abs().max().item())
        keys = ("loss", "rec", "attn", "grad_norm")
        train = [r[k] for r in rows if "loss" in r for k in keys]
        assert train == pytest.approx([r[k] for r in ref_rows if "loss" in r for k in keys], rel=1e-4)
    with pytest.raises(ValueError, match=r"batch_size \(4\) must be divisible by gradient_accumulation \(3\)"):
        _cfg(tmp_path, images, gradient_accumulation=3).validate()
