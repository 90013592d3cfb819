"""The commands of `python -m training.run`, one module each (bridge, distill, sample): arguments -> config ->
models (from ../models/assemble.py) -> trainer. May import all of training/; nothing in training/ or nodes/ imports
them but run.py. Importing a command's module must stay light enough for its `--help`."""
