"""Benchmarks, one runnable module each (`python -m training.bench.bridge`, `.distill`, `.gpu`): speed and memory
of the Bridge and of a distillation step on random-init models. May import everything in training/; nothing imports
them but the tests."""
