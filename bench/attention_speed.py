"""Attention over the entity Transformer's 3 tokens: torch's ``scaled_dot_product_attention``
against :func:`hitter_core.cpu_kernels.short_attention`, which the layers use for it on CPU.

Times, on a paper-config FB15K-237 batch of pairs (about 3,650 distinct pairs in a batch of 64
triples; 8 heads of 40), the training case (dropout 0.1, forward and backward down to the
query, key and value projections) and the evaluation case (no dropout, forward only).

    python bench/attention_speed.py [--pairs 3650] [--threads 2] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hitter_core.cpu_kernels import short_attention


def median_ms(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3650)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    P, H, d = args.pairs, args.heads, args.head_dim
    q = torch.randn(P, 3, H, d, requires_grad=True)  # (pairs, tokens, heads, head dim)
    kv = torch.randn(P, 3, 2, H, d, requires_grad=True)

    def sdpa(p: float) -> torch.Tensor:
        k, v = kv.permute(2, 0, 3, 1, 4)  # (P, H, 3, d) each
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, dropout_p=p)

    def train(attention: Callable[[float], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            attention(0.1).sum().backward()
            q.grad = kv.grad = None
        return run

    def evaluate(attention: Callable[[float], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                attention(0.0)
        return run

    ours = lambda p: short_attention(q, kv, p)  # noqa: E731
    print(f"{P:,} pairs x 3 tokens, {H} heads of {d}, {torch.get_num_threads()} threads")
    for case, make in (("training (dropout 0.1, forward + backward)", train),
                       ("evaluation (forward)", evaluate)):
        t_sdpa = median_ms(make(sdpa), args.repeats)
        t_ours = median_ms(make(ours), args.repeats)
        print(f"{case}: SDPA {t_sdpa:.1f} ms, short_attention {t_ours:.1f} ms "
              f"({t_sdpa / t_ours:.1f}x)")


if __name__ == "__main__":
    main()
