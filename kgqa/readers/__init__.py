"""How the LM reads HittER: one config field, ``model.reader``, names a reader of
:data:`READERS` (or an adapter reader and a head joined by ``+``, e.g. ``paper+link``).

=================  =======================================================================
reader             what reads HittER
=================  =======================================================================
``none``           nothing: the plain masked LM (paper Table 6's "BERT" row)
``text``           nothing: the topic's neighbourhood verbalised into the LM's input
``paper``          the paper's cross-attention adapters in the upper LM layers (section 4)
``gated``          zero-initialised gated cross-attention adapters (Flamingo-style)
``copy``           a pointer over the topic's neighbours copies a name (ours)
``copy-names``     ``copy`` whose keys also read names and relation texts (ours)
``link``           HittER's own link prediction answers, weighted into the LM (ours)
``link-confidence``  ``link`` whose weight also reads how sure it is (ours)
=================  =======================================================================

Adapters act inside the LM layers (:mod:`kgqa.readers.adapters`); every other reader is a
:class:`kgqa.readers.base.KGReader` at the LM's output, which returns log-probabilities and
its evidence. Adding a reader = one file with a ``KGReader`` subclass + one line below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kgqa.readers.base import KGReader, LMReader
from kgqa.readers.copy import CopyReader
from kgqa.readers.link import LinkReader


@dataclass(frozen=True)
class Reader:
    """One entry of :data:`READERS`: what it builds and how the report and cards name it."""

    description: str  # the report's row label and the model card's words
    adapters: Literal["paper", "gated"] | None = None  # cross-attention inside the LM layers
    head: type[KGReader] = LMReader  # what answers at the LM's output
    options: dict[str, Any] = field(default_factory=dict)  # the head's keyword arguments
    reads_hitter: bool = True  # False: the model has no HittER (model.kg_checkpoint=null)
    text: bool = False  # the neighbourhood as text in the input (kgqa.verbalise)

    @property
    def link_prediction(self) -> bool:
        """HittER is read through its link-prediction scores alone (the link heads): what
        the frequency-prior control (``model.kg_init=frequency``) replaces."""
        return self.adapters is None and self.head is LinkReader


READERS: dict[str, Reader] = {
    "none": Reader("the plain masked LM", reads_hitter=False),
    "text": Reader("KG as text", reads_hitter=False, text=True),
    "paper": Reader("paper adapters", adapters="paper"),
    "gated": Reader("gated adapters", adapters="gated"),
    "copy": Reader("copy head", head=CopyReader),
    "copy-names": Reader("copy head, name keys", head=CopyReader, options={"name_keys": True}),
    "link": Reader("link head", head=LinkReader),
    "link-confidence": Reader("link head, confidence", head=LinkReader,
                              options={"confidence": True}),
}


def parse_reader(spec: str) -> Reader:
    """``model.reader`` -> its :class:`Reader`: a name of :data:`READERS`, or an adapter reader
    and a head reader joined by ``+`` (``paper+link``: the paper's adapters inside the LM and
    the link head at its output, trained together)."""
    parts = spec.split("+")
    unknown = [p for p in parts if p not in READERS]
    if unknown:
        raise ValueError(f"model.reader {spec!r}: unknown reader {unknown[0]!r}; readers: "
                         f"{', '.join(READERS)} (an adapter reader and a head join with '+')")
    if len(parts) == 1:
        return READERS[spec]
    layers, heads = parts[0], parts[1:]
    if (len(heads) != 1 or READERS[layers].adapters is None
            or READERS[heads[0]].head is LMReader):
        raise ValueError(f"model.reader {spec!r}: a combination is one adapter reader (paper, "
                         f"gated) + one head (copy, copy-names, link, link-confidence)")
    head = READERS[heads[0]]
    return Reader(f"{READERS[layers].description} + {head.description}",
                  adapters=READERS[layers].adapters, head=head.head, options=head.options)


# The flags that model.reader replaced: old saved configs still load (legacy_reader).
LEGACY_FIELDS = {name: "model.reader (kgqa.readers)" for name in (
    "adapter", "copy_head", "copy_name_keys", "link_head", "link_confidence")}


def legacy_reader(fields: dict[str, Any], has_hitter: bool) -> str:
    """The ``model.reader`` of a model saved before the field existed, from its flags
    ``adapter`` (paper | gated | none), ``copy_head``, ``copy_name_keys``, ``link_head``,
    ``link_confidence`` and ``kg_text_length`` (> 0: the text baseline)."""
    if not has_hitter:
        return "text" if fields.get("kg_text_length") else "none"
    head = None
    if fields.get("copy_head"):
        head = "copy-names" if fields.get("copy_name_keys") else "copy"
    elif fields.get("link_head"):
        head = "link-confidence" if fields.get("link_confidence") else "link"
    adapter = fields.get("adapter", "paper")
    adapter = None if adapter == "none" else adapter
    return "+".join(p for p in (adapter, head) if p) or "none"
