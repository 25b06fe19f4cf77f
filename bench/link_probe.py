"""Where does a trained link head (``kgqa/readers/link.py``) lose the answer? A probe of a QA
run's ``best/`` on a filtered test split (issue "knowledge that helps").

For every question whose answer is a direct neighbour of its topic in the train graph, the
gold relations are those of the train triples linking the two ((t, r, a): r; (a, r, t): the
reciprocal r + R, the head's numbering). Printed, for each model directory:

* relation choice: how often the head's most likely relation ``argmax p(r | q, t)`` is a gold
  one, and the mean mass ``p(r | q, t)`` puts on the gold ones (chance: 1 / the topic's
  relations, also printed);
* HittER's answer: hits@1 / @10 of the answer among the candidates (entities whose name has
  as many word pieces as the answer) under the head's own ``p_KG`` (the relation mixture at
  the head's temperature), and under the best gold relation (an oracle);
* the weight ``beta`` of HittER's opinion (mean, quartiles) and test accuracy, split by
  whether the head chose a gold relation, beside the plain LM's accuracy on the same
  questions when ``--lm-run`` gives its run directory (``predictions.test.jsonl``).

    python bench/link_probe.py runs/kg-gain/freebaseqa-filtered-hitter0.29/link/seed333/best \
        --dataset freebaseqa [--lm-run runs/kg-gain/freebaseqa-filtered/lm/seed333] \
        [--data-dir DIR] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import datasets
import torch

from hitter_core.cli import run_cli
from hitter_core.data import default_data_dir, load_kg
from kgqa.batches import make_batch
from kgqa.data import qa_splits, read_sources
from kgqa.model import load_qa_model
from kgqa.readers.link import LinkReader
from kgqa.report import predictions_file, read_predictions


def gold_relations(train: torch.Tensor, num_relations: int,
                   pairs: Sequence[tuple[int, int]]) -> list[set[int]]:
    """Per (topic, answer) pair, the relation ids of the link head that lead from the topic to
    the answer in the (T, 3) train triples: r for (t, r, a), r + R for (a, r, t)."""
    wanted = set(pairs)
    found: dict[tuple[int, int], set[int]] = {p: set() for p in wanted}
    for h, r, t in train.tolist():
        if (h, t) in wanted:
            found[(h, t)].add(r)
        if (t, h) in wanted:
            found[(t, h)].add(r + num_relations)
    return [found[p] for p in pairs]


def candidate_rank(scores: torch.Tensor, answer: int, candidates: torch.Tensor) -> int:
    """The answer's rank (0 = first) among the candidates (E,) bool by scores (E,)."""
    return int(((scores > scores[answer]) & candidates).sum())


@torch.no_grad()
def probe(model_dir: str, examples: list, gold: list[set[int]], data_dir: str,
          batch_size: int) -> list[dict]:
    """One record per question with KG input: gold relations chosen, HittER's ranks, beta,
    correct."""
    model, tokenizer, index = load_qa_model(model_dir, data_dir)
    head = model.head
    if not isinstance(head, LinkReader):
        raise ValueError(f"{model_dir}: not a link-head model (model.reader is "
                         f"{model.config.reader})")
    n_max = model.config.max_neighbours
    captured = []  # HittER's link prediction, run once by the model
    predict_links = head.predict_links
    head.predict_links = lambda x: captured.append(predict_links(x)) or captured[-1]
    records = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = make_batch(chunk, tokenizer, index, n_max)
        if len(batch["input_ids"]) != len(chunk):
            raise ValueError(f"questions {start}-{start + len(chunk)}: some were dropped")
        captured.clear()
        out = model(**batch)
        top = out.log_probs.argmax(-1)  # (M,)
        wrong = torch.zeros(len(chunk), dtype=torch.long).index_add_(
            0, out.rows, (top != out.labels).long())
        (links,) = captured  # LinkReader.predict_links's output
        kg_rows, _, q_rows, q_rels, scores = links  # ... topics ... HittER's (Q, E) scores
        relation_probs, beta = out.kg_evidence["relation_probs"], out.kg_evidence["gate"]
        p_kg = head.answer_probs(relation_probs, q_rows, q_rels, scores)  # (B_kg, E)
        for j, row in enumerate(kg_rows.tolist()):
            ex, g = chunk[row], gold[start + row]
            fits = head.name_length == int(batch["num_masks"][row])  # (E,) candidates
            probs = relation_probs[j]  # (2R,)
            mine = q_rows == j
            by_relation = dict(zip(q_rels[mine].tolist(), scores[mine], strict=True))
            oracle = min((candidate_rank(by_relation[r], ex.answer_entity, fits)
                          for r in g if r in by_relation), default=None)
            records.append(dict(
                gold=bool(g), chose_gold=int(probs.argmax()) in g,
                gold_mass=float(probs[sorted(g)].sum()) if g else 0.0,
                relations=int((probs > 0).sum()), beta=float(beta[j]),
                rank_head=candidate_rank(p_kg[j], ex.answer_entity, fits), rank_oracle=oracle,
                correct=bool(wrong[row] == 0), question_id=ex.question_id,
            ))
    return records


def summarise(records: list[dict], lm_correct: dict[str, bool] | None) -> str:
    g = [r for r in records if r["gold"]]
    lines = [f"{len(records)} questions with KG input, {len(g)} with the answer a neighbour"]
    if g:
        chose = sum(r["chose_gold"] for r in g) / len(g)
        mass = sum(r["gold_mass"] for r in g) / len(g)
        chance = sum(1 / max(1, r["relations"]) for r in g) / len(g)
        lines.append(f"  relation: argmax p(r|q,t) gold {chose:.1%}; mass on gold {mass:.3f} "
                     f"(one relation by chance {chance:.3f})")
        for name, key in (("head's p_KG", "rank_head"), ("oracle relation", "rank_oracle")):
            ranks = [r[key] for r in g if r[key] is not None]
            lines.append(f"  HittER's answer under the {name}: hits@1 "
                         f"{sum(x < 1 for x in ranks) / len(g):.1%}, hits@10 "
                         f"{sum(x < 10 for x in ranks) / len(g):.1%}")
    betas = sorted(r["beta"] for r in records)
    q = [betas[int(f * (len(betas) - 1))] for f in (0.25, 0.5, 0.75)]
    lines.append(f"  beta: mean {sum(betas) / len(betas):.2f}, quartiles "
                 f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}")
    parts = (("answer a neighbour, gold relation chosen", lambda r: r["gold"] and r["chose_gold"]),
             ("answer a neighbour, another relation", lambda r: r["gold"] and not r["chose_gold"]),
             ("answer not a neighbour", lambda r: not r["gold"]))
    for name, keep in parts:
        part = [r for r in records if keep(r)]
        if not part:
            continue
        acc = sum(r["correct"] for r in part) / len(part)
        line = f"  {name} ({len(part)} q.): accuracy {acc:.1%}"
        if lm_correct is not None:
            lm = sum(lm_correct[r["question_id"]] for r in part) / len(part)
            line += f", the LM {lm:.1%}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/link_probe.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="best/ directories of link-head QA runs")
    parser.add_argument("--dataset", choices=("webqsp", "freebaseqa"), default="webqsp")
    parser.add_argument("--split", default="test")
    parser.add_argument("--lm-run", default=None,
                        help="a plain-LM run directory (its predictions.<split>.jsonl)")
    parser.add_argument("--data-dir", default=None, help="data root [$KGQA_DATA_DIR]")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()  # one small Dataset.map per batch
    data_dir = str(args.data_dir or default_data_dir())
    kg = load_kg(f"{data_dir}/fb15k-237")
    examples = qa_splits(read_sources(data_dir, kg, datasets=[args.dataset]), args.dataset,
                         "filtered")[args.split]
    gold = gold_relations(kg.train, kg.num_relations,
                          [(e.topic_entity, e.answer_entity) for e in examples])
    lm_correct = None
    if args.lm_run:
        path = predictions_file(args.lm_run, args.split)
        if path is None:
            raise FileNotFoundError(f"{args.lm_run}: no predictions.{args.split}.jsonl(.gz)")
        lm_correct = {d["question_id"]: d["correct"] for d in read_predictions(path)}
    for model_dir in args.models:
        records = probe(model_dir, examples, gold, data_dir, args.batch_size)
        print(f"{model_dir} ({args.dataset} filtered {args.split}):")
        print(summarise(records, lm_correct), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
