"""The teacher families the pack loads, by name: the one list the commands, the loaders and the nodes' choices
follow. A new family also needs its configs/<family>/ folder, a loader branch in loading.py, text encoding in
text.py and a Teacher in ../teachers.py (see ARCHITECTURE.md). Also each family's default guidance. No imports: read
at start-up."""

TEACHER_FAMILIES = ("sd35_medium", "sd35_large", "flux_dev", "flux_schnell")

# The real score's default guidance per family (the single source: CLI, nodes and teachers read it here): SD3.5 is
# true CFG (its pipeline's 4.5 ... its model cards' 3.5-4.5), Flux dev takes guidance as an embedding (its pipeline's
# 3.5), Flux schnell takes none.
DEFAULT_GUIDANCE = {"sd35_medium": 4.5, "sd35_large": 4.5, "flux_dev": 3.5, "flux_schnell": None}
# Teachers whose guidance is a model input (an embedding), not classifier-free guidance.
GUIDANCE_EMBEDDING = ("flux_dev",)


def default_guidance(family: str | None) -> float | None:
    """The real score's default guidance for a teacher family (None for the demo: sd35_medium's; None for schnell)."""
    return DEFAULT_GUIDANCE[family or "sd35_medium"]


def adversarial_teacher_warning(family: str, teacher: str | None = None) -> str | None:
    """A warning when the real score comes from an adversarially distilled model (Flux schnell, SD3.5 Large Turbo,
    told by its file name: it has SD3.5 Large's architecture), else None."""
    name = (teacher or "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    which = "Flux schnell" if family == "flux_schnell" else ("SD3.5 Large Turbo" if family.startswith("sd35") and
                                                             "turbo" in name else None)
    if which is None:
        return None
    return (f"the teacher is {which}, an adversarially distilled few-step model: its predictions are sharp samples, "
            f"not the data's score, so it is a poor real score for distribution matching (use "
            f"{'Flux dev' if which == 'Flux schnell' else 'SD3.5 Large or Medium'} as the teacher).")
