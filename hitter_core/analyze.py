"""The paper's analyses of a trained HittER, as files a person looks at.

    python -m hitter_core.analyze CHECKPOINT [CHECKPOINT2] --out DIR [--entities NAME ...]

writes ``DIR/report.md`` with PNG plots (matplotlib, the ``[viz]`` extra):

* ``per_relation.png``: test MRR of the most frequent relations (paper Table 4);
* ``hops.png``: test MRR by the number of hops between source and target in the undirected
  train graph, with the number of queries (paper Figure 3);
* nearest neighbours of chosen entities by cosine similarity of the learned entity
  embeddings (paper Table 7), as a table in the report;
* ``training.png``: training loss and valid MRR from the run's ``metrics.jsonl`` (the
  checkpoint's parent directory), when there is one.

With two checkpoints (e.g. context-free and full, as in Table 4 and Figure 3) the plots put
them side by side. Ranks are filtered test ranks (train + valid + test), as ``evaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hitter_core.checkpoint import load_hitter
from hitter_core.cli import run_cli
from hitter_core.data import KnowledgeGraph, default_data_dir, load_kg
from hitter_core.evaluate import evaluate
from hitter_core.model import HittER, HittERScorer
from hitter_core.neighbours import NeighbourIndex
from hitter_core.predict import AmbiguousName, find_entity

MAX_HOPS = 4  # distances above are grouped as "5+"; 0 hops: source = target
TOP_RELATIONS = 15


def hop_distances(kg: KnowledgeGraph, sources: torch.Tensor, targets: torch.Tensor,
                  max_hops: int = MAX_HOPS, chunk: int = 512) -> torch.Tensor:
    """(Q,) shortest-path lengths from each source to its target in the undirected train
    graph; ``max_hops + 1`` for farther or unreachable. Breadth-first, a chunk of distinct
    sources at a time, as sparse (E, E) x dense (E, chunk) products."""
    E, t = kg.num_entities, kg.train
    edges = torch.cat([t[:, [0, 2]], t[:, [2, 0]]]).unique(dim=0)  # (M, 2) both directions
    adjacency = torch.sparse_coo_tensor(edges.T, torch.ones(len(edges)), (E, E),
                                        check_invariants=True).coalesce()
    distances = torch.full((len(sources),), max_hops + 1, dtype=torch.long)
    distinct, inverse = sources.unique(return_inverse=True)
    for start in range(0, len(distinct), chunk):
        block = distinct[start : start + chunk]  # (C,)
        reached = torch.zeros(E, len(block))
        reached[block, torch.arange(len(block))] = 1.0
        dist = torch.full((E, len(block)), max_hops + 1, dtype=torch.long)
        dist[block, torch.arange(len(block))] = 0
        frontier = reached
        for hop in range(1, max_hops + 1):
            frontier = (torch.sparse.mm(adjacency, frontier) > 0).float() * (reached == 0)
            dist[frontier.bool()] = hop
            reached = reached + frontier
        mine = (inverse >= start) & (inverse < start + len(block))
        rows = mine.nonzero().squeeze(1)
        distances[rows] = dist[targets[rows], inverse[rows] - start]
    return distances


def nearest_entities(model: HittER, entity: int, k: int = 5) -> list[tuple[int, float]]:
    """The ``k`` entities whose embeddings are closest (cosine) to ``entity``'s."""
    table = torch.nn.functional.normalize(model.entity_embeddings.weight.detach(), dim=1)
    similarity = table @ table[entity]
    similarity[entity] = float("-inf")
    values, ids = similarity.topk(k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def analyse(model: HittER, kg: KnowledgeGraph) -> dict[str, Any]:
    """Filtered test ranks of ``model`` grouped by relation and by hops."""
    neighbours = NeighbourIndex.build(kg, seed=model.config.neighbour_order_seed)
    metrics = evaluate(HittERScorer(model, neighbours), kg, "test", progress=False,
                       return_ranks=True)
    ranks = metrics.pop("ranks").double()
    test = kg.test
    sources, targets = torch.cat([test[:, 0], test[:, 2]]), torch.cat([test[:, 2], test[:, 0]])
    hops = hop_distances(kg, sources, targets)
    by_hops = {int(h): {"count": int((hops == h).sum()),
                        "mrr": float((1 / ranks[hops == h]).mean())} for h in hops.unique()}
    return {"both": metrics["both"], "per_relation": metrics["per_relation"], "hops": by_hops}


def plot_bars(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str,
              title: str, counts: list[int] | None = None, rotate: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7.5, 0.6 * len(groups) + 2), 4.5))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    labels = groups if counts is None else [f"{g}\n(n={c:,})" for g, c in zip(groups, counts,
                                                                             strict=True)]
    ax.set_xticklabels(labels, rotation=60 if rotate else 0, ha="right" if rotate else "center",
                       fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(path: Path, metrics_jsonl: Path) -> bool:
    """Loss and valid MRR against the step; False if there is no log."""
    if not metrics_jsonl.is_file():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line]
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_mrr"]) for r in records if "valid_mrr" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if loss:
        left.plot(*zip(*loss, strict=True), label="training loss")
    if valid:
        right.plot(*zip(*valid, strict=True), "o-", label="valid MRR (filtered)")
    for ax, ylabel in ((left, "loss"), (right, "MRR")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"training of {metrics_jsonl.parent.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hitter_core.analyze",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="one or two HittER directories")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--entities", nargs="*", default=None,
                        help="entities for nearest neighbours (default: the 5 most frequent)")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if len(args.checkpoints) > 2:
        parser.error("give one or two checkpoints")
    models = {Path(c).parent.name or str(c): load_hitter(c).eval() for c in args.checkpoints}
    first = next(iter(models.values()))
    kg = load_kg((args.data_dir or default_data_dir()) / first.config.dataset)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {name: analyse(model, kg) for name, model in models.items()}
    (args.out / "analysis.json").write_text(json.dumps(results, indent=2))

    base = next(iter(results.values()))
    relations = sorted(base["per_relation"], key=lambda r: -base["per_relation"][r]["count"])
    relations = relations[:TOP_RELATIONS]
    plot_bars(args.out / "per_relation.png", [r.rsplit("/", 1)[-1] for r in relations],
              {n: [res["per_relation"].get(r, {}).get("mrr", 0.0) for r in relations]
               for n, res in results.items()}, "test MRR (filtered)",
              f"MRR of the {len(relations)} most frequent test relations",
              [base["per_relation"][r]["count"] for r in relations], rotate=True)
    hops = sorted(base["hops"])
    plot_bars(args.out / "hops.png", [str(h) if h <= MAX_HOPS else f"{MAX_HOPS + 1}+"
                                      for h in hops],
              {n: [res["hops"].get(h, {}).get("mrr", 0.0) for h in hops]
               for n, res in results.items()}, "test MRR (filtered)",
              "MRR by hops between source and target (undirected train graph)",
              [base["hops"][h]["count"] for h in hops])
    trained = plot_training(args.out / "training.png",
                            Path(args.checkpoints[0]).parent / "metrics.jsonl")

    degree = torch.bincount(torch.cat([kg.train[:, 0], kg.train[:, 2]]),
                            minlength=kg.num_entities)
    chosen = ([find_entity(kg, e) for e in args.entities] if args.entities
              else degree.topk(5).indices.tolist())
    lines = [f"# Analysis of {', '.join(args.checkpoints)} on {kg.name}", "",
             "| model | test MRR | H@1 | H@10 |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['both']['mrr']:.4f} | {r['both']['hits@1']:.4f} | "
              f"{r['both']['hits@10']:.4f} |" for n, r in results.items()]
    lines += ["", "## MRR per relation (paper Table 4)", "", "![](per_relation.png)", "",
              "## MRR by hops (paper Figure 3)", "", "![](hops.png)", ""]
    if trained:
        lines += ["## Training", "", "![](training.png)", ""]
    lines += ["## Nearest neighbours in the entity embedding space (paper Table 7)", ""]
    for name, model in models.items():
        lines += [f"{name}:", "", "| entity | nearest (cosine) |", "|---|---|"]
        for e in chosen:
            near = ", ".join(f"{kg.entity_names[i]} ({s:.2f})" for i, s in
                             nearest_entities(model, e))
            lines.append(f"| {kg.entity_names[e]} | {near} |")
        lines.append("")
    (args.out / "report.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'report.md'} and its plots")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, user_errors=(AmbiguousName,)))
