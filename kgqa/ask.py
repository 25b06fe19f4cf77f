"""Ask a fine-tuned QA model a question, and see the knowledge-graph evidence it used.

    python -m kgqa.ask MODEL_DIR "what is the capital of somalia?" [--topic "Somalia"] \\
        [--max-masks 4] [--top-k 5] [--names] [-v]
    python -m kgqa.ask MODEL_DIR --interactive      # one question a line; "question || topic"

MODEL_DIR is a QA model saved by ``kgqa.train`` (a run's ``best/``). A user knows neither the
topic entity nor the answer's length, which the benchmark protocol hands the model:

* **The topic** (whose neighbourhood HittER encodes) is ``--topic`` (an identifier or a name of
  the graph), else the one :mod:`kgqa.linker` finds in the question (aliases, how specific the
  words are, the relations the question asks about); when it is unsure the candidates are
  printed.
* **The answer.** The question becomes the cloze ``question [MASK] ... [MASK].`` with 1 to
  ``--max-masks`` masks, all in one batch. A model that reads a KG answers with an entity of
  the graph: every entity name is scored at its own piece count by the joint log-probability of
  its pieces under the model (LM and reader) plus a prior on the answer's length from the
  question's words (:mod:`kgqa.answer_length`), and the best wins, with the triple that links
  it to the topic if there is one (:class:`EntityNames`). Free text (each mask's top piece, the
  best mean log-probability per mask over the lengths) only where no name reaches
  :data:`MIN_ENTITY_P` per piece, and then the output says so; a plain LM answers in free text,
  or with FB15K-237's names as a KG model does with ``--names`` (no topic, no fact).

The evidence is the reader's (:meth:`kgqa.readers.base.KGReader.explain`), at the answer's
length: for the copy head, its pointer weights over the topic's neighbours and its gate; for the
link head, the relations of the topic it asked HittER about, and its weight; for cross-attention
adapters, their attention from the [MASK] positions, averaged over heads, masks and adapter
layers. Data-loading notes only with ``-v``. ``python -m kgqa.evaluate user RUN_DIR`` answers a
test split this way (:mod:`kgqa.user_setting`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers

from hitter_core.cli import run_cli
from hitter_core.config import DEFAULT_KG
from hitter_core.data import KnowledgeGraph, default_data_dir, load_kg
from hitter_core.predict import AmbiguousName, find_entity
from kgqa.answer_length import AnswerLengths, load_answer_lengths
from kgqa.batches import make_batch
from kgqa.data import QAExample
from kgqa.linker import TopicLinker, load_linker
from kgqa.lm import word_pieces
from kgqa.model import KGEnhancedLM, load_qa_model
from kgqa.readers.adapters import CrossAttentionAdapter
from kgqa.readers.base import Fact

# A name's score is the joint log-probability of its pieces: on WebQSP filtered dev it beat the
# mean per piece (and sum / pieces ** .25, .5, .75) with the main job's link-head model, 43.4
# against 40.4% (99 questions; a wrong length is most errors).
MIN_ENTITY_P = 0.05  # an entity answer needs this mean probability per piece, else free text


@dataclass
class Answer:
    text: str
    masks: int
    score: float  # free text: mean log-probability per mask; an entity: its name's score
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # (text, score)
    topic: str | None = None  # "name (identifier)", or None
    evidence: list[Fact] = field(default_factory=list)  # what the reader weighed most
    gate: float | None = None  # the reader's gate (the copy head's lam, the link head's beta)
    gate_name: str | None = None
    read: str = ""  # what the evidence lists
    entity: str | None = None  # "name (identifier)" of an entity answer; None: free text
    fact: str | None = None  # a train triple linking the topic and the answer entity
    free_text: str | None = None  # why the answer is free text, when the model reads a KG


class EntityNames:
    """Every entity name of the graph as the model's word pieces, grouped by piece count, to
    score whole names at once (:meth:`best`), with the prior on the answer's length
    (:mod:`kgqa.answer_length`; none: every length alike)."""

    def __init__(self, kg: KnowledgeGraph, tokenizer: Any, max_masks: int,
                 lengths: AnswerLengths | None = None) -> None:
        pieces = word_pieces(kg.entity_names, tokenizer)
        self.kg = kg
        self.lengths = lengths or AnswerLengths(None)
        self.degree = torch.bincount(kg.train[:, [0, 2]].flatten(), minlength=kg.num_entities)
        self.pieces = pieces
        self.by_length = {}  # n -> ((C_n,) entity ids, (C_n, n) their pieces)
        for n in range(1, max_masks + 1):
            ids = [e for e, p in enumerate(pieces) if len(p) == n]
            if ids:
                self.by_length[n] = (torch.tensor(ids), torch.tensor([pieces[e] for e in ids]))

    def best(self, log_probs: dict[int, torch.Tensor], topic: int, k: int, question: str = ""
             ) -> list[tuple[int, float, float]]:
        """The ``k`` best (entity, joint log-probability of its name, score) under
        ``log_probs[n]`` (n, V), the model's output with n masks; the score, which ranks them,
        adds the length prior's bonus for ``question``; names spelt alike: the one linked to
        the topic, else the one with the most train triples."""
        bonus = self.lengths.log_bonus(question)
        scored = []  # (entity, joint log-probability, rank score)
        for n, logp in log_probs.items():
            if n not in self.by_length:
                continue
            ids, pieces = self.by_length[n]
            score = logp.gather(1, pieces.T).sum(0)  # (C_n,)
            top = score.topk(min(4 * k, len(ids)))
            scored += [(int(ids[i]), float(v), float(v) + bonus.get(n, 0.0))
                       for v, i in zip(top.values, top.indices, strict=True)]
        linked = set(self.neighbours(topic)) if topic >= 0 else set()
        scored.sort(key=lambda c: (-round(c[2], 5), c[0] not in linked, -int(self.degree[c[0]])))
        out, names = [], set()
        for e, v, score in scored:
            if self.kg.entity_names[e].casefold() not in names:
                names.add(self.kg.entity_names[e].casefold())
                out.append((e, v, score))
        return out[:k]

    def neighbours(self, entity: int) -> list[int]:
        h, t = self.kg.train[:, 0], self.kg.train[:, 2]
        return torch.cat([t[h == entity], h[t == entity]]).tolist()

    def fact(self, topic: int, answer: int) -> str | None:
        """A train triple between ``topic`` and ``answer`` (either direction), as names."""
        h, r, t = self.kg.train.T
        hit = ((h == topic) & (t == answer)) | ((h == answer) & (t == topic))
        if topic < 0 or not bool(hit.any()):
            return None
        a, rel, b = self.kg.train[hit.nonzero()[0, 0]].tolist()
        names = self.kg.entity_names
        return f"({names[a]}, {self.kg.relations[rel]}, {names[b]})"


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
        topic: int = -1, max_masks: int = 4, top_k: int = 5,
        names: EntityNames | None = None, min_entity_p: float = MIN_ENTITY_P) -> Answer:
    """The model's answer to ``question`` about ``topic`` (an entity id, -1: none), with
    alternatives and evidence (module docstring); with ``names``, an entity of the graph."""
    masks = [" ".join([tokenizer.mask_token] * n) for n in range(1, max_masks + 1)]
    examples = [QAExample("ask", question, topic if topic >= 0 else None, m, None)
                for m in masks]  # the n-th "answer": n mask tokens, so n masks in the cloze
    batch = make_batch(examples, tokenizer, neighbours, model.config.max_neighbours)
    batch.pop("labels")
    out, weights = run_with_attention(model, batch)
    logp = out.log_probs.float().split(torch.bincount(out.rows).tolist())  # n-th: (n, V)
    greedy = [lp.max(-1) for lp in logp]  # per length: (n,) best log-prob and piece
    decode = tokenizer.decode
    texts = [(decode(g.indices), g.values.mean().item(), n + 1) for n, g in enumerate(greedy)]
    text, score, n = max(texts, key=lambda t: t[1])
    answer = Answer(text, n, score)
    if names is not None:
        ranked = names.best({n + 1: lp for n, lp in enumerate(logp)}, topic, top_k + 1, question)
        e, v, _ = ranked[0] if ranked else (-1, 0.0, 0.0)
        if ranked and v / len(names.pieces[e]) >= math.log(min_entity_p):
            answer = Answer(names.kg.entity_names[e].casefold(), len(names.pieces[e]), v,
                            entity=f"{names.kg.entity_names[e]} ({names.kg.entities[e]})",
                            fact=names.fact(topic, e))
            answer.alternatives = [(f"{names.kg.entity_names[a]}", score)
                                   for a, _, score in ranked[1:]]  # as ranked
        else:
            answer.free_text = (f"no entity name reaches p {min_entity_p} per piece"
                                if ranked else "no entity name has at most "
                                f"{max_masks} pieces")
    if not answer.alternatives:
        seen = {answer.text}
        top = logp[0][0].topk(top_k + 1)  # the top pieces at one mask
        for alt, value in [(t, v) for t, v, m in texts if m != n] + [
                (decode([i]), v) for v, i in zip(top.values.tolist(), top.indices.tolist(),
                                                 strict=True)]:
            if alt not in seen:
                seen.add(alt)
                answer.alternatives.append((alt, value))
    if topic < 0 or kg is None or model.hitter is None:
        return answer
    answer.topic = f"{kg.entity_names[topic]} ({kg.entities[topic]})"
    row = answer.masks - 1  # the evidence of the answer's own length
    one = {k: v[row : row + 1] for k, v in batch.items()}
    if weights is not None:  # (B, L, T) -> (T,): the adapters' attention from the masks
        weights = weights[row][one["input_ids"][0] == model.mask_token_id].mean(0)
    evidence = {k: v[row : row + 1] for k, v in (out.kg_evidence or {}).items()}
    explained = model.head.explain(evidence, one, kg, top_k, adapter_weights=weights)
    if explained is not None:
        answer.read, answer.evidence = explained.read, explained.facts
        answer.gate, answer.gate_name = explained.gate, explained.gate_name
    return answer


def format_answer(answer: Answer) -> str:
    if answer.entity is not None:
        p = math.exp(answer.score)
        lines = [f"answer: {answer.entity}   ({answer.masks} piece(s), p {p:.2f})"]
        if answer.fact:
            lines.append(f"fact: {answer.fact}")
    else:
        note = f"; free text: {answer.free_text}" if answer.free_text else ""
        lines = [f"answer: {answer.text}   ({answer.masks} mask(s), mean log-prob "
                 f"{answer.score:.2f}, p {math.exp(answer.score):.2f} per mask{note})"]
    if answer.alternatives:
        how = " (log p of the name + the length prior)" if answer.entity is not None else ""
        lines.append(f"alternatives{how}: " + "; ".join(f"{t} ({s:.2f})"
                                                        for t, s in answer.alternatives))
    lines.append(f"topic entity: {answer.topic or 'none (the plain LM answers)'}")
    if answer.evidence:
        gate = "" if answer.gate is None else f" ({answer.gate_name} {answer.gate:.2f})"
        lines.append(f"KG evidence{gate}: {answer.read}")
        lines += [f"  {e.weight:.3f}  {e.fact}" for e in answer.evidence]
    return "\n".join(lines)


def load_for_asking(model_dir: str | Path, data_dir: Path | None, max_masks: int,
                    names: bool = False) -> tuple[KGEnhancedLM, Any, Any, KnowledgeGraph | None,
                                                  TopicLinker | None, EntityNames | None]:
    """The model, tokenizer and neighbour index; for a model that reads a KG, the graph, its
    topic linker and its entity names; for one that reads none, FB15K-237's entity names only
    with ``names``. A directory that is not a saved model: one line."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        hint = next((str(p.parent) for p in sorted(model_dir.glob("**/best/config.json"))), None)
        raise FileNotFoundError(f"{model_dir}: not a QA model directory (no config.json); "
                                + (f"pass {hint}" if hint else "pass a run's best/ directory"
                                   " (e.g. runs/.../seed333/best)"))
    datasets.disable_progress_bars()  # one-question datasets: no bars
    model, tokenizer, neighbours = load_qa_model(model_dir, data_dir)
    data_dir = data_dir or default_data_dir()
    if model.config.kg_config is None and not names:
        return model, tokenizer, neighbours, None, None, None
    graph = load_kg(data_dir / (model.config.kg_config or {}).get("dataset", DEFAULT_KG))
    entity_names = EntityNames(graph, tokenizer, max_masks,
                               load_answer_lengths(data_dir, graph, tokenizer))
    if model.config.kg_config is None:  # the plain LM, ranking the graph's names
        return model, tokenizer, neighbours, None, None, entity_names
    return model, tokenizer, neighbours, graph, load_linker(data_dir, graph), entity_names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kgqa.ask",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a QA model directory (a run's best/)")
    parser.add_argument("question", nargs="?", help="the question (or --interactive)")
    parser.add_argument("--topic", help="topic entity: identifier or name (default: linked)")
    parser.add_argument("--max-masks", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--interactive", action="store_true",
                        help='read questions from stdin, one a line ("question || topic")')
    parser.add_argument("--names", action="store_true",
                        help="a model that reads no KG answers with FB15K-237's entity names too "
                             "(a KG model always does)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data root (default $KGQA_DATA_DIR)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show data-loading notes")
    args = parser.parse_args(argv)
    if not args.interactive and not args.question:
        parser.error("give a question, or --interactive")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    model, tokenizer, neighbours, kg, linker, names = load_for_asking(
        args.model_dir, args.data_dir, args.max_masks, args.names)

    def answer_one(question: str, topic_text: str | None) -> None:
        topic = -1
        if kg is not None and topic_text:
            topic = find_entity(kg, topic_text)
        elif linker is not None:
            link = linker.link(question)
            topic = link.entity
            if link.ambiguous:
                print("topic candidates: " + "; ".join(
                    f"{kg.entity_names[e]} ({kg.entities[e]}) {p:.2f}"
                    for e, p, _ in link.candidates) + ' (name one with "|| topic")')
        print(format_answer(ask(model, tokenizer, kg, neighbours, question, topic,
                                args.max_masks, args.top_k, names)), flush=True)

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
