"""Learning-rate schedules (for training and for the re-ranking stage)."""

import math


def cosine_schedule(step: int, warmup: int, total: int) -> float:
    """The factor on the base learning rate at `step`: linear warm-up, then half a cosine down to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
