"""Training throughput, peak memory and evaluation time of HittER (paper section 2, trained as
in section 3.3) for a preset and batch size, on CPU or GPU.

One timed step is a full training step built from the trainer's own pieces
(``hitter_core.batches.make_batch``/``compute_loss``, ``hitter_core.optim``), without the
DeepSpeed engine: B random train triples, their 2B queries (tail queries and reciprocal head
queries) with train-mode neighbourhoods (fresh random subset, ground-truth token removed,
neighbour drop), one forward over both directions, backward, per-tensor gradient clipping and
an Adamax step (decoupled weight decay). Throughput counts **triples** (a triple's two queries
once) over ``--steps`` steps after ``--warmup`` untimed ones; the mean, median and best step
are printed, after the rate of one reference matrix product (:func:`matmul_rate`). The
model config is the preset's, so repeated pairs of a batch are encoded once
(``model.dedup_pairs_in_training``; ``=false`` times the reference's per-copy encoding).
Evaluation time is the time to rank ``--eval-queries`` queries of the valid split
with the evaluation neighbourhoods and the filter (scoring, filtering, ranking), extrapolated
to the whole test split (2 x 20,466 queries for FB15K-237); ``--eval-queries 0`` ranks the
whole test split instead. Peak memory is the process's max RSS on CPU (data and indexes
included) and ``torch.cuda.max_memory_allocated`` on GPU. On CPU the process keeps freed
memory for reuse, as training does (``hitter_core.cpu_memory``; ``--no-keep-freed-memory``:
glibc's default).

    python bench/train_speed.py --preset fb15k-237 --batch-size 64 --threads 2 [--steps 10]
        [--device cpu|cuda] [--bf16] [--compile] [--profile] [--json FILE] [--shape-steps N]
        [--sdpa-backend default|torch|flash|efficient|math] [--standard-kernels]
        [--no-keep-freed-memory]
        [model.hidden_size=128 train.lr=0.02 ...]

The precision is the preset's ``train.precision`` (``auto``: bf16 autocast where the device
has native bf16, as the trainer resolves it, ``hitter_core.precision``; fp32 weights, gradients
and optimizer state); ``train.precision=fp32`` times float32, ``--bf16`` is
``train.precision=bf16``. ``--compile`` compiles each Transformer layer with ``torch.compile``
(``dynamic=False`` over the bucketed static shapes, ``model.shape_buckets``; ``dynamic=True``
with ``model.shape_buckets=0``). The distinct input shapes of the timed steps are counted
(pair rows, context tokens, neighbour width: what plans and compiled graphs are keyed on);
``--shape-steps N`` counts them over N more batches (forward only, no gradient; ``epoch``:
one epoch's worth). ``--profile`` prints the top ops of one extra step (torch.profiler);
``--json`` writes the figures (bench/gpu/suite.sh collects them); ``--sdpa-backend`` sets the
backends CUDA's ``scaled_dot_product_attention`` may pick (``default``: the trainer's choice,
``hitter_core.kernels.CUDA_SDPA_BACKENDS``, which leaves out cuDNN's; ``torch``: torch's own
choice). The default warm-up is 2 steps on CPU and 10 on CUDA (kernel selection, the caching
allocator, compilation).

The evaluation batch is the preset's ``train.eval_batch_size`` (override it as any setting).

On a CPU shared with other jobs, OpenMP's default busy-waiting makes every parallel op wait
for a descheduled thread: run with ``OMP_WAIT_POLICY=PASSIVE`` there (several times faster
under load); on an idle machine the default is as fast or slightly faster.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

from hitter_core import kernels
from hitter_core.batches import compute_loss, make_batch
from hitter_core.cli import add_config_arguments, run_cli
from hitter_core.config import DEFAULT_PRESET, TrainConfig, load_config
from hitter_core.cpu_memory import add_memory_argument, keep_freed_memory
from hitter_core.data import default_data_dir, load_kg
from hitter_core.evaluate import rank_queries, split_queries
from hitter_core.model import HittER, HittERScorer
from hitter_core.neighbours import NeighbourIndex
from hitter_core.optim import build_optimizer, clip_grad_per_tensor_
from hitter_core.precision import resolve_precision
from hitter_core.ranking import FilterIndex

SDPA_BACKENDS = {  # --sdpa-backend: the backends scaled_dot_product_attention may pick on CUDA
    "default": kernels.CUDA_SDPA_BACKENDS,  # the trainer's choice
    "torch": None,  # torch's own choice, cuDNN's attention included
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


def make_train_step(
    model: HittER, index: NeighbourIndex, train: torch.Tensor, train_cfg: TrainConfig,
    batch_size: int, bf16: bool = False, sdpa_backend: str = "default",
) -> Callable[[], float]:
    """A closure running one training step on B random train triples; returns the loss.
    The trainer's own pieces (batch, loss, optimizer, clipping), without DeepSpeed; with
    ``bf16`` the forward runs under bf16 autocast, and CUDA's SDPA uses the backends
    ``sdpa_backend`` allows (:data:`SDPA_BACKENDS`)."""
    kernels.CUDA_SDPA_BACKENDS = SDPA_BACKENDS[sdpa_backend]
    optimizer = build_optimizer(model, train_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    device_type = train.device.type

    def step() -> float:
        rows = torch.randint(len(train), (batch_size,), device=train.device)
        batch = make_batch(train[rows], index, model.config)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = compute_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_per_tensor_(params, train_cfg.max_grad_norm)
        optimizer.step()
        return loss.item()

    return step


class ShapeCounter:
    """Counts the distinct input shapes HittER's Transformers see, through forward pre-hooks on
    the first entity and first context layer: (pair rows, context tokens, rows B, grid width L)
    per forward, the sizes that attention plans, oneDNN primitives and compiled graphs are
    built for."""

    def __init__(self, model: HittER) -> None:
        self.shapes: set[tuple[int, ...]] = set()
        self._pair_rows, self._context_too = 0, model.config.use_context
        model.pair_layers[0].register_forward_pre_hook(self._pairs)
        if self._context_too:
            model.context_layers[0].register_forward_pre_hook(self._context)

    def _pairs(self, module, args) -> None:
        self._pair_rows = args[0].shape[0]
        if not self._context_too:
            self.shapes.add((self._pair_rows,))

    def _context(self, module, args) -> None:
        x, packing = args[0], args[1]
        self.shapes.add((self._pair_rows, x.shape[0], packing.batch, packing.length))

    def count(self) -> int:
        return len(self.shapes)


@torch.no_grad()
def count_shapes(
    model: HittER, index: NeighbourIndex, train: torch.Tensor, batch_size: int, steps: int,
    bf16: bool,
) -> None:
    """Forward ``steps`` more random training batches (train mode, no gradient), so that a
    :class:`ShapeCounter` on the model sees their shapes."""
    for _ in range(steps):
        rows = torch.randint(len(train), (batch_size,), device=train.device)
        batch = make_batch(train[rows], index, model.config)
        with torch.autocast(train.device.type, dtype=torch.bfloat16, enabled=bf16):
            compute_loss(model, batch)


def print_profile(step: Callable[[], float], device: torch.device, rows: int = 15) -> None:
    """The ``rows`` ops of one training step that took the most device time (self time)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB (CUDA allocated)"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{rss_kib / 2**10:,.0f} MiB (process max RSS)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, repeats: int = 5) -> float:
    """GFLOP/s of a float32 (11008, 320) x (320, 1280) product into a preallocated output, the
    shape of the FFN products that dominate a paper-config step: the machine's compute rate at
    the time of the run, against which to read the throughput (a shared VM's rate varies
    between runs)."""
    a = torch.randn(11008, 320, device=device)
    b, out = torch.randn(320, 1280, device=device), torch.empty(11008, 1280, device=device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / statistics.median(times[1:]) / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, default_preset=DEFAULT_PRESET)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true",
                        help="train.precision=bf16 (default: the preset's, auto)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each Transformer layer (static shapes unless "
                             "model.shape_buckets=0)")
    parser.add_argument("--shape-steps", default="0",
                        help="count distinct input shapes over this many more batches "
                             "(forward only; 'epoch': an epoch's worth)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top ops of one more step (torch.profiler)")
    parser.add_argument("--sdpa-backend", default="default",
                        choices=["default", *SDPA_BACKENDS],
                        help="the backends CUDA's SDPA may use in training (default: the "
                             "trainer's, hitter_core.kernels.CUDA_SDPA_BACKENDS; torch: torch's "
                             "own choice, cuDNN included)")
    parser.add_argument("--standard-kernels", action="store_true",
                        help="torch's own dropout, attention and cross-entropy on CPU too, "
                             "instead of hitter_core.cpu_kernels (to compare them)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--eval-queries", type=int, default=2048,
                        help="valid queries to time, extrapolated to test; 0: the whole test")
    parser.add_argument("--seed", type=int, default=0)
    add_memory_argument(parser)
    args = parser.parse_intermixed_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.standard_kernels:
        kernels.CPU = kernels.STANDARD  # kernels_for(cpu) hands out torch's ops
    device = torch.device(args.device)
    model_cfg, train_cfg = load_config(args.preset, args.overrides)
    kept = device.type == "cpu" and not args.no_keep_freed_memory and keep_freed_memory()
    batch_size = args.batch_size or train_cfg.batch_size
    eval_batch = train_cfg.eval_batch_size

    t0 = time.perf_counter()
    data_dir = Path(train_cfg.data_dir) if train_cfg.data_dir else default_data_dir()
    kg = load_kg(data_dir / model_cfg.dataset)
    model_cfg.num_entities, model_cfg.num_relations = kg.num_entities, kg.num_relations
    index = NeighbourIndex.build(kg, seed=model_cfg.neighbour_order_seed).to(device)
    filter_index = FilterIndex.build(kg)
    load_s = time.perf_counter() - t0
    model = HittER(model_cfg).to(device).train()
    shapes = ShapeCounter(model)
    precision = resolve_precision("bf16" if args.bf16 else train_cfg.precision, device)
    bf16 = precision == "bf16"
    if args.compile:
        for layer in (*model.pair_layers, *model.context_layers):
            layer.compile(dynamic=model_cfg.shape_buckets == 0)
    n_params = sum(p.numel() for p in model.parameters())
    c = model_cfg
    print(f"{kg}\nmodel: {n_params:,} parameters, dim {c.hidden_size}, layers "
          f"{c.num_entity_layers}+{c.num_context_layers * c.use_context}, neighbours "
          f"{c.max_neighbours * c.use_context}; device {device}, threads "
          f"{torch.get_num_threads()}, batch {batch_size} triples, freed memory "
          f"{'kept' if kept else 'returned'} (hitter_core.cpu_memory)")
    print(f"data + neighbour + filter index load: {load_s:.1f} s")

    rate = matmul_rate(device)
    print(f"reference matmul (float32, 11008x320 @ 320x1280): {rate:,.0f} GFLOP/s")
    step = make_train_step(model, index, kg.train.to(device), train_cfg, batch_size, bf16,
                           args.sdpa_backend)
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 2)
    t = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    mean, best = statistics.mean(times), min(times)
    print(f"train step: mean {mean:.3f} s, median {statistics.median(times):.3f} s, "
          f"best {best:.3f} s over {args.steps} steps")
    epoch_s = mean * math.ceil(len(kg.train) / batch_size)
    print(f"throughput: {batch_size / mean:,.1f} triples/s (mean), "
          f"{batch_size / best:,.1f} triples/s (best step); {epoch_s:,.1f} s per epoch "
          f"({precision}{', compiled' if args.compile else ''}"
          f"{', standard kernels' if args.standard_kernels else ''}, SDPA "
          f"{args.sdpa_backend}; "
          f"warm-up {warmup} steps {warmup_s:.1f} s)")
    steps_per_epoch = math.ceil(len(kg.train) / batch_size)
    shape_steps = steps_per_epoch if args.shape_steps == "epoch" else int(args.shape_steps)
    count_shapes(model, index, kg.train.to(device), batch_size, shape_steps, bf16)
    seen = warmup + args.steps + shape_steps
    print(f"distinct input shapes: {shapes.count()} over {seen} batches "
          f"({seen / steps_per_epoch:.2f} epochs; model.shape_buckets={model_cfg.shape_buckets})")
    if args.profile:
        print_profile(step, device)

    # Evaluation: eval-mode scorer with the fixed neighbourhoods, filter and realistic rank.
    scorer = HittERScorer(model, index)
    if args.eval_queries:
        split, (src, rel, tgt) = "valid", split_queries(kg.valid, kg.num_relations)
        src, rel, tgt = src[: args.eval_queries], rel[: args.eval_queries], tgt[: args.eval_queries]
    else:
        split, (src, rel, tgt) = "test", split_queries(kg.test, kg.num_relations)
    test_queries = 2 * len(kg.test)
    sync(device)
    t = time.perf_counter()
    rank_queries(scorer, src, rel, tgt, filter_index, eval_batch, device, progress=False)
    sync(device)
    eval_s = time.perf_counter() - t
    how = ("measured" if not args.eval_queries
           else f"extrapolated from {len(src):,} {split} queries")
    print(f"evaluation: {len(src) / eval_s:,.0f} queries/s (batch {eval_batch}); "
          f"test split ({test_queries:,} queries) {eval_s * test_queries / len(src):.1f} s ({how})")
    print(f"peak memory: {peak_memory(device)}")
    if args.json is not None:
        figures = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "preset": args.preset, "batch_size": batch_size, "bf16": bf16,
            "precision": precision, "shape_buckets": model_cfg.shape_buckets,
            "distinct_shapes": shapes.count(), "shape_batches": seen,
            "compile": args.compile, "sdpa_backend": args.sdpa_backend, "matmul_gflops": rate,
            "step_s_mean": mean, "step_s_best": best, "triples_per_s": batch_size / mean,
            "epoch_s": epoch_s,
            "warmup_steps": warmup, "warmup_s": warmup_s, "eval_queries_per_s": len(src) / eval_s,
            "test_eval_s": eval_s * test_queries / len(src), "test_eval_how": how,
            "peak_memory": peak_memory(device),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
