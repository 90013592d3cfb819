"""Kill-and-rerun of the demo runs: killed while generating their data or between their final saves, a rerun ends
with every promised file present and identical to an uninterrupted run.

The kill is simulated in-process: a `_Killed` (a BaseException, like KeyboardInterrupt) raised at the injected
point, and every later checkpoint write dies before it writes, so the run folder is left exactly as a SIGKILL at
that point leaves it (the trainers' own crash handlers cannot save anything more)."""

import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from bridge import checkpoint

RUN_FILES = ("bridge.safetensors", "student_unet.safetensors", "train_state.safetensors")


class _Killed(BaseException):
    pass


def _kill_after_checkpoint_writes(monkeypatch, n: int) -> None:
    """Die right after the n-th write of a run's Bridge / student / state file; nothing is written after it."""
    real = checkpoint.save_safetensors_atomic
    done = {"n": 0}

    def write(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) not in RUN_FILES:
            return real(path, *args, **kwargs)
        if done["n"] >= n:
            raise _Killed()
        real(path, *args, **kwargs)
        done["n"] += 1
        if done["n"] == n:
            raise _Killed()

    monkeypatch.setattr(checkpoint, "save_safetensors_atomic", write)


def _kill_in_image_save(monkeypatch, at: int) -> None:
    """Die while writing the at-th PNG, leaving it half written."""
    real = Image.Image.save
    calls = {"n": 0}

    def save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n\x00\x00")
            raise _Killed()
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def _files(folder) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def _safetensors(path) -> tuple[dict, dict]:
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def _assert_same_run(reference, out, differ=()) -> None:
    """Same files with the same content. Safetensors files by header fields and tensors (the order of the header
    fields varies between writes), the training state by its tensors (its header records the training seconds);
    `differ`: files whose content depends on when they were written (cache manifests' mtimes)."""
    ref, got = _files(reference), _files(out)
    assert sorted(got) == sorted(ref)
    for name in ref:
        if name.endswith(".safetensors"):
            meta_a, a = _safetensors(os.path.join(reference, name))
            meta_b, b = _safetensors(os.path.join(out, name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: other tensors"
            if os.path.basename(name) == "pairs.safetensors":  # records the seconds making them took
                meta_a.pop("seconds"), meta_b.pop("seconds")
            if os.path.basename(name) != "train_state.safetensors":
                assert meta_a == meta_b, f"{name}: other header"
        elif name.endswith("tokenizer.json"):
            # The tokenizers library saves the truncation/padding of its last call: a rerun that finds the prompt
            # cache made never calls it. Everything else (vocabulary, merges, normalisation) must be the same.
            a, b = (json.loads(x[name]) for x in (ref, got))
            for d in (a, b):
                d.pop("truncation"), d.pop("padding")
            assert a == b, name
        elif name not in differ:
            assert got[name] == ref[name], f"{name} differs from the uninterrupted run"


def _stale_temporary(out) -> str:
    """What a kill in the middle of a save leaves behind."""
    path = os.path.join(out, ".train_state.safetensors.ab12cd34.tmp")
    with open(path, "wb") as f:
        f.write(b"\x00" * 64)
    return path


@pytest.mark.slow
def test_bridge_demo_killed_in_data_generation_and_between_final_saves_reruns_to_the_same_result(
        tmp_path, monkeypatch, capsys):
    from training.run import main

    monkeypatch.chdir(tmp_path)  # the demo writes runs/bridge-demo under the working directory
    args = ["bridge", "--demo", "--steps", "2", "--val-every", "2", "--ckpt-every", "1", "--student-res", "32"]
    assert main(args) == 0
    os.rename("runs", "reference")
    out = os.path.join("runs", "bridge-demo")

    with monkeypatch.context() as m:
        _kill_in_image_save(m, at=6)
        with pytest.raises(_Killed):
            main(args)
    assert not os.path.exists(os.path.join(out, "images"))  # absent, not half there
    with monkeypatch.context() as m:
        _kill_after_checkpoint_writes(m, 3)  # steps 1 and 2 save two files each: killed in the middle of step 2's
        with pytest.raises(_Killed):
            main(args)
    stale = _stale_temporary(out)
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"Bridge checkpoint: {out}/bridge.safetensors" in printed
    assert not os.path.exists(stale)
    _assert_same_run(os.path.join("reference", "bridge-demo"), out,
                     differ=("cache/train/manifest.json", "cache/val/manifest.json"))

    # Resumed when already finished (and the Bridge lost): it is written again, the same.
    os.remove(os.path.join(out, "bridge.safetensors"))
    assert main(args) == 0
    _assert_same_run(os.path.join("reference", "bridge-demo"), out,
                     differ=("cache/train/manifest.json", "cache/val/manifest.json"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:No demo Bridge")  # no Bridge demo run here: the untrained Bridge
def test_distill_demo_killed_in_data_generation_and_between_final_saves_reruns_to_the_same_result(
        tmp_path, monkeypatch, capsys):
    from training.models import text
    from training.run import main

    monkeypatch.chdir(tmp_path)
    args = ["distill", "--demo", "--steps", "2", "--sample-every", "2", "--ckpt-every", "1", "--fake-updates", "1"]
    assert main(args) == 0
    os.rename("runs", "reference")
    out = os.path.join("runs", "distill-demo")

    real_write = text.write_text_store
    calls = {"n": 0}

    def write(path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # killed while writing the third embedding file of the prompt cache
            raise _Killed()
        return real_write(path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(text, "write_text_store", write)
        with pytest.raises(_Killed):
            main(args)
    with monkeypatch.context() as m:
        _kill_after_checkpoint_writes(m, 3)
        with pytest.raises(_Killed):
            main(args)
    stale = _stale_temporary(out)
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    for line in printed.splitlines():
        if line.startswith(("Student checkpoint: ", "SD1.5 checkpoint: ")):
            assert os.path.exists(line.split(": ", 1)[1]), line
    assert f"Student checkpoint: {out}/student_unet.safetensors" in printed
    assert not os.path.exists(stale)
    _assert_same_run(os.path.join("reference", "distill-demo"), out)
