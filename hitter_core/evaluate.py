"""Link-prediction evaluation: filtered ranking in both directions (paper section 3.2).

Every triple ``(h, r, t)`` of the evaluated split gives a tail query ``(h, r) -> t`` and a
head query through the reciprocal relation ``(t, r + R) -> h``. Each query is scored against
all entities, the other known answers are filtered out (``FilterIndex``, train + valid + test
by default) and the target gets its realistic rank (mean rank of its tied block, unrounded;
see ``hitter_core.ranking``). We report MRR and Hits@1/3/10 per direction and averaged over
all 2T queries ("both", the standard figure), plus a per-relation breakdown.

Command line::

    python -m hitter_core.evaluate CHECKPOINT --split test --data-dir DIR --output metrics.json
        [--batch-size N] [--no-keep-freed-memory]
    python -m hitter_core.evaluate --baseline frequency --dataset fb15k-237 [--split test ...]

``--baseline frequency`` ranks by relation frequency, with nothing learned
(``hitter_core.baselines``): the floor to read a checkpoint's MRR against.

``--batch-size`` defaults to the checkpoint's ``train.eval_batch_size`` (its
``run_config.yaml``). On CPU the command keeps freed memory in the process
(``hitter_core.cpu_memory``) unless ``--no-keep-freed-memory`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from tqdm.auto import tqdm

from hitter_core.baselines import BASELINES, RelationFrequencyScorer
from hitter_core.checkpoint import load_hitter
from hitter_core.cli import run_cli
from hitter_core.config import TrainConfig
from hitter_core.cpu_memory import add_memory_argument, keep_freed_memory
from hitter_core.data import SPLITS, KnowledgeGraph, default_data_dir, load_kg
from hitter_core.model import HittERScorer
from hitter_core.neighbours import NeighbourIndex
from hitter_core.ranking import FilterIndex, ranking_metrics, realistic_rank
from hitter_core.runtime import crash_point
from hitter_core.sections import RUN_CONFIG_NAME

DIRECTIONS = ("tail", "head", "both")


class Scorer(Protocol):
    """Scores every entity as the answer of a batch of queries (higher = better)."""

    def __call__(self, sources: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        """sources (B,) entity ids, relations (B,) relation tokens in [0, 2R) -> (B, E)."""
        ...


def split_queries(
    triples: torch.Tensor, num_relations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, 3) triples -> sources, relations, targets (2T,): the T tail queries, then the T
    head queries as reciprocal tail queries ``(t, r + R) -> h``."""
    head, rel, tail = triples.unbind(1)
    sources = torch.cat([head, tail])
    relations = torch.cat([rel, rel + num_relations])
    targets = torch.cat([tail, head])
    return sources, relations, targets


@torch.no_grad()
def rank_queries(
    scorer: Scorer,
    sources: torch.Tensor,
    relations: torch.Tensor,
    targets: torch.Tensor,
    filter_index: FilterIndex,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Filtered realistic rank of each query; sources, relations, targets (Q,) -> (Q,) on CPU."""
    device = torch.device(device)
    filter_index = filter_index.to(device)
    ranks = torch.empty(len(sources), dtype=torch.float64)
    starts = range(0, len(sources), batch_size)
    # Off a terminal (logs) the bar is redrawn at most every 30 s, as in training.
    bar = tqdm(starts, desc="ranking", unit="batch", disable=not progress, leave=False,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for start in bar:
        end = start + batch_size
        src, rel, tgt = (x[start:end].to(device) for x in (sources, relations, targets))
        crash_point("evaluate")
        scores = scorer(src, rel)  # (B, E)
        if scores.shape != (len(src), filter_index.num_entities):
            raise ValueError(
                f"scorer returned shape {tuple(scores.shape)}, "
                f"expected ({len(src)}, {filter_index.num_entities})"
            )
        if bool(torch.isnan(scores).any()):
            raise ValueError("scorer returned NaN scores")
        if not scores.is_floating_point():
            scores = scores.float()
        scores = filter_index.filter_scores(scores, src, rel, tgt)
        ranks[start:end] = realistic_rank(scores, tgt).cpu()
    return ranks


def per_relation_metrics(
    relation_ids: torch.Tensor, ranks: torch.Tensor, relation_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """MRR and Hits@10 over both directions for each forward relation present.

    relation_ids (T,) of the evaluated triples; ranks (2T,) = tail ranks then head ranks.
    ``count`` is the number of triples (each contributes two queries)."""
    num_r = len(relation_names)
    rel2 = torch.cat([relation_ids, relation_ids])  # (2T,)
    queries = torch.bincount(rel2, minlength=num_r).double()
    rr_sum = torch.zeros(num_r, dtype=torch.float64).index_add_(0, rel2, 1 / ranks)
    hit_sum = torch.zeros(num_r, dtype=torch.float64).index_add_(0, rel2, (ranks <= 10).double())
    out = {}
    for r in torch.nonzero(queries).flatten().tolist():
        out[relation_names[r]] = {
            "count": int(queries[r]) // 2,
            "mrr": float(rr_sum[r] / queries[r]),
            "hits@10": float(hit_sum[r] / queries[r]),
        }
    return out


def evaluate(
    scorer: Scorer,
    kg: KnowledgeGraph,
    split: str = "test",
    filter_index: FilterIndex | None = None,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    progress: bool = True,
    return_ranks: bool = False,
) -> dict[str, Any]:
    """Filtered link-prediction metrics of ``scorer`` on ``kg``'s ``split``.

    Returns ``{"split", "filter_splits", "tail", "head", "both", "per_relation"}`` where each
    direction holds ``ranking_metrics`` and ``per_relation`` maps relation names to count,
    MRR and Hits@10 over both directions. ``return_ranks`` adds ``"ranks"`` (2T,): the tail
    ranks then the head ranks, in the split's triple order.
    """
    if filter_index is None:
        filter_index = FilterIndex.build(kg)
    if (filter_index.num_entities, filter_index.num_relations) != (
        kg.num_entities,
        kg.num_relations,
    ):
        raise ValueError("the filter index was built for a different graph")
    triples = kg.splits[split]  # (T, 3)
    sources, relations, targets = split_queries(triples, kg.num_relations)
    ranks = rank_queries(
        scorer, sources, relations, targets, filter_index, batch_size, device, progress
    )
    num_t = len(triples)
    result: dict[str, Any] = {
        "split": split,
        "filter_splits": list(filter_index.splits),
        "tail": ranking_metrics(ranks[:num_t]),
        "head": ranking_metrics(ranks[num_t:]),
        "both": ranking_metrics(ranks),
        "per_relation": per_relation_metrics(triples[:, 1], ranks, kg.relations),
    }
    if return_ranks:
        result["ranks"] = ranks
    return result


def format_table(metrics: dict[str, Any], per_relation: bool = False) -> str:
    """Plain-text table of MRR, H@1, H@3, H@10 (and MR, count) per direction; with
    ``per_relation`` also one line per relation (count, MRR, H@10), most frequent first."""
    lines = [f"{'':<10}{'MRR':>8}{'H@1':>8}{'H@3':>8}{'H@10':>8}{'MR':>10}{'count':>8}"]
    for direction in DIRECTIONS:
        if direction not in metrics:
            continue
        m = metrics[direction]
        lines.append(
            f"{direction:<10}{m['mrr']:>8.4f}{m['hits@1']:>8.4f}{m['hits@3']:>8.4f}"
            f"{m['hits@10']:>8.4f}{m['mean_rank']:>10.1f}{m['count']:>8d}"
        )
    if per_relation and metrics.get("per_relation"):
        lines += ["", f"{'relation':<60}{'count':>8}{'MRR':>8}{'H@10':>8}"]
        rows = sorted(metrics["per_relation"].items(), key=lambda kv: (-kv[1]["count"], kv[0]))
        for name, m in rows:
            lines.append(f"{name[-60:]:<60}{m['count']:>8d}{m['mrr']:>8.4f}{m['hits@10']:>8.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- checkpoint command line

ScorerLoader = Callable[[str, Path, torch.device], tuple[Scorer, KnowledgeGraph]]


def load_checkpoint_scorer(
    checkpoint: str, data_dir: Path, device: torch.device
) -> tuple[Scorer, KnowledgeGraph]:
    """Load a HittER directory saved by ``save_pretrained``, its dataset and its scorer."""
    model = load_hitter(checkpoint).to(device).eval()
    kg = load_kg(Path(data_dir) / model.config.dataset)
    if (kg.num_entities, kg.num_relations) != (model.config.num_entities,
                                               model.config.num_relations):
        raise ValueError(
            f"{checkpoint} was trained on {model.config.num_entities} entities / "
            f"{model.config.num_relations} relations, {kg} differs"
        )
    # Evaluation reads the first max_neighbours tokens of the fixed order the model saw.
    neighbour_index = NeighbourIndex.build(kg, seed=model.config.neighbour_order_seed).to(device)
    return HittERScorer(model, neighbour_index), kg


def eval_batch_size(checkpoint: str | Path) -> int:
    """``train.eval_batch_size`` of the run that saved ``checkpoint`` (its
    ``run_config.yaml``), else the default of :class:`~hitter_core.config.TrainConfig`."""
    saved = Path(checkpoint) / RUN_CONFIG_NAME
    train = yaml.safe_load(saved.read_text(encoding="utf-8")).get("train", {}) if (
        saved.is_file()) else {}
    return train.get("eval_batch_size", TrainConfig.eval_batch_size)


def evaluate_checkpoint(
    checkpoint: str,
    split: str = "test",
    data_dir: str | Path | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    filter_splits: Sequence[str] = SPLITS,
    progress: bool = True,
    load: ScorerLoader | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model; ``load`` (default ``load_checkpoint_scorer``) builds the scorer,
    ``batch_size`` defaults to :func:`eval_batch_size`."""
    load = load or load_checkpoint_scorer
    batch_size = batch_size or eval_batch_size(checkpoint)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    scorer, kg = load(checkpoint, data_dir, torch.device(device))
    metrics = evaluate(
        scorer,
        kg,
        split=split,
        filter_index=FilterIndex.build(kg, filter_splits),
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    return {"checkpoint": str(checkpoint), "dataset": kg.name, **metrics}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m hitter_core.evaluate`` (module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m hitter_core.evaluate",
        description="Filtered link-prediction evaluation (MRR, Hits@1/3/10, both directions).",
    )
    parser.add_argument("checkpoint", nargs="?",
                        help="model directory written by save_pretrained")
    parser.add_argument("--baseline", choices=BASELINES, default=None,
                        help="evaluate a baseline with nothing learned instead of a checkpoint "
                             "(frequency: rank entities by how often they answer the relation "
                             "in train); needs --dataset")
    parser.add_argument("--dataset", default=None,
                        help="the graph of --baseline: a folder of the data root "
                             "(fb15k-237, wn18rr)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="data root (default $KGQA_DATA_DIR)"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the metrics as JSON")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="queries per scoring call (default: the run's eval_batch_size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--filter-splits", nargs="+", default=list(SPLITS), choices=SPLITS,
        help="splits whose triples are filtered (default: all three, the standard protocol)",
    )
    parser.add_argument(
        "--per-relation", action="store_true", help="also print the per-relation table"
    )
    parser.add_argument("--no-progress", action="store_true")
    add_memory_argument(parser)
    return parser


def _check_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error unless exactly one of a checkpoint and ``--baseline`` (with its
    ``--dataset``) is given."""
    if (args.checkpoint is None) == (args.baseline is None):
        parser.error("give either a CHECKPOINT or --baseline")
    if args.baseline is not None and args.dataset is None:
        parser.error("--baseline needs --dataset (e.g. fb15k-237)")
    if args.dataset is not None and args.baseline is None:
        parser.error("--dataset is for --baseline; a checkpoint names its own graph")


def baseline_loader(dataset: str) -> ScorerLoader:
    """A :data:`ScorerLoader` for the frequency baseline on ``dataset`` (a data-root folder)."""

    def load(_name: str, data_dir: Path, _device: torch.device):
        kg = load_kg(Path(data_dir) / dataset)
        return RelationFrequencyScorer(kg), kg

    return load


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint or a baseline, print the table, optionally write the JSON."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_target(parser, args)
    if torch.device(args.device).type == "cpu" and not args.no_keep_freed_memory:
        keep_freed_memory()

    metrics = evaluate_checkpoint(
        args.checkpoint or f"baseline:{args.baseline}",
        split=args.split,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        device=args.device,
        filter_splits=args.filter_splits,
        progress=not args.no_progress,
        load=baseline_loader(args.dataset) if args.baseline is not None else None,
    )
    print(f"{metrics['dataset']} {args.split} (filtered with {'+'.join(args.filter_splits)})")
    print(format_table(metrics, per_relation=args.per_relation))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {args.output}")
    return metrics


if __name__ == "__main__":
    sys.exit(run_cli(main))
