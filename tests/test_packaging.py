"""How the pack reaches ComfyUI users: ComfyUI-Manager's `pip install -r requirements.txt`, the Comfy registry's
metadata ([tool.comfy]) and node archive (git-tracked files minus .comfyignore), checked by comfy-cli when it is
installed (`comfy` on PATH, or COMFY_CLI=/path/to/comfy)."""

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMFY_CLI = os.environ.get("COMFY_CLI") or shutil.which("comfy")
# What ComfyUI needs of the pack to load and run every node (and what the archive must therefore keep).
RUNTIME = ("__init__.py", "requirements.txt", "pyproject.toml", "nodes/__init__.py", "bridge/__init__.py",
           "training/models/loading.py", "training/models/configs/sd15/unet/config.json",
           "workflows/6_distill_student.json", "workflows/6_distill_student.jpg")
LEFT_OUT = ("assets/shapes/", "tests/", "docs/", ".ci/")


def _name(requirement: str) -> str:
    return requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower()


def test_requirements_txt_lists_the_runtime_dependencies_without_torch():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line]
    dependencies = PYPROJECT["project"]["dependencies"]
    # ComfyUI's environment keeps its own torch (and the torchvision built for it): no torch line at all.
    assert not any(_name(r) in ("torch", "torchvision") for r in requirements)
    assert sorted(requirements) == sorted(d for d in dependencies if _name(d) != "torch")
    assert len(set(map(_name, requirements))) == len(requirements)


def test_comfy_registry_metadata_is_complete():
    import re

    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert isinstance(comfy["includes"], list)
    # The version rule of comfy-cli's config parser (anything else is dropped with a warning).
    assert re.fullmatch(r"(==|>=|<=|!=|~=|>|<)?\d+\.\d+\.\d+", comfy["requires-comfyui"])
    project = PYPROJECT["project"]
    assert project["name"] and project["version"] and project["description"] and project["license"]
    assert project["urls"]["Repository"].startswith("https://")
    assert (ROOT / comfy["Icon"].split("/main/")[1]).is_file()  # the icon the URL points to is in the repository


def _git(*args) -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def _would_be_tracked() -> list[str]:
    """The repository's files as the next commit would hold them (tracked, and new files git does not ignore)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("the node archive is defined by git: needs git and a git checkout")
    return [f for f in _git("ls-files", "--cached", "--others", "--exclude-standard") if (ROOT / f).is_file()]


def _check_archive(files: set[str]) -> None:
    assert not [f for f in files if f.startswith(LEFT_OUT)], "left out of the node archive by .comfyignore"
    missing = [f for f in RUNTIME if f not in files]
    assert not missing, f"the node archive lacks {missing}"
    code = {f for f in files if f.endswith(".py")}
    assert {f for f in _would_be_tracked() if f.startswith(("nodes/", "bridge/")) and f.endswith(".py")} <= code


def test_node_archive_leaves_out_shapes_world_tests_and_docs():
    """The archive as comfy-cli builds it: git-tracked files minus .comfyignore matches (gitignore syntax, matched
    here by git itself)."""
    files = _would_be_tracked()
    ignored = set(_git("ls-files", "--cached", "--others", "--ignored", "--exclude-from=.comfyignore"))
    assert any(f.startswith("assets/shapes/") for f in ignored)  # the patterns match what they are meant to
    _check_archive(set(files) - ignored)


@pytest.mark.skipif(not COMFY_CLI, reason="comfy-cli is not installed (pip install comfy-cli ruff, or set COMFY_CLI "
                                          "to its `comfy` executable)")
def test_comfy_node_validate_and_pack(tmp_path):
    """`comfy node validate` passes without warnings, and `comfy node pack` builds the archive from a git copy of the
    working tree."""
    repo = tmp_path / "pack"
    for f in _would_be_tracked():
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    # Its own home: comfy-cli keeps a config there; --skip-prompt answers its questions (no tracking).
    env = dict(os.environ, HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"))

    def comfy(*args):
        res = subprocess.run([COMFY_CLI, "--skip-prompt", "--no-json", "node", *args], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        return out

    out = comfy("validate")
    assert "All validation checks passed" in out and "Warning" not in out and "Error" not in out, out
    comfy("pack")
    with zipfile.ZipFile(repo / "node.zip") as z:
        _check_archive(set(z.namelist()))
