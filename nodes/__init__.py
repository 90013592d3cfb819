"""ComfyUI nodes of the Cross-Space Distillation pack (V3 node API). Thin adapters over bridge/ and training/;
schemas live as plain data in specs.py."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from ._errors import log_missing
from .bridge_nodes import BridgeProject, LoadBridge
from .sampler_nodes import OneStepSampler
from .score_nodes import SelectBest, TeacherScore
from .train_nodes import DistillStudent, TrainBridge

NODES = [LoadBridge, BridgeProject, OneStepSampler, TeacherScore, SelectBest, TrainBridge, DistillStudent]
log_missing("Train Bridge and Distill Student")


class CrossSpaceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
