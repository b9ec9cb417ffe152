"""Where model weights come from: offline mode and the cache folder of the Hugging Face Hub, read from the
environment at call time, and the error for weights that cannot be found."""
from __future__ import annotations

import os

from huggingface_hub import constants as hf_constants


class ModelNotFoundError(RuntimeError):
    """The model weights named by the config cannot be found locally or on the Hub."""


def hub_offline() -> bool:
    """Offline mode, read from the environment now (huggingface_hub reads it once at import)."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return hf_constants.HF_HUB_OFFLINE or any(
        (f or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags
    )


def hub_cache_dir() -> str:
    """The hub cache folder, read from the environment now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return hf_constants.HF_HUB_CACHE
