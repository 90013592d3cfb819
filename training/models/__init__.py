"""The models from files or tiny configs: loading (local files, shipped configs/), convert, export, text encoding,
tiny random-init configs, the teacher families. May import training's method parts (student, teachers), errors and
the bridge package (through ../_bridge.py); never a command, trainer, benchmark or node. Heavy imports stay in the
modules that need them (importing this package is free)."""
