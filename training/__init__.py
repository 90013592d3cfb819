"""Training library: model loading, teachers, data, Bridge training and student distillation.

Runs headless (`python -m training.run ...`) and behind the ComfyUI training nodes. Never imports
ComfyUI; heavy modules (diffusers, transformers) are imported inside the functions that need them.
"""
