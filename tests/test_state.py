"""Training state: exact resume (AdamW + warmup-cosine), trainable-only storage, refused files."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from training import loop
from training.state import TrainingStateError, load_training_state, save_training_state


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return m


def _objects(seed=0):
    m = _model(seed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    return m, opt, loop.lr_schedule(opt, warmup_steps=3, total_steps=20)


def _train(m, opt, sched, steps):
    for step in steps:
        g = loop.step_generator(7, step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def test_resume_is_bit_identical_to_a_straight_run(tmp_path):
    straight = _objects()
    _train(*straight, range(10))

    first = _objects()
    _train(*first, range(4))
    path = tmp_path / "state.safetensors"
    save_training_state(path, {"model": first[0]}, {"opt": first[1]}, {"sched": first[2]},
                        extra={"step": 4, "nested": {"lr": [1.5, (2, 3)], "name": "x"}})
    fresh = _objects(seed=123)  # different init: everything must come from the file
    extra = load_training_state(path, {"model": fresh[0]}, {"opt": fresh[1]}, {"sched": fresh[2]})
    assert extra == {"step": 4, "nested": {"lr": [1.5, (2, 3)], "name": "x"}}
    assert fresh[2].get_last_lr() == first[2].get_last_lr()
    _train(*fresh, range(4, 10))

    for (name, a), b in zip(straight[0].state_dict().items(), fresh[0].state_dict().values()):
        assert torch.equal(a, b), name  # includes BatchNorm running stats (buffers)
    assert fresh[2].get_last_lr() == straight[2].get_last_lr()
    assert fresh[1].state_dict()["param_groups"] == straight[1].state_dict()["param_groups"]


def test_only_trained_parameters_are_written(tmp_path):
    torch.manual_seed(0)
    frozen = nn.Linear(64, 64).requires_grad_(False)  # a "teacher": never written
    head = nn.Linear(4, 2)
    adapter = nn.Linear(4, 4)
    opt = torch.optim.SGD(list(head.parameters()) + list(adapter.parameters()), lr=0.1, momentum=0.9)
    adapter.requires_grad_(False)  # like a disabled peft adapter: still trained by the optimizer
    wrapper = nn.Module()
    wrapper.frozen, wrapper.head, wrapper.adapter = frozen, head, adapter
    ema = nn.Module()
    ema.register_buffer("p0", torch.randn(2, 4))  # EMA shadows are buffers
    path = tmp_path / "s.safetensors"
    save_training_state(path, {"net": wrapper, "ema": ema}, {"opt": opt}, {}, extra={})
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    names = {k for k in keys if k.startswith("module/")}
    assert names == {"module/net/head.weight", "module/net/head.bias", "module/net/adapter.weight",
                     "module/net/adapter.bias", "module/ema/p0"}

    ema2 = nn.Module()
    ema2.register_buffer("p0", torch.zeros(2, 4))
    wrapper2 = nn.Module()
    wrapper2.frozen, wrapper2.head, wrapper2.adapter = nn.Linear(64, 64).requires_grad_(False), nn.Linear(4, 2), \
        nn.Linear(4, 4)
    opt2 = torch.optim.SGD(list(wrapper2.head.parameters()) + list(wrapper2.adapter.parameters()), lr=0.1,
                           momentum=0.9)
    frozen_before = wrapper2.frozen.weight.clone()
    load_training_state(path, {"net": wrapper2, "ema": ema2}, {"opt": opt2}, {})
    assert torch.equal(ema2.p0, ema.p0) and torch.equal(wrapper2.adapter.weight, adapter.weight)
    assert torch.equal(wrapper2.frozen.weight, frozen_before)  # frozen weights untouched


def test_tied_weights_are_saved(tmp_path):
    m = nn.Module()
    m.a = nn.Linear(3, 3, bias=False)
    m.b = nn.Linear(3, 3, bias=False)
    m.b.weight = m.a.weight
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    save_training_state(tmp_path / "t.safetensors", {"m": m}, {"opt": opt}, {}, extra={})
    m2 = nn.Module()
    m2.a = nn.Linear(3, 3, bias=False)
    m2.b = nn.Linear(3, 3, bias=False)
    m2.b.weight = m2.a.weight
    load_training_state(tmp_path / "t.safetensors", {"m": m2}, {"opt": torch.optim.SGD(m2.parameters(), lr=0.1)}, {})
    assert torch.equal(m2.a.weight, m.a.weight) and m2.b.weight is m2.a.weight


def _saved(tmp_path):
    m, opt, sched = _objects()
    _train(m, opt, sched, range(2))
    path = tmp_path / "state.safetensors"
    save_training_state(path, {"model": m}, {"opt": opt}, {"sched": sched}, extra={"step": 2})
    return path


def test_missing_pickle_and_corrupt_files_are_refused(tmp_path):
    m, opt, sched = _objects()
    args = ({"model": m}, {"opt": opt}, {"sched": sched})
    with pytest.raises(TrainingStateError, match="not found"):
        load_training_state(tmp_path / "nope.safetensors", *args)
    pt = tmp_path / "state.pt"
    pt.write_bytes(b"\x80\x04whatever")
    with pytest.raises(TrainingStateError, match="pickle"):
        load_training_state(pt, *args)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    with pytest.raises(TrainingStateError, match="pickle"):
        load_training_state(disguised, *args)

    good = _saved(tmp_path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-50])
    with pytest.raises(TrainingStateError, match="truncated or corrupt"):
        load_training_state(truncated, *args)

    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(TrainingStateError, match="not a training state"):
        load_training_state(other, *args)


def test_state_of_another_trainer_or_model_is_refused_untouched(tmp_path):
    path = _saved(tmp_path)
    m, opt, sched = _objects(seed=5)
    before = [p.clone() for p in m.parameters()]
    with pytest.raises(TrainingStateError, match="different model/config"):
        load_training_state(path, {"student": m}, {"opt": opt}, {"sched": sched})  # other module names
    with pytest.raises(TrainingStateError, match="different model/config"):
        load_training_state(path, {"model": m}, {"opt": opt, "fake": opt}, {"sched": sched})
    bigger = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    opt_b = torch.optim.AdamW(bigger.parameters())
    with pytest.raises(TrainingStateError, match=r"shape \[16, 6\] in the file but \[32, 6\] here"):
        load_training_state(path, {"model": bigger}, {"opt": opt_b}, {"sched": loop.lr_schedule(opt_b, 1, 5)})
    # Same module, optimizer over fewer parameters.
    opt_few = torch.optim.AdamW(list(m.parameters())[:2])
    with pytest.raises(TrainingStateError, match="parameter groups"):
        load_training_state(path, {"model": m}, {"opt": opt_few}, {"sched": loop.lr_schedule(opt_few, 1, 5)})
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_header_is_json_and_no_pickle_is_involved(tmp_path):
    path = _saved(tmp_path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "cross-space-training-state"
    state = json.loads(meta["state"])
    assert state["extra"] == {"step": 2}
    assert state["optimizers"]["opt"]["param_groups"]  # structure in the header, tensors in the file
    assert os.path.getsize(path) > 0
