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
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], ["MODEL", "CLIP"],
                   [("COMBO", None), ("FLOAT", (-100.0, 100.0)), ("FLOAT", (-100.0, 100.0))]),
}
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # notes: no backend node, free widgets
# The common public file names (what people have in their models folders), by loader.
MODEL_FILES = {
    "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly-fp16.safetensors", "sd3.5_medium.safetensors",
    "sd3.5_large.safetensors", "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors",
    "t5xxl_fp8_e4m3fn.safetensors", "flux1-dev.safetensors", "flux1-schnell.safetensors", "ae.safetensors",
}
# The Bridges the workflows pick (what Train Bridge writes in workflow 5 and its Flux variant).
BRIDGE_FILES = {"sd15_to_sd35.safetensors", "sd15_to_flux.safetensors"}
# The student LoRA the LoRA workflow picks (what Distill Student writes in workflow 6 with a student LoRA).
LORA_FILES = {"sd15_one_step_sd35.safetensors"}
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
    for prefix in ("1_", "2_", "3_", "4_", "4b_", "5_", "6_", "7_"):
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
            if kind == "COMBO" and rule is None:
                assert values[k] in MODEL_FILES | BRIDGE_FILES | LORA_FILES | {specs.NONE}, \
                    f"{where}: {values[k]!r} is not a common public file name"
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


def _widgets(node) -> dict:
    """Our node's widget values by input id."""
    values, out, k = node["widgets_values"], {}, 0
    for i in specs.BY_ID[node["type"]].inputs:
        if i.is_widget:
            out[i.id] = values[k]
            k += i.widget_values
    return out


def test_bridge_files_in_workflows_match_their_teacher():
    """The Bridge chosen in a workflow is the one for the teacher the workflow uses."""
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        bridges = {_widgets(n)["bridge_name"] for n in wf["nodes"] if n["type"] in ("CSD_LoadBridge",
                                                                                   "CSD_DistillStudent")}
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


def test_training_workflows_name_a_consistent_teacher():
    """Train Bridge / Distill Student: the teacher files fit the chosen family, the Bridge written by workflow 5 is
    the one workflow 6 distills through, the distilled checkpoint gets a new name."""
    nodes = {n["type"]: n for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"]}
    train, distill = _widgets(nodes["CSD_TrainBridge"]), _widgets(nodes["CSD_DistillStudent"])
    for w in (train, distill):
        assert w["teacher_family"] in specs.TEACHER_FAMILIES
        sd3 = w["teacher_family"].startswith("sd35")
        assert w["teacher_model"].startswith("sd3.5" if sd3 else "flux1")
        assert w["clip_l"] == "clip_l.safetensors" and w["t5"].startswith("t5xxl")
        assert (w["clip_g"] == "clip_g.safetensors") if sd3 else (w["clip_g"] == specs.NONE)
        assert w["resume"] is True
    assert train["output_name"] + ".safetensors" == distill["bridge_name"]
    assert distill["output_name"] + ".safetensors" != distill["student_checkpoint"]
    assert distill["prompts"].strip() and distill["prompts_file"] == ""


def test_lora_workflow_applies_the_lora_distill_student_writes():
    """Workflow 7: base SD1.5 checkpoint -> Load LoRA (the file workflow 6 writes with a student LoRA, at strength 1)
    -> One-Step Student Sampler -> VAE Decode."""
    wfs = {p.name[:2]: json.loads(p.read_text()) for p in WORKFLOWS}
    distill = _widgets(next(n for n in wfs["6_"]["nodes"] if n["type"] == "CSD_DistillStudent"))
    assert specs.BY_ID["CSD_DistillStudent"].outputs[2].id == "lora_name"
    nodes = {n["id"]: n for n in wfs["7_"]["nodes"]}
    by_type = {n["type"]: n for n in nodes.values()}
    lora = by_type["LoraLoader"]
    assert lora["widgets_values"] == [distill["output_name"] + ".safetensors", 1.0, 1.0]
    links = {l[0]: l for l in wfs["7_"]["links"]}

    def source(node, name):
        return nodes[links[next(i["link"] for i in node["inputs"] if i["name"] == name)][1]]["type"]

    assert source(lora, "model") == source(lora, "clip") == "CheckpointLoaderSimple"
    assert source(by_type["CSD_OneStepSampler"], "model") == "LoraLoader"
    assert source(by_type["CSD_OneStepSampler"], "positive") == "CLIPTextEncode"
    assert source(by_type["CLIPTextEncode"], "clip") == "LoraLoader"
    assert source(by_type["VAEDecode"], "samples") == "CSD_OneStepSampler"
    assert by_type["CheckpointLoaderSimple"]["widgets_values"][0].startswith("v1-5")


def test_teacher_families_are_the_libraries():
    from training.models.families import TEACHER_FAMILIES
    from training.teachers import FAMILIES

    assert specs.TEACHER_FAMILIES == TEACHER_FAMILIES
    assert set(specs.TEACHER_FAMILIES) <= set(FAMILIES)


def test_bridge_taps_are_the_libraries():
    from bridge.taps import TAPS

    assert specs.BRIDGE_TAPS == TAPS


def test_memory_choices_are_the_libraries():
    """The training nodes' memory inputs offer exactly what the library takes."""
    from training.loop import OPTIMIZERS
    from training.models.loading import TEACHER_STORAGE

    assert specs.TEACHER_STORAGE == TEACHER_STORAGE and specs.OPTIMIZERS == OPTIMIZERS
    assert specs.GRADIENT_CHECKPOINTING == ("auto", "on", "off")


def _execute_params() -> dict[str, list[str]]:
    """node id -> the parameters of its class's `execute`, read from the node modules' source (importing them needs
    ComfyUI): the class whose define_schema builds `specs.X` is the node of spec X."""
    import ast

    out = {}
    for path in sorted((ROOT / "nodes").glob("*_nodes.py")):
        for cls in ast.parse(path.read_text()).body:
            if not isinstance(cls, ast.ClassDef):
                continue
            funcs = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
            if "define_schema" not in funcs or "execute" not in funcs:
                continue
            refs = [n.attr for n in ast.walk(funcs["define_schema"])
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "specs"]
            spec = getattr(specs, refs[0])
            out[spec.node_id] = [a.arg for a in funcs["execute"].args.args[1:]]
    return out


def test_every_node_executes_with_its_schemas_inputs():
    """ComfyUI calls execute(**inputs) with the schema's input ids: each node class takes exactly those."""
    params = _execute_params()
    assert set(params) == set(specs.BY_ID)
    for node_id, names in params.items():
        assert names == [i.id for i in specs.BY_ID[node_id].inputs], node_id


def test_no_seed_named_widget_without_its_control():
    """The web UI adds a "control after generate" widget to every INT input named seed or noise_seed (so a workflow
    stores two values for it): such an input must say so in its spec, or the workflow widget counts would be off."""
    for spec in specs.ALL:
        for i in spec.inputs:
            if i.id in ("seed", "noise_seed"):
                assert i.control_after_generate, f"{spec.node_id}.{i.id}"


def _thumbnails_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("csd_thumbnails", ROOT / "tools" / "thumbnails.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_workflow_has_its_thumbnail(path):
    """ComfyUI's template browser shows <name>.jpg beside each template: a small JPEG of the workflow's graph, as
    tools/thumbnails.py draws it from the current file (rerun it after changing a workflow)."""
    import numpy as np
    from PIL import Image

    thumbs = _thumbnails_module()
    jpg = thumbs.thumbnail_path(path)
    assert jpg.is_file(), f"no {jpg.name}: run `python tools/thumbnails.py`"
    assert 1_000 < jpg.stat().st_size < 60_000
    with Image.open(jpg) as im:
        assert im.format == "JPEG" and im.size == thumbs.SIZE
        saved = np.asarray(im.convert("RGB"), dtype=np.float32)
    fresh = np.asarray(thumbs.render(json.loads(path.read_text())), dtype=np.float32)
    assert np.abs(saved - fresh).mean() < 2.0, f"{jpg.name} is stale: run `python tools/thumbnails.py`"
