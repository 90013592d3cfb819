"""`python -m training.run`: dispatch, help, and a start-up path that does not load torch for --help."""

import os
import subprocess
import sys

import pytest

from training.run import COMMANDS, main


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys; from training.run import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
    for name in ("shapes", *COMMANDS):
        assert name in out


@pytest.mark.parametrize("command", ["bridge", "distill", "sample"])
def test_command_help_does_not_import_torch(command):
    code = ("import sys; from training.run import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--student" in out and out.strip().endswith("False"), out[-500:]


def test_distill_options_offer_and_default_to_the_librarys():
    """cli/distill.py spells its choices and defaults out to stay free of torch; they must be the library's."""
    import dataclasses

    from training import dmd, loop
    from training.cli import distill as cli
    from training.distill import GRAD_NORMS, DistillConfig
    from training.run import build_parser

    assert (cli.LOSSES, cli.TIMESTEP_DISTS, cli.S_MIN, cli.S_MAX) == (dmd.LOSSES, dmd.TIMESTEP_DISTS, dmd.S_MIN,
                                                                      dmd.S_MAX)
    assert cli.GRAD_NORMS == GRAD_NORMS and cli.OPTIMIZERS == loop.OPTIMIZERS
    fields = {f.name: f.default for f in dataclasses.fields(DistillConfig)
              if f.default is not dataclasses.MISSING}  # val_seeds: a list, given as text
    assert {k: fields[k] for k in vars(cli.DEFAULTS)} == vars(cli.DEFAULTS)
    # Every option named after a config field defaults to the field's default (or to None: decided by run()).
    parser = build_parser(load_commands="distill")
    args = parser.parse_args(["distill"])
    shown = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    assert len(shown) > 20 and shown == {k: fields[k] for k in shown}
    choices = {a.dest: tuple(a.choices) for sub in parser._subparsers._group_actions
               for a in sub.choices["distill"]._actions if a.choices}
    assert (choices["loss"], choices["timesteps"], choices["grad_norm"], choices["optimizer"]) == (
        dmd.LOSSES, dmd.TIMESTEP_DISTS, GRAD_NORMS, loop.OPTIMIZERS)


@pytest.mark.parametrize("argv", [["shapes", "--help"], ["bridge", "--help"], ["distill", "--help"],
                                  ["sample", "--help"]])
def test_every_command_has_its_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "--" in capsys.readouterr().out


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bridges"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bridge_without_models_or_demo_says_what_to_give(tmp_path, capsys):
    assert main(["bridge", "--images", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--student" in err and "--demo" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bad_input_from_the_command_line_is_one_error_line_not_a_traceback(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"world": "another world"}')  # a folder of another run: refused, kept
    proc = subprocess.run([sys.executable, "-m", "training.run", "shapes", "--out", str(out)], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "--fresh" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "run.json").read_text() == '{"world": "another world"}'


def test_options_without_a_command_go_to_the_default_run(monkeypatch):
    import training.shapes.run as shapes_run

    seen = []
    monkeypatch.setattr(shapes_run, "run_args", lambda args: seen.append((args.fresh, args.seed, args.quick)) or 0)
    assert main(["--fresh", "--seed", "3"]) == 0 and main([]) == 0 and main(["shapes", "--quick"]) == 0
    assert seen == [(True, 3, False), (False, 0, False), (False, 0, True)]


def test_shapes_help_documents_every_setting_by_stage_under_the_command_typed():
    """Issue 24: one line per setting saying what it does, grouped by stage, the usage naming the command the user
    typed, the threads and the expected time; answered without loading torch."""
    from training.shapes.settings import DEFAULTS, SETTINGS_HELP

    code = ("import sys; from training.run import main\n"
            "try:\n    main(['shapes', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, COLUMNS="200")).stdout
    assert out.strip().endswith("no torch")
    assert out.startswith("usage: python -m training.run shapes ")
    for stage in ("data", "Bridge training", "regression pairs and warm-up", "distillation (DMD)", "evaluation"):
        assert f"settings: {stage}:" in out
    lines = out.splitlines()
    for key in DEFAULTS:
        flag = "--" + key.replace("_", "-")
        i = next(i for i, line in enumerate(lines) if line.strip().startswith((flag + " ", flag + ",")))
        # One line each; only the on/off pairs (--x, --no-x) are too wide to share their line with the help.
        line = lines[i] + (lines[i + 1] if isinstance(DEFAULTS[key], bool) else "")
        assert SETTINGS_HELP[key][1][:30] in line and f"default {DEFAULTS[key]}" in line, line
    assert "--threads N" in out and "Expected time of the default run" in out


def test_bridge_demo_with_the_features_tap_at_k1(tmp_path, capsys):
    """`bridge --demo --tap features --k 1`: trains, and the written Bridge reads the decoder's features."""
    from bridge.checkpoint import read_bridge_metadata
    from training import data

    data.make_synthetic_images(str(tmp_path / "images"), n=4, size=64, seed=0)
    out = tmp_path / "run"
    assert main(["bridge", "--demo", "--tap", "features", "--k", "1", "--steps", "2", "--batch-size", "2",
                 "--images", str(tmp_path / "images"), "--out", str(out), "--val-fraction", "0.5"]) == 0
    meta = read_bridge_metadata(out / "bridge.safetensors")
    assert meta["tap"] == "features" and meta["k"] == 1 and meta["projector"]["downsample"] == 1
    assert "Bridge checkpoint:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bridge", "--demo", "--tap", "pixels"])
    assert e.value.code == 2
