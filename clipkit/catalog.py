"""What `load_model` can load on this machine (`clipkit models`): clipkit's own models (the bundled ones with
their weights), open_clip's pretrained (architecture, tag) pairs with whether their weights are already in the
local cache (then they load offline), and the checkpoints in the Hugging Face cache (`hf:ORG/REPO`,
`hf-hub:ORG/REPO`)."""

from __future__ import annotations

import json
from pathlib import Path

from clipkit.bundled import CONFIG_DIR, bundled_models
from clipkit.models import cached_tag_file, list_models, register_configs

#: transformers model types clipkit is tested with: dual encoders (`hf:ORG/REPO`; BLIP-2 also re-ranks), BLIP ITM
HF_TYPES = ("blip", "blip-2", "clip", "siglip", "siglip2")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHTS = {"bundled": "bundled (offline)", "cached": "cached (offline)", "download": "downloaded at first use",
           "none": "random unless --pretrained FILE"}


def available_models(cache_dir: str | None = None) -> list[dict]:
    """Each model `load_model` takes here, as {'model', 'pretrained', 'dim', 'weights'}; 'weights' is 'bundled'
    (inside the package), 'cached' (downloaded before: loads offline), 'download' (fetched at the first load)
    or 'none' (an architecture without weights: random unless a weights file is given). clipkit's own first,
    then open_clip's pretrained tags, then the checkpoints in the Hugging Face cache."""
    import open_clip

    register_configs()
    bundled = bundled_models()
    own = [name for name in list_models() if (CONFIG_DIR / f"{name}.json").is_file()]
    rows = [{"model": name, "pretrained": None, "dim": _dim(name), "weights": "bundled" if name in bundled else "none"}
            for name in own]
    for name, tag in open_clip.list_pretrained():
        cached = cached_tag_file(open_clip.get_pretrained_cfg(name, tag), cache_dir)
        rows.append({"model": name, "pretrained": tag, "dim": _dim(name), "weights": "cached" if cached else "download"})
    return rows + hub_models(cache_dir)


def hub_models(cache_dir: str | None = None) -> list[dict]:
    """The checkpoints with weights in the Hugging Face cache that `load_model` takes: open_clip hub models
    (`hf-hub:ORG/REPO`) and transformers dual encoders (`hf:ORG/REPO`); BLIP ITM models, which `load_reranker`
    takes instead, with 'reranker': True."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(cache_dir).repos
    except (CacheNotFound, OSError, ValueError):  # (no cache yet, or one that cannot be read)
        return []
    rows = []
    for repo in sorted(repos, key=lambda r: r.repo_id.lower()):
        revision = max(repo.revisions, key=lambda r: r.last_modified, default=None) if repo.repo_type == "model" \
            else None
        files = {f.file_name: f.file_path for f in revision.files} if revision is not None else {}
        if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
            continue
        if "open_clip_config.json" in files:
            config = _json(files["open_clip_config.json"]).get("model_cfg", {})
            rows.append({"model": f"hf-hub:{repo.repo_id}", "pretrained": None, "dim": config.get("embed_dim"),
                         "weights": "cached"})
            continue
        config = _json(files["config.json"]) if "config.json" in files else {}
        if config.get("model_type") in HF_TYPES:
            reranker = "BlipForImageTextRetrieval" in (config.get("architectures") or [])  # (BLIP ITM: --reranker)
            rows.append({"model": f"hf:{repo.repo_id}", "pretrained": None, "dim": config.get("projection_dim"),
                         "weights": "cached"} | ({"reranker": True} if reranker else {}))
    return rows


def _dim(name: str) -> int | None:
    import open_clip

    return (open_clip.get_model_config(name) or {}).get("embed_dim")


def _json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
