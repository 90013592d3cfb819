"""The reference workflows (workflows/*.json, ComfyUI UI format 0.4) and the node schemas, checked without ComfyUI.

Our node schemas are read from nodes/specs.py (the plain data the nodes are built from); the core ComfyUI nodes
the workflows use are described by the table below (from ComfyUI 0.3.64's /object_info).
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def _load_specs():
    # By path: importing the `nodes` package itself needs ComfyUI.
    spec = importlib.util.spec_from_file_location("csd_node_specs", ROOT / "nodes" / "specs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


specs = _load_specs()

# Core node -> (socket inputs, output types, widgets in order). A widget is (type, rule): INT/FLOAT rule = (min, max),
# COMBO rule = allowed values (or None: model files, checked against MODEL_FILES), STRING rule = None.
# INT widgets with a "control after generate" entry are "SEED".
SAMPLERS = {"euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "uni_pc", "ddim", "lcm"}
SCHEDULERS = {"simple", "normal", "karras", "exponential", "sgm_uniform", "ddim_uniform", "beta"}
CORE = {
    "CheckpointLoaderSimple": ([], ["MODEL", "CLIP", "VAE"], [("COMBO", None)]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["CONDITIONING"], [("STRING", None)]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"], []),
    "SaveImage": ([("images", "IMAGE")], [], [("STRING", None)]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], ["LATENT"],
                 [("SEED", (0, 2**64 - 1)), ("INT", (1, 10000)), ("FLOAT", (0.0, 100.0)), ("COMBO", SAMPLERS),
                  ("COMBO", SCHEDULERS), ("FLOAT", (0.0, 1.0))]),
    "TripleCLIPLoader": ([], ["CLIP"], [("COMBO", None)] * 3),
    "DualCLIPLoader": ([], ["CLIP"], [("COMBO", None), ("COMBO", None), ("COMBO", {"flux", "sd3", "sdxl"}),
                                      ("COMBO", {"default", "cpu"})]),
    "UNETLoader": ([], ["MODEL"], [("COMBO", None), ("COMBO", {"default", "fp8_e4m3fn", "fp8_e4m3fn_fast",
                                                               "fp8_e5m2"})]),
    "VAELoader": ([], ["VAE"], [("COMBO", None)]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], ["CONDITIONING"], [("FLOAT", (0.0, 100.0))]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], ["CONDITIONING"], []),
    "PreviewAny": ([("source", "*")], [], []),
}
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # notes: no backend node, free widgets
# The common public file names (what people have in their models folders), by loader.
MODEL_FILES = {
    "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly-fp16.safetensors", "sd3.5_medium.safetensors",
    "sd3.5_large.safetensors", "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors",
    "t5xxl_fp8_e4m3fn.safetensors", "flux1-dev.safetensors", "flux1-schnell.safetensors", "ae.safetensors",
}
CONTROL_MODES = {"fixed", "increment", "decrement", "randomize"}


def _our_widgets(spec):
    out = []
    for i in spec.inputs:
        if not i.is_widget:
            continue
        if i.type == "INT" and i.control_after_generate:
            out.append(("SEED", (i.min, i.max), i))
        elif i.type in ("INT", "FLOAT"):
            out.append((i.type, (i.min, i.max), i))
        elif i.type == "COMBO":
            out.append(("COMBO", set(i.options) or None, i))
        else:
            out.append((i.type, None, i))
    return out


def _check_widget(where, kind, rule, values, k):
    """Check the value(s) of one widget starting at values[k]; returns the next index."""
    v = values[k]
    if kind in ("INT", "SEED"):
        assert isinstance(v, int) and not isinstance(v, bool), f"{where}: {v!r} is not an integer"
        assert rule[0] <= v <= rule[1], f"{where}: {v} outside [{rule[0]}, {rule[1]}]"
        if kind == "SEED":
            assert values[k + 1] in CONTROL_MODES, f"{where}: control mode {values[k + 1]!r}"
            return k + 2
    elif kind == "FLOAT":
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), f"{where}: {v!r}"
        assert rule[0] <= v <= rule[1], f"{where}: {v} outside [{rule[0]}, {rule[1]}]"
    elif kind == "STRING":
        assert isinstance(v, str), f"{where}: {v!r} is not a string"
    elif kind == "BOOLEAN":
        assert isinstance(v, bool), f"{where}: {v!r} is not a boolean"
    elif kind == "COMBO":
        assert isinstance(v, str), f"{where}: {v!r} is not a choice"
        if rule is not None:
            assert v in rule, f"{where}: {v!r} is not one of {sorted(rule)}"
    return k + 1


def _node_io(node):
    """(socket inputs, output types, widget rules) for a workflow node's type."""
    t = node["type"]
    if t in specs.BY_ID:
        spec = specs.BY_ID[t]
        ins = [(i.id, i.type) for i in spec.inputs if not i.is_widget]
        return ins, [o.type for o in spec.outputs], [(k, r) for k, r, _ in _our_widgets(spec)]
    return CORE[t]


def test_the_reference_workflows_exist():
    names = {p.stem for p in WORKFLOWS}
    for prefix in ("1_", "2_", "3_", "4_", "4b_"):
        assert any(n.startswith(prefix) for n in names), f"missing workflow {prefix}*"
    used = {n["type"] for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"]}
    assert {s.node_id for s in specs.ALL} <= used, "every node of the pack appears in some workflow"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_consistent(path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "node ids are unique"
    links = {l[0]: l for l in wf["links"]}
    assert len(links) == len(wf["links"]), "link ids are unique"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(links, default=0)

    for node in wf["nodes"]:
        t = node["type"]
        where = f"{path.name} node {node['id']} ({t})"
        assert t in specs.BY_ID or t in CORE or t in FRONTEND_ONLY, f"{where}: unknown node type"
        if t in FRONTEND_ONLY:
            continue
        ins, outs, widgets = _node_io(node)
        # Sockets as the schema has them, in order, each one connected.
        assert [(i["name"], i["type"]) for i in node.get("inputs", [])] == ins, f"{where}: inputs"
        assert [o["type"] for o in node.get("outputs", [])] == outs, f"{where}: outputs"
        for i in node.get("inputs", []):
            assert i["link"] in links, f"{where}: input {i['name']} is not connected"
        # Widget values: count (a seed also stores its control mode), type and range, in schema order.
        values = node.get("widgets_values", [])
        k = 0
        for kind, rule in widgets:
            assert k < len(values), f"{where}: too few widget values"
            if kind == "COMBO" and rule is None and t in CORE:
                assert values[k] in MODEL_FILES, f"{where}: {values[k]!r} is not a common public file name"
            k = _check_widget(where, kind, rule, values, k)
        assert k == len(values), f"{where}: {len(values)} widget values, schema wants {k}"

    for lid, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert src in nodes and dst in nodes, f"link {lid}: unknown node"
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == typ and lid in out["links"], f"link {lid}: source end"
        assert inp["link"] == lid and inp["type"] in (typ, "*"), f"link {lid}: destination end"
    for node in wf["nodes"]:
        for o in node.get("outputs", []):
            for lid in o.get("links") or []:
                assert links[lid][1] == node["id"], f"node {node['id']} lists link {lid} it does not start"


def test_bridge_files_in_workflows_match_their_teacher():
    """The Bridge chosen in a workflow is the one for the teacher the workflow uses."""
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        bridges = {n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "CSD_LoadBridge"}
        text = path.read_text()
        for b in bridges:
            assert b.endswith(".safetensors")
            teacher = "flux" if "flux" in b else "sd3.5"
            assert teacher in text.replace(b, ""), f"{path.name}: {b} but no {teacher} model"


def test_node_schemas_are_complete():
    assert len({s.node_id for s in specs.ALL}) == len(specs.ALL)
    for spec in specs.ALL:
        assert spec.node_id.startswith(specs.PREFIX)
        assert spec.category.startswith(specs.CATEGORY + "/")
        assert spec.display_name and len(spec.description) > 40
        ids = [i.id for i in spec.inputs] + [o.id for o in spec.outputs]
        assert len(ids) == len(set(ids)), f"{spec.node_id}: input and output ids must be unique (V3)"
        for item in (*spec.inputs, *spec.outputs):
            assert len(item.tooltip) > 10, f"{spec.node_id}.{item.id}: tooltip"
        for i in spec.inputs:
            if i.type in ("INT", "FLOAT"):
                assert i.min <= i.default <= i.max, f"{spec.node_id}.{i.id}: default outside its range"
            if i.type == "COMBO":
                assert bool(i.options) != bool(i.folder), f"{spec.node_id}.{i.id}: options or a folder"
                if i.options:
                    assert i.default in i.options


def test_rank_choices_are_the_scoring_modules():
    from training.scoring import RANK_BY

    assert specs.RANK_BY == RANK_BY
