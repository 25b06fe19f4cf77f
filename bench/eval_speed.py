"""Wall time of the filtered evaluation (paper section 3.2 protocol) on the FB15K-237 test
split, both directions, realistic ranks, with a DistMult-like dot-product scorer over random
320-d embeddings: score(s, p, .) = (e_s * r_p) @ E^T. It measures the evaluator, not a model.

    python bench/eval_speed.py [--threads 2] [--batch-size 1024] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hitter_core.config import DEFAULT_KG
from hitter_core.data import default_data_dir, load_kg
from hitter_core.evaluate import evaluate
from hitter_core.ranking import FilterIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=320)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--dataset", default=DEFAULT_KG)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kg = load_kg((args.data_dir or default_data_dir()) / args.dataset)
    entity_emb = torch.randn(kg.num_entities, args.dim)  # (E, D)
    relation_emb = torch.randn(2 * kg.num_relations, args.dim)  # (2R, D)

    def scorer(sources: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        return (entity_emb[sources] * relation_emb[relations]) @ entity_emb.T  # (B, E)

    t0 = time.perf_counter()
    filter_index = FilterIndex.build(kg)
    t1 = time.perf_counter()
    metrics = evaluate(scorer, kg, "test", filter_index, args.batch_size, progress=False)
    t2 = time.perf_counter()

    queries = metrics["both"]["count"]
    print(f"{kg.name} test: {queries:,} queries, {kg.num_entities:,} entities, "
          f"threads={args.threads}, batch={args.batch_size}")
    print(f"filter index build: {t1 - t0:.2f} s")
    print(f"evaluate:           {t2 - t1:.2f} s ({queries / (t2 - t1):,.0f} queries/s)")
    print(f"MRR (random scorer): {metrics['both']['mrr']:.5f}")


if __name__ == "__main__":
    main()
