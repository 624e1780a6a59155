"""What ships inside the package: clipkit's model configs and the weights of its bundled models (no torch
here, so that commands which only name them, such as `clipkit info`, start fast)."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"


def bundled_models() -> dict[str, Path]:
    """Models whose weights ship inside the package: name -> weights file."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.pt")) if (CONFIG_DIR / f"{p.stem}.json").exists()}
