"""Training library: model loading, teachers, data, Bridge training and student distillation.

Runs headless (`python -m training.run ...`) and behind the ComfyUI training nodes. Never imports
ComfyUI or nodes/; heavy modules (diffusers, transformers) are imported inside the functions that need them.
Laid out by role: cli/ (commands), models/ (loading and model assembly), the trainers (bridge_train.py,
distill.py with loop, state, data), the method's parts, bench/, shapes/; ARCHITECTURE.md has the rules.
"""
