"""Ask a fine-tuned QA model a question, and see the knowledge-graph evidence it used.

    python -m kgqa.ask MODEL_DIR "who was vice president after kennedy died?" \\
        [--topic "John F. Kennedy"] [--max-masks 4] [--top-k 5]
    python -m kgqa.ask MODEL_DIR --interactive      # one question a line; "question || topic"

MODEL_DIR is a QA model saved by ``kgqa.train`` (its ``best/``). The question becomes the cloze
``question [MASK] ... [MASK].`` as in training; a user does not know the answer's length, so
every number of [MASK] tokens from 1 to ``--max-masks`` is tried, each read greedily (the top
word piece at every mask), and the answer with the highest **mean log-probability per mask**
wins (a plain sum would favour one-piece answers). The other lengths' answers are printed as
alternatives, with the top pieces of a one-mask answer.

The topic entity (whose neighbourhood HittER encodes) is ``--topic`` (an identifier or a name of
the graph), else the longest entity name found in the question (case-insensitive word match;
several entities of that name: the one with the most neighbours), and the output says which
entity was used. The evidence is the reader's (:meth:`kgqa.readers.base.KGReader.explain`): for
the copy head, its pointer weights over the topic's neighbours and its gate; for the link head,
the relations of the topic it asked HittER about, and its weight; for cross-attention adapters,
their attention from the [MASK] positions, averaged over heads, masks and adapter layers. A
model without HittER has no evidence to show.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

from hitter_core.cli import run_cli
from hitter_core.data import KnowledgeGraph, default_data_dir, load_kg
from hitter_core.predict import AmbiguousName, find_entity
from kgqa.batches import make_batch
from kgqa.data import QAExample
from kgqa.model import KGEnhancedLM, load_qa_model
from kgqa.readers.adapters import CrossAttentionAdapter
from kgqa.readers.base import Fact

MAX_NAME_WORDS = 8  # longest entity name looked for in a question


@dataclass
class Answer:
    text: str
    masks: int
    score: float  # mean log-probability per mask
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # (text, score)
    topic: str | None = None  # "name (identifier)", or None
    evidence: list[Fact] = field(default_factory=list)  # what the reader weighed most
    gate: float | None = None  # the reader's gate (the copy head's lam, the link head's beta)
    gate_name: str | None = None
    read: str = ""  # what the evidence lists


def link_topic(question: str, kg: KnowledgeGraph, degrees: torch.Tensor | None = None) -> int:
    """The entity whose name is the longest word sequence of ``question`` (case-insensitive;
    longest in words, then in letters: generic words are short); entities of one name go to
    the one with the most neighbours. -1: none. A simple linker: ``--topic`` overrides it."""
    words = re.findall(r"[\w'.&-]+", question.casefold())
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(kg.entity_names):
        by_name.setdefault(name.casefold(), []).append(i)
    for n in range(min(MAX_NAME_WORDS, len(words)), 0, -1):
        spans = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        found = sorted((s for s in spans if s in by_name), key=len, reverse=True)
        if found:
            ids = by_name[found[0]]
            return max(ids, key=lambda e: int(degrees[e]) if degrees is not None else 0)
    return -1


def run_with_attention(model: KGEnhancedLM, batch: dict) -> tuple[Any, torch.Tensor | None]:
    """``model(**batch)`` and the adapters' attention (B, L, T) averaged over heads and adapter
    layers (None without adapters), from their inputs captured by forward hooks."""
    captured = []
    hooks = [m.register_forward_hook(lambda mod, args, out: captured.append((mod, args)))
             for m in model.modules() if isinstance(m, CrossAttentionAdapter)]
    try:
        out = model(**batch)
    finally:
        for h in hooks:
            h.remove()
    if not captured:
        return out, None
    return out, torch.stack([m.attention_weights(*a).mean(1) for m, a in captured]).mean(0)


@torch.no_grad()
def ask(model: KGEnhancedLM, tokenizer, kg: KnowledgeGraph | None, neighbours, question: str,
        topic: int = -1, max_masks: int = 4, top_k: int = 5) -> Answer:
    """The model's answer to ``question`` about ``topic`` (an entity id, -1: none), with
    alternatives and evidence (module docstring)."""
    tried = []
    for n in range(1, max_masks + 1):
        example = QAExample("ask", question, topic if topic >= 0 else None, " ".join(["a"] * n),
                            None)  # the answer only sets the number of masks
        batch = make_batch([example], tokenizer, neighbours, model.config.max_neighbours)
        batch.pop("labels")
        out, weights = run_with_attention(model, batch)
        logp = out.log_probs.float()  # (n, V)
        best, pieces = logp.max(-1)  # (n,)
        tried.append((best.mean().item(), n, pieces, logp, out, batch, weights))
    score, n, pieces, logp, out, batch, weights = max(tried, key=lambda t: t[0])
    decode = tokenizer.decode
    answer = Answer(decode(pieces), n, score)
    top = tried[0][3][0].topk(top_k + 1)  # the top pieces at one mask
    seen = {answer.text}
    for text, value in [(decode(p), s) for s, m, p, *_ in tried if m != n] + [
            (decode([i]), v) for v, i in zip(top.values.tolist(), top.indices.tolist(),
                                             strict=True)]:
        if text not in seen:
            seen.add(text)
            answer.alternatives.append((text, value))
    if topic < 0 or kg is None or model.hitter is None:
        return answer
    answer.topic = f"{kg.entity_names[topic]} ({kg.entities[topic]})"
    if weights is not None:  # (1, L, T) -> (T,): the adapters' attention from the masks
        weights = weights[0][batch["input_ids"][0] == model.mask_token_id].mean(0)
    explained = model.head.explain(out.kg_evidence or {}, batch, kg, top_k,
                                   adapter_weights=weights)
    if explained is not None:
        answer.read, answer.evidence = explained.read, explained.facts
        answer.gate, answer.gate_name = explained.gate, explained.gate_name
    return answer


def format_answer(answer: Answer) -> str:
    lines = [f"answer: {answer.text}   ({answer.masks} mask(s), mean log-prob "
             f"{answer.score:.2f}, p {math.exp(answer.score):.2f} per mask)"]
    if answer.alternatives:
        lines.append("alternatives: " + "; ".join(f"{t} ({s:.2f})"
                                                  for t, s in answer.alternatives))
    lines.append(f"topic entity: {answer.topic or 'none (the plain LM answers)'}")
    if answer.evidence:
        gate = "" if answer.gate is None else f" ({answer.gate_name} {answer.gate:.2f})"
        lines.append(f"KG evidence{gate}: {answer.read}")
        lines += [f"  {e.weight:.3f}  {e.fact}" for e in answer.evidence]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kgqa.ask",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a QA model directory (kgqa.train's best/)")
    parser.add_argument("question", nargs="?", help="the question (or --interactive)")
    parser.add_argument("--topic", help="topic entity: identifier or name (default: linked)")
    parser.add_argument("--max-masks", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--interactive", action="store_true",
                        help='read questions from stdin, one a line ("question || topic")')
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data root (default $KGQA_DATA_DIR)")
    args = parser.parse_args(argv)
    if not args.interactive and not args.question:
        parser.error("give a question, or --interactive")
    if not (Path(args.model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{args.model_dir}: not a QA model directory (no config.json)")
    datasets.disable_progress_bars()  # one-question datasets: no bars
    model, tokenizer, neighbours = load_qa_model(args.model_dir, args.data_dir)
    kg = None
    if model.config.kg_config is not None:
        kg = load_kg((args.data_dir or default_data_dir()) / model.config.kg_config["dataset"])

    def answer_one(question: str, topic_text: str | None) -> None:
        topic = -1
        if kg is not None:
            topic = find_entity(kg, topic_text) if topic_text else link_topic(
                question, kg, neighbours.degrees() if neighbours is not None else None)
        print(format_answer(ask(model, tokenizer, kg, neighbours, question, topic,
                                args.max_masks, args.top_k)), flush=True)

    if not args.interactive:
        answer_one(args.question, args.topic)
        return 0
    print("one question a line (\"question || topic\" names the topic); Ctrl-D ends",
          file=sys.stderr)
    for line in sys.stdin:
        question, _, topic_text = line.strip().partition("||")
        if question.strip():
            try:
                answer_one(question.strip(), topic_text.strip() or None)
            except AmbiguousName as e:
                print(f"error: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, user_errors=(AmbiguousName,)))
