"""Shapes world: the benchmark's adapters (eps UNet as a flow teacher, identity and round-trip bridges) against
the UNet's own DDPM/DDIM math, and the default run end to end on a quick world."""

import json
import os

import pytest
import torch

from training.models.text import TextCond
from training.shapes import models
from training.shapes.adapters import EpsFlowTeacher, IdentityBridge, RoundTripBridge


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def space():
    from bridge.spaces import LatentSpace

    return LatentSpace("test_shapes_eps", 4, 8, 1.7, 0.1, 64)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return models.build_student_unet().eval().requires_grad_(False)


def _scheduler(cls):
    return cls(**models.STUDENT_SCHEDULE)


def test_reparametrisation_is_the_ddpm_noising_rescaled(unet, space):
    from diffusers import DDPMScheduler

    teacher = EpsFlowTeacher(unet, space, models.STUDENT_SCHEDULE)
    ddpm = _scheduler(DDPMScheduler)
    t = torch.tensor([0, 17, 250, 500, 998, 999])
    s = teacher.s_of_t(t)
    assert torch.all(s[1:] > s[:-1]) and 0 < s[0] < 0.05 and abs(teacher.s_max - float(s[-1])) < 1e-7
    assert torch.allclose(teacher.timestep(s), t.float(), atol=1e-3)  # s -> t inverts t -> s on the schedule
    a, b = teacher.coefficients(s)
    assert torch.allclose(a.square().float(), ddpm.alphas_cumprod[t], rtol=1e-5)
    x0, n = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    x_t = ddpm.add_noise(x0, n, t)
    x_s = teacher.add_noise(x0, n, s)
    assert torch.allclose(x_t, (a + b).float().view(-1, 1, 1, 1) * x_s, atol=1e-5)
    # Levels between the schedule's points land between their timesteps.
    mid = (s[2] + s[3]) / 2
    assert 250 < float(teacher.timestep(mid.view(1))) < 500


def test_x0_and_velocity_match_the_unets_own_prediction(unet, space):
    from diffusers import DDPMScheduler

    teacher = EpsFlowTeacher(unet, space, models.STUDENT_SCHEDULE)
    ddpm = _scheduler(DDPMScheduler)
    t = torch.tensor([5, 300, 700, 999])
    s = teacher.s_of_t(t)
    x0, n = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    hidden = torch.randn(4, 16, 32)
    x_t = ddpm.add_noise(x0, n, t)
    with torch.no_grad():
        eps = unet(x_t, t, encoder_hidden_states=hidden).sample
        ab = ddpm.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0_ddpm = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        x_s = teacher.add_noise(x0, n, s)
        x0_hat = teacher.predict_x0(x_s, s, TextCond(hidden))
        v = teacher.velocity(x_s, s, TextCond(hidden))
    assert torch.allclose(x0_hat, x0_ddpm, atol=2e-4 * float(x0_ddpm.abs().max()))
    assert torch.allclose(v, eps - x0_ddpm, atol=2e-4 * float(x0_ddpm.abs().max()))
    # And the flow identity x0 = x_s - s v holds for the teacher's own outputs.
    assert torch.allclose(x_s - s.view(-1, 1, 1, 1) * v, x0_hat, atol=1e-3)


def test_euler_in_flow_coordinates_is_ddim_and_cfg_matches_the_student_sampler(unet, space):
    """A deterministic DDIM step of the UNet is exactly an Euler step of the flow teacher; CFG on x0 is CFG on eps."""
    from training.shapes.sampling import sample_student
    from training.student import ddim_scheduler

    teacher = EpsFlowTeacher(unet, space, models.STUDENT_SCHEDULE)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 4, 8, 8, generator=g)
    hidden, neg = torch.randn(3, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    ddim = sample_student(unet, hidden, neg, z, models.STUDENT_SCHEDULE, steps=4, cfg=1.0)

    sched = ddim_scheduler(models.STUDENT_SCHEDULE)
    sched.set_timesteps(4)
    levels = [teacher.s_of_t(t.view(1)) for t in sched.timesteps] + [torch.zeros(1)]
    a, b = teacher.coefficients(levels[0])
    x = z / (a + b).float()  # the DDIM start x_999 in flow coordinates
    with torch.no_grad():
        for s, s_next in zip(levels[:-1], levels[1:]):
            x = x + (s_next - s) * teacher.velocity(x, s.expand(3), TextCond(hidden))
    assert torch.allclose(x, ddim, atol=1e-3 * float(ddim.abs().max()))

    one_step = sample_student(unet, hidden, neg, z, models.STUDENT_SCHEDULE, steps=1, cfg=4.0)
    with torch.no_grad():
        x0 = teacher.predict_x0(z / (a + b).float(), levels[0].expand(3), TextCond(hidden), TextCond(neg),
                                guidance=4.0)
        per_sample = teacher.predict_x0(z / (a + b).float(), levels[0].expand(3), TextCond(hidden), TextCond(neg),
                                        guidance=torch.tensor([4.0, 4.0, 1.0]))
        plain = teacher.predict_x0(z / (a + b).float(), levels[0].expand(3), TextCond(hidden))
    assert torch.allclose(x0, one_step, atol=1e-3 * float(one_step.abs().max()))
    assert torch.allclose(per_sample[:2], x0[:2], atol=1e-4) and torch.allclose(per_sample[2], plain[2], atol=1e-3)


def test_fake_adapter_is_a_lora_that_starts_at_the_teacher_and_trains_alone(space):
    import copy

    torch.manual_seed(1)
    teacher = EpsFlowTeacher(copy.deepcopy(models.build_student_unet()), space, models.STUDENT_SCHEDULE)
    x_s, s, cond = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7]), TextCond(torch.randn(2, 16, 32))
    with torch.no_grad():
        base = teacher.velocity(x_s, s, cond)
    teacher.add_fake_adapter(rank=4)
    params = teacher.fake_parameters()
    assert params and not any(p.requires_grad for n, p in teacher.model.named_parameters() if "lora_" not in n)
    with torch.no_grad(), teacher.fake():
        assert torch.allclose(teacher.velocity(x_s, s, cond), base, atol=1e-6)  # zero-initialised LoRA
    with teacher.fake():
        loss = teacher.velocity(x_s, s, cond).square().mean()
        loss.backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in teacher.model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
        with teacher.fake():
            fake = teacher.velocity(x_s, s, cond)
        real = teacher.velocity(x_s, s, cond)
    assert not torch.allclose(fake, base, atol=1e-3)
    assert torch.allclose(real, base, atol=1e-6)
    with pytest.raises(ValueError, match="already has a fake adapter"):
        teacher.add_fake_adapter(rank=4)


def test_identity_and_round_trip_bridges():
    from bridge.model import exact_round_trip
    from bridge.spaces import LatentSpace

    torch.manual_seed(2)
    s_vae, t_vae = models.build_student_vae().eval(), models.build_teacher_vae().eval()
    s_space = LatentSpace("test_rt_s", 4, 8, 2.0, 0.5, 64)
    t_space = LatentSpace("test_rt_t", 16, 8, 3.0, -0.1, 128)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)

    ident = IdentityBridge(s_space, s_vae)
    assert ident.k == 1 and ident.teacher_space is ident.student_space
    assert torch.allclose(ident.forward_model(z), (z - 0.5) * 2.0)

    rt = RoundTripBridge(s_vae, t_vae, s_space, t_space, k=2)
    out = rt.forward_model(z)
    assert out.shape == (2, 16, 16, 16)
    with torch.no_grad():
        ref = t_space.to_model(exact_round_trip(z, s_vae, t_vae, 2))
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(s_vae.parameters()) + list(t_vae.parameters()))


# ---------------------------------------------------------------------------------------------- the default run

@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    from training.shapes.pretrain import pretrain

    out = tmp_path_factory.mktemp("world")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(str(out), quick=True, jobs=1, log=lambda msg: None)
    finally:
        torch.set_num_threads(n)
    return str(out)


@pytest.mark.slow
def test_default_run_end_to_end_on_a_quick_world(tmp_path, quick_world):
    """The whole pipeline (data, Bridge, cross-space distillation, evaluation, grid, report) on a shortened schedule."""
    import json

    from PIL import Image

    from bridge.checkpoint import load_bridge, read_bridge_metadata
    from training.models.export import load_student_unet
    from training.shapes.run import DEFAULTS, main

    out = tmp_path / "run"
    # With the Bridge's 'features' tap (a setting like any other; the benchmark's test runs the default 'image').
    assert main(["--out", str(out), "--world", quick_world, "--quick", "--threads", "1", "--seed", "1",
                 "--bridge-tap", "features", "--same-space-row", "--ema-decay", "0.9"]) == 0

    world = models.load_shapes_world(quick_world, register=False)
    bridge = load_bridge(str(out / "bridge.safetensors"), student_vae=world.student_vae)
    assert (bridge.student_space, bridge.teacher_space, bridge.k) == (world.student_space, world.teacher_space, 2)
    assert bridge.tap == "features" and bridge.projector.config.in_channels == 64  # up block 1 of the shapes decoder
    assert read_bridge_metadata(str(out / "bridge.safetensors"))["training_summary"]["config"]["attn_weight"] > 0
    with torch.no_grad():
        assert bridge(torch.randn(2, 4, 8, 8)).shape == (2, 16, 16, 16)
    student = load_student_unet(str(out / "student_unet.safetensors"))
    assert student.space.channels == 4
    # The saved student differs from the base it started from: distillation changed it.
    base = dict(world.student_unet.named_parameters())
    assert any(not torch.equal(p, base[n]) for n, p in student.unet.named_parameters())

    report = json.loads((out / "report.json").read_text())
    assert report["quick"] is True and report["seed"] == 1
    assert report["rows"] == ["teacher", "student_base", "student_base_one_step", "student_base_start", "cross_space",
                              "same_space"]
    assert report["training_s"]["same_space"] > 0
    metrics = [json.loads(line) for line in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert {"pullback_norm_cv", "pullback_norm_max_over_median", "clipped"} <= set(metrics[-1])
    # The regression pairs were made in the run (both rows: the same-space one from its own teacher) and fitted by
    # the warm-up steps before the distillation's.
    from training.pairs import load_pairs

    for folder in ("distill", "distill_same"):
        noise, _, prompts, _ = load_pairs(str(out / folder / "pairs.safetensors"), 4, 8)
        assert len(prompts) == noise.shape[0] == report["settings"]["regression_n"]
    warm = report["settings"]["regression_warmup_steps"]
    assert [bool(m.get("warmup")) for m in metrics] == [True] * warm + [False] * report["settings"]["distill_steps"]
    assert "Regression:" in (out / "report.md").read_text()
    # --ema-decay reached the distiller: its state keeps an EMA of the student, stepped on every warm-up and DMD step.
    from safetensors import safe_open

    with safe_open(str(out / "distill" / "train_state.safetensors"), "pt") as f:
        state = json.loads(f.metadata()["state"])
    assert report["settings"]["ema_decay"] == 0.9 and state["modules"]["ema"]
    assert state["extra"]["ema_step"] == warm + report["settings"]["distill_steps"]
    assert student.timestep == DEFAULTS["student_timestep"] == 700  # the checkpoint keeps the student's timestep
    for row in report["rows"]:
        r = report["evaluation"][row]
        assert 0 <= r["accuracy"] <= 1 and r["fd"] >= 0 and r["seconds_per_image"] > 0
    assert report["training_s"]["cross_space"] > 0
    for stage in ("data", "bridge_training", "distillation", "evaluation", "total"):
        assert report["timings_s"][stage] >= 0
    assert report["settings"]["distill_steps"] < DEFAULTS["distill_steps"]  # the quick schedule ran
    md = (out / "report.md").read_text()
    for label in report["row_labels"].values():
        assert label in md
    with Image.open(out / "grid.png") as grid:
        # 4 rows (before, after cross-space, same-space, teacher) x (prompts x seeds) columns, >= 64 px per cell.
        cells = report["settings"]["grid_prompts"] * report["settings"]["grid_seeds"]
        assert grid.width >= cells * 64 and grid.height >= 4 * 64
    assert len(os.listdir(out / "data" / "images")) == 2 * report["settings"]["n_images"] + 1  # png + txt, stamp


@pytest.mark.slow
def test_benchmark_table_has_every_row_and_resumes(tmp_path, quick_world, monkeypatch):
    from training.shapes.benchmark import ROWS, benchmark

    out, doc = tmp_path / "bench", tmp_path / "bench.md"
    options = dict(distill_clip_relative=0.0, distill_timesteps="uniform")  # two options on: their ablations run
    summary = benchmark([0], str(out), quick_world, doc=str(doc), jobs=1, threads=1, quick=True, **options)
    # Options that are off have no "off" row; the image tap is the benchmark's own, the features tap gets its row.
    expected = set(ROWS) - {"off_clip", "off_timesteps", "cross_space_image"}
    assert set(summary["table"]) == expected
    for row in expected:
        assert 0 <= summary["table"][row]["accuracy"]["mean"] <= 1
        assert 0 <= summary["table"][row]["mean_attributes"]["mean"] <= 1
    for row in ("same_space", "cross_space", "cross_space_features", "synthetic", "cross_space_no_attn", "round_trip",
                "off_all"):
        assert summary["table"][row]["training_s"]["mean"] > 0
    by_task = {r["task"]: r for r in summary["results"]}
    assert "bridge" in by_task["cross_space_no_attn"]["training_s"]
    assert by_task["cross_space"]["training_s"]["bridge"] == by_task["bridge"]["training_s"]["bridge"]  # shared
    # Each tap has its Bridge: the features row distils through the features Bridge (its own checkpoint).
    assert by_task["bridge"]["tap"] == "image" and by_task["bridge_features"]["tap"] == "features"
    assert (by_task["cross_space_features"]["training_s"]["bridge"]
            == by_task["bridge_features"]["training_s"]["bridge"])
    from bridge.checkpoint import read_bridge_metadata
    assert read_bridge_metadata(by_task["bridge_features"]["bridge"])["tap"] == "features"
    quality = summary["bridge_quality"]
    assert set(quality) == {"bridge_image", "bridge_features", "bridge_no_attn", "round_trip"}
    for entry in quality.values():
        assert entry["image_psnr"]["mean"] > 0 and 0 <= entry["latent_mse"]["mean"]
        blocks = [k for k in entry if k.startswith("attn_sim/")]
        if blocks:  # the mean over the teacher's blocks, where the validation measured them
            mean = sum(entry[k]["mean"] for k in blocks) / len(blocks)
            assert entry["attn_sim_mean"]["mean"] == pytest.approx(mean)
    # Equal wall time: same-space and the baseline get the cross-space row's training time as their budget.
    cross = sum(by_task["cross_space"]["training_s"].values())
    for task in ("same_space", "synthetic", "regression_only", "regression_round_trip", "direct_regression"):
        assert by_task[task]["time_budget_s"] == pytest.approx(cross)
    assert {"teacher_samples", "finetune", "distill"} <= set(by_task["synthetic"]["training_s"])
    # The regression baselines run no DMD step: every logged step is a regression (warm-up) step.
    for task in ("regression_only", "regression_round_trip", "direct_regression"):
        metrics = [json.loads(line) for line in (out / "seed0" / task / "distill" / "metrics.jsonl").open()]
        assert metrics and all(m.get("warmup") == 1.0 for m in metrics)
    assert by_task["regression_only"]["training_s"]["bridge"] == by_task["bridge"]["training_s"]["bridge"]
    assert "bridge" not in by_task["regression_round_trip"]["training_s"] and by_task["direct_regression"]["teacher_samples_s"] > 0
    # The variants: the GAN term trained its discriminator; twice and four times the DMD steps ran.
    assert "gan_d_real" in by_task["variant_gan"]["distill_last_metrics"]
    assert by_task["variant_long_dmd"]["distill_steps"] == by_task["cross_space"]["distill_steps"] + summary["settings"]["distill_steps"]
    assert by_task["variant_dmd_x4"]["distill_steps"] == by_task["cross_space"]["distill_steps"] + 3 * summary["settings"]["distill_steps"]
    # Learning curves: each distilled row scored its snapshots; the figure is beside the table and shown in it.
    for task in ("cross_space", "same_space", "synthetic", "direct_regression"):
        points = by_task[task]["curve"]
        assert len(points) >= 2 and points[-1]["s"] == pytest.approx(sum(by_task[task]["training_s"].values()))
        assert all(0 <= p["accuracy"] <= 1 for p in points) and [p["s"] for p in points] == sorted(p["s"] for p in points)
    assert {"cross_space", "same_space", "synthetic"} <= set(summary["curves"])
    assert "![learning curves](bench_curves.png)" in doc.read_text() and (tmp_path / "bench_curves.png").stat().st_size
    text = doc.read_text()
    for row in expected:
        assert summary["row_labels"][row] in text
    assert "knowledge gap" in text.lower()
    assert "Bridge quality on held-out images" in text and "features tap" in text
    # Held-out captions (issue 25): the columns are measured on them, the captions distillation saw beside.
    assert summary["settings"]["held_out_captions"] == 150
    assert "**Held-out captions:** 150" in text and "seen captions |" in text
    for row in expected:
        assert 0 <= summary["table"][row]["seen_accuracy"]["mean"] <= 1
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["name"] for r in rows} == expected
    # The seed's sample grid: start, same-space, synthetic, cross-space, teacher (prompts x seeds columns), copied
    # beside the table and shown in it.
    from PIL import Image

    st = summary["settings"]
    assert summary["grids"] == {"0": str(out / "seed0" / "grid.png")}
    with Image.open(tmp_path / "bench_grid.png") as grid, Image.open(out / "seed0" / "grid.png") as own:
        assert grid.size == own.size
        assert grid.width >= st["grid_prompts"] * st["grid_seeds"] * 64 and grid.height >= 5 * 64
        assert (grid.height - 2) / 5 - 2 in (64, 128)  # exactly five rows of one image size (2 px padding)
    assert "![sample grid](bench_grid.png)" in text
    for r in rows:
        assert r["seeds"][0]["seed"] == 0 and set(r["seeds"][0]) >= {"accuracy", "background", "fd", "training_s"}
    # Sample diversity (issue 25: what DMD adds over regression): every distilled row and the teacher, from the
    # students the tasks saved, cached per seed; a column of the table and a clause of each comparison.
    distilled = expected - {"teacher", "student_base", "student_base_one_step", "student_base_start",
                            "student_vae_ceiling"}
    assert all(summary["table"][row]["diversity"]["mean"] > 0 for row in distilled)
    assert summary["table"]["teacher"]["diversity"]["mean"] > 0 and summary["teacher_diversity"]["values"]
    cached = json.loads((out / "seed0" / "diversity.json").read_text())
    assert set(cached["rows"]) == distilled | {"teacher"} and cached["prompts"] == st["diversity_prompts"]
    assert "within-prompt spread (real scenes = 1)" in text
    # Finished tasks are kept: a second call only re-aggregates.
    results = sorted((out / "seed0").glob("*/result.json"))
    assert len(results) == 19
    stamps = [p.stat().st_mtime_ns for p in results]
    diversity_stamp = (out / "seed0" / "diversity.json").stat().st_mtime_ns
    again = benchmark([0], str(out), quick_world, doc=str(doc), jobs=1, threads=1, quick=True, **options)
    assert again["table"]["cross_space"]["accuracy"] == summary["table"]["cross_space"]["accuracy"]
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert again["table"]["cross_space"]["diversity"] == summary["table"]["cross_space"]["diversity"]
    assert (out / "seed0" / "diversity.json").stat().st_mtime_ns == diversity_stamp  # nothing sampled again
    # A benchmark resumed from another working directory finds each seed's Bridge in its own folder (the stored
    # path is relative to the directory of the run that wrote it).
    import shutil

    shutil.rmtree(out / "seed0" / "off_all")
    stored = json.loads((out / "seed0" / "bridge" / "result.json").read_text())
    stored["bridge"] = os.path.join("bench", "seed0", "bridge", "bridge.safetensors")  # as if run from tmp_path
    (out / "seed0" / "bridge" / "result.json").write_text(json.dumps(stored))
    monkeypatch.chdir(out / "data")
    resumed = benchmark([0], str(out), quick_world, doc="", jobs=1, threads=1, quick=True, **options)
    assert "off_all" in resumed["table"]
    # --report-only tables what is finished: a missing task is left out, and a row with fewer seeds says so.
    shutil.rmtree(out / "seed0" / "round_trip")
    partial = benchmark([0, 1], str(out), quick_world, doc=str(doc), jobs=1, threads=1, quick=True,
                        report_only=True, **options)
    assert "round_trip" not in partial["table"] and not (out / "seed1").exists()
    assert "(1 of 2 seeds)" in doc.read_text()
    with pytest.raises(ValueError, match="other settings"):
        benchmark([0], str(out), quick_world, doc="", jobs=1, threads=1, quick=True, distill_steps=5)


def test_findings_compare_sample_diversity_by_the_seeds_spread():
    from training.shapes.benchmark import findings

    def entry(*values):
        m = sum(values) / len(values)
        sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        return {"mean": m, "std": sd, "values": list(values)}

    row = lambda div: {"accuracy": entry(0.5, 0.52, 0.48), "mean_attributes": entry(0.8, 0.81, 0.79),
                       "background": entry(0.9, 0.91, 0.89), "fd": entry(40.0, 42.0, 38.0), "diversity": div}
    table = {"cross_space": row(entry(0.9, 0.92, 0.88)), "direct_regression": row(entry(0.3, 0.35, 0.25)),
             "regression_only": row(entry(0.88, 0.93, 0.86))}
    lines = "\n".join(findings(table, "background"))
    assert "within-prompt spread 0.90 vs 0.30 (+0.60, clearly higher)" in lines
    assert "within-prompt spread 0.90 vs 0.89 (+0.01, within noise)" in lines
    table["regression_only"]["diversity"] = None  # a row without the figure: no clause, the rest unchanged
    line = next(x for x in findings(table, "background") if x.startswith("- What DMD adds"))
    assert "within-prompt spread" not in line and "FD 40.0 vs 40.0" in line


def test_sample_diversity_is_zero_for_one_image_per_prompt_and_near_one_for_the_worlds_scenes(quick_world):
    from training.shapes import models
    from training.shapes.evaluate import eval_prompts, prompt_diversity, sample_diversity
    from training.shapes.render import render, scenes_from_captions

    world = models.load_shapes_world(quick_world, register=False)
    fixed = lambda p, g: torch.cat([render(scenes_from_captions([q], torch.Generator().manual_seed(0)), 64)
                                    for q in p])  # noise ignored: one image per prompt
    scenes = lambda p, g: render(scenes_from_captions(p, g), 64)  # fresh jitter, as the reference's
    d = sample_diversity(world, {"fixed": fixed, "scenes": scenes}, eval_prompts(8, 0), k=8, seed=0)
    assert d["reference"] > 0 and d["fixed"] < 1e-3 and 0.7 < d["scenes"] < 1.3
    with pytest.raises(ValueError, match="groups of k"):
        prompt_diversity(world.judge, torch.zeros(7, 3, 64, 64), 4)


@pytest.mark.slow
def test_default_run_stops_on_ctrl_c_and_the_same_command_resumes(tmp_path, quick_world, monkeypatch):
    """Ctrl-C in the Bridge stage: the run stops there (no distillation on a half-trained Bridge), exits 130, and
    the same command resumes the Bridge from its saved step and finishes; other settings in that folder refuse."""
    import json

    from training import loop
    from training.shapes import run as shapes_run

    out = tmp_path / "run"
    args = ["--out", str(out), "--world", quick_world, "--quick", "--threads", "1", "--bridge-steps", "6"]
    real_update = loop.ProgressReporter.update

    def interrupt_at_step_2(self, step, metrics=None, preview=None):
        if self.desc == "bridge" and step == 2:
            os.kill(os.getpid(), __import__("signal").SIGINT)  # the graceful handler sets the stop flag
        return real_update(self, step, metrics, preview)

    monkeypatch.setattr(loop.ProgressReporter, "update", interrupt_at_step_2)
    assert shapes_run.main(args) == 130
    assert not (out / "distill").exists() and not (out / "report.json").exists()
    monkeypatch.setattr(loop.ProgressReporter, "update", real_update)
    assert shapes_run.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["bridge"]["resumed_from"] == 2 and report["bridge"]["steps"] == 6
    with pytest.raises(ValueError, match="another world, seed or settings"):
        shapes_run.main(args[:-1] + ["7"])


def test_regression_probe_fits_its_pairs_and_reports(tmp_path):
    """The probe's student learns the (noise -> 25-step sample) map it is given, and the command prints its table."""
    import json

    import torch.nn.functional as F

    from training.shapes.probe import main, regression_pairs, train_regression
    from training.shapes.run import training_prompts
    from training.student import OneStepStudent

    world = models.load_shapes_world(register=False)
    prompts = training_prompts()[:8]
    idx, noise, target = pairs = regression_pairs(world, prompts, 16, seed=0)
    assert noise.shape == target.shape == (16, 4, 8, 8)
    # The targets are the student base's own default sampling from that noise.
    torch.testing.assert_close(target[:2], world.sample_student([prompts[i] for i in idx[:2]], noise=noise[:2]))
    hidden = world.encode_student_prompts(prompts)[idx]

    def error(unet):
        student = OneStepStudent(unet, space=world.student_space, schedule=world.config["student_schedule"],
                                 timestep=700)
        with torch.no_grad():
            return F.mse_loss(student.forward_model(noise, hidden), target).item()

    before = error(world.student_unet)
    trained = train_regression(world, prompts, pairs, steps=30, batch_size=8, lr=1e-4, seed=0, progress=False,
                               timestep=700)
    assert error(trained) < 0.5 * before
    assert not trained.training and not any(p.requires_grad for p in trained.parameters())
    assert all(p.requires_grad is False for p in world.student_unet.parameters())  # the base stays untouched

    out = tmp_path / "probe.json"
    assert main(["--steps", "2", "--pairs", "8", "--eval", "8", "--lr", "1e-4", "--timesteps", "999", "700",
                 "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for row in ("student_base_one_step_t999", "regression_t999_lr0.0001", "student_base_one_step_t700",
                "regression_t700_lr0.0001"):
        assert 0 <= result[row]["accuracy"] <= 1 and result[row]["fd"] >= 0
    assert result["regression_t700_lr0.0001"]["train_s"] > 0 and result["settings"]["steps"] == 2


def test_student_rows_at_999_are_the_one_step_base_sampler_noise_for_noise():
    from training.shapes.evaluate import base_generators, eval_generator
    from training.shapes.run import start_rows, student_generator

    world = models.load_shapes_world(register=False)
    prompts = ["a red circle on a blue background, center", "a green square on a white background, top left"]
    base = base_generators(world)["student_base_one_step"](prompts, eval_generator(3))
    torch.testing.assert_close(student_generator(world, world.student_unet)(prompts, eval_generator(3)), base,
                               atol=1e-4, rtol=0)
    assert start_rows(world, {"student_timestep": 999}) == {}
    at_700 = start_rows(world, {"student_timestep": 700})["student_base_start"](prompts, eval_generator(3))
    assert at_700.shape == base.shape and not torch.allclose(at_700, base, atol=1e-2)


def test_benchmark_tasks_come_with_what_they_need():
    from training.shapes.benchmark import phases
    from training.shapes.run import DEFAULTS

    assert phases(DEFAULTS, ("synthetic",)) == [("bridge",), ("cross_space",), ("synthetic",)]
    assert phases(DEFAULTS, ("off_all", "base")) == [("bridge", "base"), ("off_all",), ()]
    with pytest.raises(ValueError, match="Unknown benchmark tasks"):
        phases(DEFAULTS, ("nonsense",))


@pytest.mark.slow
def test_relearn_fine_tunes_the_student_base_and_scores_it(tmp_path, quick_world):
    """The re-learning diagnostic: step 0 is the student base itself; each --steps value is its own fine-tune of it
    on teacher samples (weights change), scored with the base's sampler; a rerun reuses the saved fine-tunes."""
    import json

    from training.shapes import relearn

    out = tmp_path / "relearn"
    rows = relearn.relearn(str(out), [2], quick_world, n_samples=8, n_eval=8, batch=4, threads=1)
    assert [r["steps"] for r in rows] == [0, 2] and rows[0]["finetune_s"] == 0 < rows[1]["finetune_s"]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["background"] <= 1
    world = models.load_shapes_world(quick_world, register=False)
    from diffusers import UNet2DConditionModel

    tuned = UNet2DConditionModel.from_pretrained(str(out / "finetune_2_lr0.0002_b4"))
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), world.student_unet.parameters()))
    again = relearn.relearn(str(out), [2], quick_world, n_samples=8, n_eval=8, batch=4, threads=1)
    assert again[1]["finetune_s"] == rows[1]["finetune_s"]  # reused, not trained again
    saved = json.loads((out / "relearn.json").read_text())
    assert saved["rows"] == again and saved["gap"] == world.config["knowledge_gap"]["attribute"]


@pytest.mark.slow
def test_fake_score_diagnostic_loads_the_runs_fake_lora(tmp_path, quick_world):
    """The fake-score diagnostic rebuilds the distillation's fake score from its training state (the saved LoRA,
    not a fresh zero one) and scores it next to the teacher; a state from another rank is refused."""
    from training.shapes import relearn
    from training.shapes import run as shapes_run
    from training.shapes.adapters import RoundTripBridge
    from training.state import read_module_tensors

    world = models.load_shapes_world(quick_world, register=False)
    bridge = RoundTripBridge(world.student_vae, world.teacher_vae, world.student_space, world.teacher_space, world.k)
    out = tmp_path / "distill"
    unet, _ = shapes_run.distill_student(world, str(out), "cross", shapes_run.QUICK, bridge=bridge)
    saved = read_module_tensors(out / "train_state.safetensors", "fake")
    # Trained: lora_B (zero at init; every second tensor) moved in most layers (a last block's unused context
    # projections get no gradient).
    b = [saved[f"params.{i}"] for i in range(1, len(saved), 2)]
    assert sum(bool(t.abs().sum() > 0) for t in b) > len(b) // 2
    result = relearn.fake_score(str(out), quick_world, n_eval=8, threads=1, bridge=bridge)
    assert set(result["rows"]) == {"teacher_cfg1", "fake_score_cfg1"}
    assert [r["s"] for r in result["by_noise_level"]] == list(relearn.NOISE_LEVELS)
    for r in result["by_noise_level"]:
        assert all(0 <= r[f"{who}_follows_{what}"] <= 1 for who in ("real", "fake") for what in ("prompt", "sample"))
    for row in result["rows"].values():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row[result["gap"]] <= 1
    with pytest.raises(ValueError, match="another --rank"):
        relearn.fake_score(str(out), quick_world, n_eval=8, rank=shapes_run.QUICK["fake_rank"] + 1, threads=1)


@pytest.mark.slow
def test_one_step_regression_diagnostic_scores_each_rate_pair(tmp_path, quick_world, capsys):
    """--one-step: one regression run of the one-step student per LR:CROSS_LR pair, scored and saved; a malformed
    pair is a usage error."""
    import json

    from training.shapes import relearn

    out = tmp_path / "one_step"
    rows = relearn.one_step(str(out), [(1e-3, 0.0), (0.0, 1e-2)], 2, quick_world, n_samples=8, n_eval=8, threads=1,
                            batch=4)
    assert [(r["lr"], r["cross_attention_lr"]) for r in rows] == [(1e-3, 0.0), (0.0, 1e-2)]
    for r in rows:
        assert r["steps"] == 2 and r["seconds"] > 0 and 0 <= r["accuracy"] <= 1 and 0 <= r["background"] <= 1
    assert json.loads((out / "one_step.json").read_text())["rows"] == rows
    with pytest.raises(SystemExit):
        relearn.main(["--one-step", "fast"])
    assert "LR:CROSS_LR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        relearn.main(["--bridge", "bridge.safetensors"])
    assert "--bridge goes with --fake-score" in capsys.readouterr().err


def test_held_out_captions_never_reach_distillation_data_and_are_what_is_evaluated(tmp_path, quick_world):
    """Issue 25: with held-out captions, the Bridge images, the regression pairs, the DMD prompts and the synthetic
    samples use none of them; the evaluation scores n prompts among them and, beside, n among the others."""
    import glob

    from safetensors import safe_open

    from training.distill import Distiller
    from training.shapes import models
    from training.shapes import run as shapes_run
    from training.shapes.adapters import RoundTripBridge
    from training.shapes.evaluate import eval_prompt_sets, evaluate_generators
    from training.shapes.render import all_captions, held_out_captions

    held = held_out_captions(150)
    assert len(set(held)) == 150 and held[:100] == held_out_captions(100)  # fixed, a larger set extends a smaller
    assert set(shapes_run.training_prompts(150)) == set(all_captions()) - set(held)
    assert shapes_run.training_prompts(0) == all_captions()
    images = shapes_run.render_images(str(tmp_path / "images"), 200, seed=0, held_out=150)
    captions = [open(p).read().strip() for p in glob.glob(os.path.join(images, "*.txt"))]
    assert len(captions) == 200 and not set(captions) & set(held)
    everything = shapes_run.render_images(str(tmp_path / "all"), 200, seed=0)  # without: the same stream as before
    assert set(open(p).read().strip() for p in glob.glob(os.path.join(everything, "*.txt"))) & set(held)

    world = models.load_shapes_world(quick_world, register=False)
    settings = dict(shapes_run.QUICK, held_out_captions=150, regression_n=16)
    bridge = RoundTripBridge(world.student_vae, world.teacher_vae, world.student_space, world.teacher_space, world.k)
    unet, result = shapes_run.distill_student(world, str(tmp_path / "distill"), "cross", settings, bridge=bridge)
    with safe_open(str(tmp_path / "distill" / "pairs.safetensors"), "pt") as f:
        pair_prompts = json.loads(f.metadata()["prompts"])
    with safe_open(str(tmp_path / "distill" / Distiller.STUDENT_FILE), "pt") as f:
        dmd_prompts = json.loads(f.metadata()["training_summary"])["config"]["prompts"]
    assert len(pair_prompts) == 16 and not set(pair_prompts) & set(held)
    assert set(dmd_prompts) == set(all_captions()) - set(held)
    data = shapes_run.synthetic_data(world, str(tmp_path / "synthetic.safetensors"), 64, seed=0, held_out=150)
    assert len(data["prompts"]) == 64 and not set(data["prompts"]) & set(held)
    again = shapes_run.synthetic_data(world, str(tmp_path / "synthetic.safetensors"), 64, seed=0, held_out=150)
    assert torch.equal(again["latents"], data["latents"])  # reused: drawn at the same CFG
    # --guidance reaches the baselines' teacher samples: the saved ones (the teacher's own CFG) are drawn again.
    guided = shapes_run.synthetic_data(world, str(tmp_path / "synthetic.safetensors"), 64, seed=0, held_out=150,
                                       cfg=3.0)
    assert guided["prompts"] == data["prompts"] and not torch.allclose(guided["latents"], data["latents"])

    sets = eval_prompt_sets(12, 0, held)
    assert set(sets["held_out"]) <= set(held) and not set(sets["seen"]) & set(held)
    asked = []

    def generator(prompts, g):
        asked.extend(prompts)
        return world.decode_student(world.sample_student(prompts, generator=g, steps=1, cfg=1.0))

    scores = evaluate_generators(world, {"row": generator}, n=12, seed=0, batch_size=12, held_out=held)
    assert asked == sets["held_out"] + sets["seen"] and scores["held_out_captions"] == 150
    assert 0 <= scores["row"]["accuracy"] <= 1 and 0 <= scores["row"]["seen"]["accuracy"] <= 1


@pytest.mark.slow
def test_a_resumed_run_reports_what_an_uninterrupted_one_does_and_its_times_sum_its_parts(tmp_path, quick_world,
                                                                                           monkeypatch):
    """Issue 24: stopped (Ctrl-C) in the Bridge stage and again in the distillation, the same command resumed to
    the end gives a report equal in every figure but wall times to an uninterrupted run's; its stage times and total
    are the sums over its three invocations (stages.json), each invocation's threads recorded per stage."""
    import json
    import time

    from training import loop
    from training.shapes import run as shapes_run

    base = ["--world", quick_world, "--quick", "--threads", "1", "--bridge-steps", "6"]
    assert shapes_run.main(["--out", str(tmp_path / "once")] + base) == 0
    once = json.loads((tmp_path / "once" / "report.json").read_text())

    real_update = loop.ProgressReporter.update
    stops = {"bridge": 2, "distill": 3}

    def interrupt(self, step, metrics=None, preview=None):
        if stops.get(self.desc) == step:
            del stops[self.desc]
            os.kill(os.getpid(), __import__("signal").SIGINT)  # the graceful handler sets the stop flag
        return real_update(self, step, metrics, preview)

    monkeypatch.setattr(loop.ProgressReporter, "update", interrupt)
    out = tmp_path / "resumed"
    walls, codes = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        codes.append(shapes_run.main(["--out", str(out)] + base))
        walls.append(time.perf_counter() - t0)
    assert codes == [130, 130, 0] and not stops
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["bridge"]["resumed_from"] == 6 and resumed["student"]["resumed_from"] == 3  # last invocation

    def figures(report):
        r = {k: v for k, v in report.items() if k not in ("timings_s", "training_s", "invocations", "stage_threads")}
        r["evaluation"] = {row: {k: v for k, v in ev.items() if k != "seconds_per_image"} if isinstance(ev, dict)
                           else ev for row, ev in report["evaluation"].items()}
        r["bridge"] = {k: v for k, v in report["bridge"].items() if k != "resumed_from"}
        r["student"] = {k: v for k, v in report["student"].items() if k != "resumed_from"}
        return r

    assert figures(resumed) == figures(once)
    assert "mean_attributes" in resumed["evaluation"]["cross_space"]
    assert "mean attribute" in (out / "report.md").read_text()

    invocations = json.loads((out / "stages.json").read_text())["invocations"]
    assert len(invocations) == resumed["invocations"] == 3 and once["invocations"] == 1
    for stage in ("bridge_training", "distillation"):
        parts = [inv["stages"][stage] for inv in invocations if stage in inv["stages"]]
        assert len(parts) == (3 if stage == "bridge_training" else 2)  # rerun to its end, then found finished
        assert resumed["timings_s"][stage] == pytest.approx(sum(parts))
        assert resumed["stage_threads"][stage] == [1] * len(parts)
    assert resumed["timings_s"]["total"] == pytest.approx(sum(inv["total"] for inv in invocations))
    for inv, wall in zip(invocations, walls):
        assert 0 < inv["total"] <= wall  # each part is this invocation's own time
    assert resumed["timings_s"]["total"] > max(inv["total"] for inv in invocations)  # all parts, not the last
    assert resumed["training_s"]["cross_space"] == pytest.approx(
        resumed["timings_s"]["bridge_training"] + resumed["timings_s"]["distillation"])
    assert "summed over the run's 3 invocations" in (out / "report.md").read_text()


def test_threads_follow_the_request_the_environment_or_the_load(monkeypatch):
    from training.shapes import run as shapes_run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert shapes_run.choose_threads(3) == (3, "--threads")
    monkeypatch.setattr(shapes_run.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(shapes_run.os, "getloadavg", lambda: (shapes_run.BUSY_LOAD + 1, 0.0, 0.0))
    threads, why = shapes_run.choose_threads()
    assert threads == 1 and "other work is running" in why
    monkeypatch.setattr(shapes_run.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert shapes_run.choose_threads()[0] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert shapes_run.choose_threads() == (2, "OMP_NUM_THREADS")
    report = {"threads": 1, "stage_threads": {"bridge_training": [2, 1], "distillation": [1]}}
    assert shapes_run.threads_text(report) == "CPU threads per stage: bridge_training 2 then 1, distillation 1"
    assert shapes_run.threads_text({"threads": 2, "stage_threads": {"data": [2]}}) == "2 CPU thread(s)"


def test_setting_choices_and_the_default_world_are_the_librarys():
    """settings.py spells them out to stay free of torch; they must agree with the library's."""
    from training.distill import GRAD_NORMS
    from training.dmd import TIMESTEP_DISTS
    from training.shapes import settings
    from training.shapes.models import DEFAULT_DIR

    choices = settings.setting_choices()
    assert tuple(choices["distill_timesteps"]) == TIMESTEP_DISTS and tuple(choices["distill_grad_norm"]) == GRAD_NORMS
    assert settings.DEFAULT_WORLD == DEFAULT_DIR and os.path.isdir(DEFAULT_DIR)
    assert set(settings.SETTINGS_HELP) == set(settings.DEFAULTS) and not settings.setting_problems(settings.DEFAULTS)


def test_curve_section_names_the_snapshot_interval_only_when_this_run_saved_them():
    from training.shapes.benchmark import curve_markdown
    curve = {"seeds": [0, 1], "t": [100.0, 145.0], "accuracy": {"mean": [0.1, 0.3]},
             "background": {"mean": [0.5, 0.8]}, "mean_attributes": {"mean": [0.6, 0.7]}}
    summary = {"curves": {"cross_space": curve}, "row_labels": {"cross_space": "cross-space"}, "gap": "background",
               "settings": {"curve_every_s": 45.0, "curve_eval_samples": 150}}
    text = "\n".join(curve_markdown(summary))
    assert "saved every 45 s of training" in text and "| cross-space | 2 | 100 | 145 | 0.100 -> 0.300 |" in text
    # A report over results copied in (this invocation saved no snapshots) does not claim an interval of 0 s.
    summary["settings"]["curve_every_s"] = 0.0
    text = "\n".join(curve_markdown(summary))
    assert "every 0 s" not in text and "rows run with snapshots" in text
    assert curve_markdown(dict(summary, curves={})) == []
