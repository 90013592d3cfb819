"""nodes/_errors.py without ComfyUI: how the pack's errors and missing packages reach a ComfyUI user (the same module
runs inside ComfyUI in tests/test_comfyui_integration.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What ComfyUI names the pack: its folder's path (dots replaced), then the module inside.
COMFY_ROOT = "/home/user/ComfyUI/custom_nodes/cross-space-distillation"


@pytest.fixture(scope="module")
def errors():
    name = COMFY_ROOT + ".nodes._errors"
    spec = importlib.util.spec_from_file_location(name, ROOT / "nodes" / "_errors.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def _node(errors, exc):
    class Node:
        @classmethod
        @errors.clean_errors
        def execute(cls, x):
            raise exc

    return Node


def test_pack_errors_leave_nodes_as_builtin_classes(errors):
    # As ComfyUI would print it: module-qualified, i.e. with the pack's path.
    ModelLoadError = type("ModelLoadError", (ValueError,), {"__module__": COMFY_ROOT + ".training.models.loading"})
    original = ModelLoadError("'x.safetensors' does not fit the SD1.5 UNet config")
    with pytest.raises(ValueError) as e:
        _node(errors, original).execute(1)
    assert type(e.value) is ValueError and str(e.value) == str(original) and e.value.__cause__ is original

    Diverged = type("TrainingDiverged", (RuntimeError,), {"__module__": COMFY_ROOT + ".training.loop"})
    with pytest.raises(RuntimeError) as e:
        _node(errors, Diverged("NaN loss")).execute(1)
    assert type(e.value) is RuntimeError

    # Other libraries' errors pass unchanged: their module names carry no path.
    Other = type("HFValidationError", (ValueError,), {"__module__": "huggingface_hub.errors"})
    with pytest.raises(Other):
        _node(errors, Other("bad repo id")).execute(1)


def test_missing_packages_are_named_with_the_install_command(errors, monkeypatch):
    errors.require("Train Bridge", ("json",))  # importable: nothing raised
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as for a package never installed
    with pytest.raises(RuntimeError) as e:
        errors.require("Distill Student", ("json", "peft", "csd_no_such_package"))
    message = str(e.value)
    assert message.startswith("Distill Student needs Python packages that ComfyUI's environment lacks: peft")
    assert "csd_no_such_package" in message and "json" not in message.split("lacks:")[1].split(".")[0]
    assert f"pip install -r {ROOT / 'requirements.txt'}" in message
    assert '"peft>=0.13"' in message  # the version requirements.txt asks for
