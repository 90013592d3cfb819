"""The teacher families the pack loads, by name: the one list the commands, the loaders and the nodes' choices
follow. A new family also needs its configs/<family>/ folder, a loader branch in loading.py, text encoding in
text.py and a Teacher in ../teachers.py (see ARCHITECTURE.md). No imports: read at start-up."""

TEACHER_FAMILIES = ("sd35_medium", "sd35_large", "flux_dev", "flux_schnell")
