"""Link prediction for people: complete ``(head, relation, ?)`` or ``(?, relation, tail)`` with a
trained HittER and read the answers by name.

    python -m hitter_core.predict CHECKPOINT "Sunnyvale" "/base/biblioness/bibs_location/state"
    python -m hitter_core.predict CHECKPOINT "California" "/location/location/contains" --head
    python -m hitter_core.predict CHECKPOINT /m/0r0m6 /location/location/containedby --top-k 5 \\
        --filtered

Entities are given by identifier (``/m/0r0m6``) or by name (``entity_names.tsv``; exact, then
case-insensitive); a name that fits several entities is an error listing them, a name that fits
none suggests close ones. Relations by identifier or by an unambiguous ending
(``bibs_location/state``). Each answer is printed with its rank, score (the model's logit),
identifier, name and the splits that already hold it as a fact (``train``, ``valid``,
``test``); ``--filtered`` leaves known facts out, as the filtered ranking protocol does. The
query runs as evaluation does: the source's first ``max_neighbours`` neighbours in the fixed
order (REFERENCE.md "Neighbourhoods"). :func:`predict` is the same as a Python function.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hitter_core.checkpoint import load_hitter
from hitter_core.cli import run_cli
from hitter_core.data import SPLITS, KnowledgeGraph, default_data_dir, load_kg
from hitter_core.model import HittER, HittERScorer
from hitter_core.neighbours import NeighbourIndex


class AmbiguousName(ValueError):
    """A name that fits several entities or relations, or none."""


@dataclass
class Prediction:
    rank: int  # 1-based, among the answers listed
    entity: int  # entity id
    identifier: str  # e.g. /m/0r0m6
    name: str
    score: float  # the model's logit
    known_in: tuple[str, ...]  # splits holding (source, relation, entity) as a fact


def find_entity(kg: KnowledgeGraph, text: str) -> int:
    """An entity id from its identifier or its name (exact, then case-insensitive)."""
    if text in kg.entities:
        return kg.entities.index(text)
    for fold in (str, str.casefold):
        hits = [i for i, name in enumerate(kg.entity_names) if fold(name) == fold(text)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            listed = ", ".join(f"{kg.entities[i]} ({kg.entity_names[i]})" for i in hits[:10])
            raise AmbiguousName(f"{text!r} names {len(hits)} entities: {listed}; give the "
                                f"identifier instead")
    close = difflib.get_close_matches(text, kg.entity_names, n=5, cutoff=0.75)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise AmbiguousName(f"no entity {text!r} in {kg.name}{hint}")


def find_relation(kg: KnowledgeGraph, text: str) -> int:
    """A relation id from its identifier or an unambiguous ending of it."""
    if text in kg.relations:
        return kg.relations.index(text)
    hits = [i for i, r in enumerate(kg.relations) if r.endswith(text)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise AmbiguousName(f"{text!r} ends {len(hits)} relations: "
                            f"{', '.join(kg.relations[i] for i in hits[:10])}")
    close = difflib.get_close_matches(text, kg.relations, n=5, cutoff=0.6)
    hint = f"; close: {', '.join(close)}" if close else ""
    raise AmbiguousName(f"no relation {text!r} in {kg.name}{hint}")


def known_answers(kg: KnowledgeGraph, source: int, relation: int, head: bool) -> dict[int, list]:
    """entity id -> the splits in which (source, relation, entity) is a fact (``head``: the
    source is the tail)."""
    known: dict[int, list[str]] = {}
    for split in SPLITS:
        t = kg.splits[split]  # (T, 3)
        src, dst = (t[:, 2], t[:, 0]) if head else (t[:, 0], t[:, 2])
        for e in dst[(src == source) & (t[:, 1] == relation)].tolist():
            known.setdefault(e, []).append(split)
    return known


@torch.no_grad()
def predict(
    model: HittER, kg: KnowledgeGraph, neighbours: NeighbourIndex, source: int, relation: int,
    head: bool = False, top_k: int = 10, filtered: bool = False,
) -> list[Prediction]:
    """The ``top_k`` answers of ``(source, relation, ?)`` (``head``: of ``(?, relation,
    source)``, the reciprocal query), best first; ``filtered`` leaves known facts out."""
    token = relation + (kg.num_relations if head else 0)
    scores = HittERScorer(model, neighbours)(torch.tensor([source]), torch.tensor([token]))[0]
    known = known_answers(kg, source, relation, head)
    if filtered and known:
        scores = scores.clone()
        scores[list(known)] = float("-inf")
    values, ids = scores.float().cpu().topk(min(top_k, len(scores)))
    return [Prediction(i + 1, e, kg.entities[e], kg.entity_names[e], v, tuple(known.get(e, ())))
            for i, (v, e) in enumerate(zip(values.tolist(), ids.tolist(), strict=True))
            if v != float("-inf")]


def format_predictions(predictions: Sequence[Prediction]) -> str:
    width = max((len(p.identifier) for p in predictions), default=10)
    lines = [f"{'rank':>4}  {'score':>8}  {'entity':<{width}}  name  [known fact in]"]
    for p in predictions:
        known = f"  [{', '.join(p.known_in)}]" if p.known_in else ""
        lines.append(f"{p.rank:>4}  {p.score:>8.3f}  {p.identifier:<{width}}  {p.name}{known}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hitter_core.predict",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="HittER directory (save_pretrained), e.g. RUN/best")
    parser.add_argument("entity", help="the known entity: identifier or name")
    parser.add_argument("relation", help="relation identifier or an unambiguous ending")
    parser.add_argument("--head", action="store_true",
                        help="ask for heads: (?, relation, entity); default tails")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--filtered", action="store_true", help="leave known facts out")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data root (default $KGQA_DATA_DIR)")
    args = parser.parse_args(argv)
    model = load_hitter(args.checkpoint).eval()
    kg = load_kg((args.data_dir or default_data_dir()) / model.config.dataset)
    neighbours = NeighbourIndex.build(kg, seed=model.config.neighbour_order_seed)
    source, relation = find_entity(kg, args.entity), find_relation(kg, args.relation)
    query = (f"(?, {kg.relations[relation]}, {kg.entity_names[source]})" if args.head else
             f"({kg.entity_names[source]}, {kg.relations[relation]}, ?)")
    print(f"{query}  [{kg.entities[source]}; {'filtered' if args.filtered else 'raw'}]")
    print(format_predictions(predict(model, kg, neighbours, source, relation, args.head,
                                     args.top_k, args.filtered)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, user_errors=(AmbiguousName,)))
