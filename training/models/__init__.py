"""The models, from files or tiny configs: loading (local files, the shipped configs/), convert, export, text
encoding, tiny random-init configs, the teacher families, and assemble.py, the one place that builds the models a
command or node trains or samples with. May import training's method parts (student, teachers), errors and the
bridge package (through ../_bridge.py); only assemble.py also imports the trainers, whose model bundles it fills.
Never a command, benchmark or node. Importing this package is free (heavy imports stay in the modules)."""
