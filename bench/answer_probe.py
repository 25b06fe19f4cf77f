"""Does HittER's own link prediction find the QA answers? A probe of what a pretrained HittER
knows about the questions, without any LM (issue "knowledge that helps").

For each question of a filtered QA split (topic and answer both in FB15K-237), HittER scores
every query (topic, r, ?) for r among the relations of the topic's neighbour tokens (both
directions), with its own evaluation neighbourhoods, against all entities whose name has as
many word pieces as the answer (the cloze form gives that number to every model). The answer's
best rank over those relations is an oracle: it assumes the question's relation is known
(the released data does not give it). Printed: hits@1 and hits@10 of that oracle rank, for the
questions whose answer is a direct neighbour of the topic in the train graph and for the
others, with the pretrained weights and with an untrained HittER of the same shape (the
QA experiment's control). Also printed: how much HittER's top-layer states of a topic's
neighbour tokens (what the copy head's keys read, 256 neighbours) differ from each other: the
mean cosine between two tokens of the same topic and the share of their variance that is not
the topic's mean.

    python bench/answer_probe.py --checkpoint runs/hitter-cpu-base/best --dataset webqsp
        [--split test] [--data-dir DIR] [--lm minilm]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer

from hitter_core.checkpoint import load_hitter
from hitter_core.cli import run_cli
from hitter_core.data import default_data_dir, load_kg
from hitter_core.model import HittERScorer
from kgqa.data import answer_is_neighbour, qa_splits, read_sources
from kgqa.lm import resolve_lm, word_pieces
from kgqa.model import build_neighbour_index


def probe(hitter, index, examples, is_neighbour: list[bool], name_length: torch.Tensor,
          tokenizer) -> dict[str, float]:
    """Oracle-relation hits@1 / hits@10 of the answer, split by answer-is-neighbour (the QA
    report's breakdown, :func:`kgqa.data.answer_is_neighbour`)."""
    R = hitter.config.num_relations
    scorer = HittERScorer(hitter, index)
    hits = {f"{part}@{k}": 0 for part in ("neighbour", "other") for k in (1, 10)}
    count = {"neighbour": 0, "other": 0}
    for ex, neighbour in zip(examples, is_neighbour, strict=True):
        part = "neighbour" if neighbour else "other"
        count[part] += 1
        _, relations = index.neighbours_of(ex.topic_entity)
        queries = sorted({(int(r) + R) % (2 * R) for r in relations})  # (topic, r, ?) -> token
        if not queries:
            continue
        scores = scorer(torch.full((len(queries),), ex.topic_entity), torch.tensor(queries))
        pieces = len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
        scores = scores.masked_fill((name_length != pieces)[None], float("-inf"))  # (Q, E)
        answer = scores[:, ex.answer_entity : ex.answer_entity + 1]
        rank = int((scores > answer).sum(1).min())  # 0 = top, best over the relations
        for k in (1, 10):
            hits[f"{part}@{k}"] += rank < k
    out = {key: hits[key] / max(1, count[key.split("@")[0]]) for key in hits}
    out["all@1"] = (hits["neighbour@1"] + hits["other@1"]) / max(1, sum(count.values()))
    return out | {f"n_{part}": n for part, n in count.items()}


@torch.no_grad()
def token_spread(hitter, index, topics: list[int],
                 max_neighbours: int = 256) -> tuple[float, float]:
    """Mean pairwise cosine of a topic's neighbour-token states (HittER's last context layer)
    and the share of their squared norm left after subtracting the topic's mean token."""
    cosines, shares = [], []
    for topic in topics:
        nb = index.gather(torch.tensor([topic]), max_neighbours)
        if nb.mask.sum() < 2:
            continue
        layers, _ = hitter.encode(torch.tensor([topic]), torch.zeros(1, dtype=torch.long),
                                  nb.entities, nb.relations, nb.mask)
        x = layers[-1][0, 2:][nb.mask[0]]  # (T, D)
        unit = torch.nn.functional.normalize(x, dim=1)
        T = len(x)
        cosines.append(((unit @ unit.T).sum() - T) / (T * (T - 1)))
        shares.append((x - x.mean(0)).pow(2).sum() / x.pow(2).sum())
    return float(torch.stack(cosines).mean()), float(torch.stack(shares).mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/answer_probe.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a HittER checkpoint directory")
    parser.add_argument("--dataset", choices=("webqsp", "freebaseqa"), default="webqsp")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", default=None, help="data root [$KGQA_DATA_DIR]")
    parser.add_argument("--lm", default="minilm", help="the tokenizer of the answers' pieces")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    kg = load_kg(f"{data_dir}/fb15k-237")
    examples = qa_splits(read_sources(data_dir, kg, datasets=[args.dataset]), args.dataset,
                         "filtered")[args.split]
    tokenizer = AutoTokenizer.from_pretrained(resolve_lm(args.lm))
    name_length = torch.tensor([len(p) for p in word_pieces(kg.entity_names, tokenizer)])
    is_neighbour = answer_is_neighbour([e.topic_entity for e in examples],
                                       [e.answer_entity for e in examples], kg)
    index = None  # the same for both: the checkpoint's config
    for init in ("pretrained", "untrained"):
        torch.manual_seed(0)
        hitter = load_hitter(args.checkpoint, weights=init == "pretrained").eval()
        index = index or build_neighbour_index(hitter.config.to_dict(), data_dir, kg=kg)
        r = probe(hitter, index, examples, is_neighbour, name_length, tokenizer)
        print(f"{args.dataset} filtered {args.split}, HittER {init}: oracle-relation hits@1 "
              f"{r['all@1']:.3f}; answer a neighbour ({r['n_neighbour']} q.) hits@1 "
              f"{r['neighbour@1']:.3f} hits@10 {r['neighbour@10']:.3f}; other "
              f"({r['n_other']} q.) hits@1 {r['other@1']:.3f} hits@10 {r['other@10']:.3f}",
              flush=True)
        cosine, share = token_spread(hitter, index, sorted({e.topic_entity for e in examples}))
        print(f"  neighbour-token states of a topic: mean cosine {cosine:.4f}, token-specific "
              f"share of the squared norm {share:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
