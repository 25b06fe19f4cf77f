"""Topic linking: which entity of the graph a question is about (``kgqa.ask``, the user
setting of ``kgqa.evaluate``). The benchmark hands the model its annotated topic; a user does not.

* **Aliases** (:meth:`AliasTable.build`): each entity's name, its Wikidata label and alternative
  names (``entity2wikidata.json``) and Freebase name (``FB15k_mid2name.txt``) where the graph's
  directory has them, and derived forms (without a parenthesised part, before a comma, the
  last and the first word of a longer name), each with its kind (:data:`KINDS`). Text is
  compared normalised (:func:`normalise`: casefolded, "&" -> "and", punctuation a space; an
  alias also without its punctuation, so "L.A." matches "LA").
* **Mentions**: every span of at most :data:`MAX_NAME_WORDS` words of the question that is an
  alias; each entity keeps its best span (not inside a longer mention, longest, best kind).
* **Relations** (:class:`TermModel`): a multinomial naive Bayes over the question's words
  and word pairs says which relation links the topic to the answer (ids in [0, 2R), r >= R the
  reciprocal); an entity's relation score is the posterior mass on the relations it has. This is
  what tells "Who directed The Fisher King?" (a film's relation) from a person's name in it.
* **Score**: a linear model over :data:`FEATURES` of each candidate, trained by softmax
  cross-entropy over every train question's candidates. The relation features of the train
  questions come from naive Bayes models fit on the other folds, so that the scorer does not
  learn to trust a posterior that has seen its own question.

:func:`load_linker` fits it once per data directory on the filtered train splits of both QA
datasets (never dev or test) and keeps it beside the prepared splits.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hitter_core.data import KnowledgeGraph
from hitter_core.run_dir import write_dir_atomically

logger = logging.getLogger(__name__)

MAX_NAME_WORDS = 8  # longest alias looked for in a question
KINDS = ("name", "given alias", "derived", "last word", "first word")
FEATURES = (
    "words", "capitalised", "min idf", "mean idf", "inside a longer mention", "entities sharing",
    "log degree", "top degree of the alias", "log relation mass", "relation mass", "at the start",
    "quoted", *(f"kind: {k}" for k in KINDS), "specific words", "whole question",
    "log top relation", "position", "end position", "log relation count",
    "relation mass / best", "best relation mass",
)
FOLDS = 5
LINKER_FORMAT = 1  # bump when the fitted file changes


def normalise(text: str, keep_gaps: bool = True) -> str:
    """Casefolded words; "&" -> "and"; punctuation a space (``keep_gaps``) or dropped."""
    text = text.casefold().replace("&", " and ")
    text = re.sub(r"[^\w\s]", " " if keep_gaps else "", text)
    return " ".join(text.split())


# ----------------------------------------------------------------------------- aliases


class AliasTable:
    """Normalised alias -> {entity id: kind (index into :data:`KINDS`, lower is better)}."""

    def __init__(self) -> None:
        self.entities: dict[str, dict[int, int]] = {}

    def add(self, alias: str, entity: int, kind: int) -> None:
        forms = {normalise(alias), normalise(alias, keep_gaps=False)}
        for form in list(forms):
            if form.startswith("the ") and len(form) > 4:
                forms.add(form[4:])
        for form in forms - {""}:
            known = self.entities.setdefault(form, {})
            if kind < known.get(entity, len(KINDS)):
                known[entity] = kind

    @classmethod
    def build(cls, kg: KnowledgeGraph) -> AliasTable:
        """Aliases of every entity of ``kg`` from its names and its directory's name files."""
        table, kg_dir = cls(), Path(kg.directory)
        ids = {mid: i for i, mid in enumerate(kg.entities)}
        for i, name in enumerate(kg.entity_names):
            table.add(name, i, 0)
            base = re.sub(r"\s*\(.*?\)", "", name)
            if base != name:
                table.add(base, i, 2)
            if "," in base:
                table.add(base.split(",")[0], i, 2)
            words = normalise(base).split()
            if len(words) >= 2:
                table.add(words[-1], i, 3)
                table.add(words[0], i, 4)
        wikidata = kg_dir / "entity2wikidata.json"
        if wikidata.is_file():
            for mid, entry in json.loads(wikidata.read_text(encoding="utf-8")).items():
                if mid in ids:
                    for alias in [entry.get("label") or ""] + list(entry.get("alternatives") or []):
                        table.add(alias, ids[mid], 1)
        freebase = kg_dir / "FB15k_mid2name.txt"
        if freebase.is_file():
            for line in freebase.read_text(encoding="utf-8").splitlines():
                mid, _, name = line.partition("\t")
                if mid in ids:
                    table.add(name.replace("_", " "), ids[mid], 1)
        return table


@dataclass
class Mention:
    entity: int
    start: int  # word index in the normalised question
    words: int
    alias: str
    kind: int
    inside: bool  # inside a longer mention


def mentions(question: str, aliases: AliasTable) -> list[Mention]:
    """Every entity named in ``question``, with its best span (module docstring)."""
    words = normalise(question).split()
    spans = [(i, n, " ".join(words[i : i + n]))
             for n in range(1, min(MAX_NAME_WORDS, len(words)) + 1)
             for i in range(len(words) - n + 1)]
    spans = [s for s in spans if s[2] in aliases.entities]
    best: dict[int, Mention] = {}
    for i, n, alias in spans:
        inside = any(j <= i and i + n <= j + m and m > n for j, m, _ in spans)
        for e, kind in aliases.entities[alias].items():
            m, old = Mention(e, i, n, alias, kind, inside), best.get(e)
            if old is None or (not inside, n, -kind) > (not old.inside, old.words, -old.kind):
                best[e] = m
    return list(best.values())


# ----------------------------------------------------------------------------- relations


def question_terms(question: str) -> list[str]:
    words = normalise(question).split()
    return words + [f"{a}_{b}" for a, b in zip(words, words[1:], strict=False)]


def topic_relations(kg: KnowledgeGraph
                    ) -> tuple[dict[int, set[int]], dict[tuple[int, int], set[int]]]:
    """Each entity's relations in the train graph and the relations of each linked pair
    (both directions; ids in [0, 2R), r >= R read from the tail)."""
    R = kg.num_relations
    of: dict[int, set[int]] = collections.defaultdict(set)
    pair: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
    for h, r, t in kg.train.tolist():
        of[h].add(r)
        of[t].add(r + R)
        pair[h, t].add(r)
        pair[t, h].add(r + R)
    return of, pair


class TermModel:
    """Multinomial naive Bayes: question terms -> labels (here the relation from the topic to
    the answer; :mod:`kgqa.answer_length`: the answer's length)."""

    SMOOTHING = 0.1

    def __init__(self, counts: dict[int, dict[str, int]]) -> None:
        self.counts = counts  # label -> term -> count, over the questions with that label
        self.totals = {r: sum(c.values()) for r, c in counts.items()}
        self.vocab = {t for c in counts.values() for t in c}
        self.questions: dict[int, int] = {}  # label -> train questions (the prior)

    @classmethod
    def fit(cls, labelled: Iterable[tuple[str, Iterable[int]]]) -> TermModel:
        """Fit on (question, its labels) pairs."""
        counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        questions: collections.Counter = collections.Counter()
        for question, labels in labelled:
            for label in labels:
                questions[label] += 1
                counts[label].update(question_terms(question))
        model = cls({r: dict(c) for r, c in counts.items()})
        model.questions = dict(questions)
        return model

    def to_dict(self) -> dict[str, Any]:
        return {"counts": {str(r): c for r, c in self.counts.items()},
                "questions": {str(r): n for r, n in self.questions.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TermModel:
        model = cls({int(r): c for r, c in d["counts"].items()})
        model.questions = {int(r): n for r, n in d["questions"].items()}
        return model

    def posterior(self, question: str) -> dict[int, float]:
        """p(label | question) over the labels seen in training."""
        terms = [t for t in question_terms(question) if t in self.vocab]
        V, a = len(self.vocab), self.SMOOTHING
        scores = {r: math.log(self.questions[r]) + sum(
            math.log((c.get(t, 0) + a) / (self.totals[r] + a * V)) for t in terms)
            for r, c in self.counts.items()}
        top = max(scores.values(), default=0.0)
        p = {r: math.exp(s - top) for r, s in scores.items()}
        z = sum(p.values())
        return {r: v / z for r, v in p.items()}


# ----------------------------------------------------------------------------- the linker


@dataclass
class Link:
    """The linked topic (-1: no entity named) and the candidates, best first, with p(topic)."""

    entity: int
    candidates: list[tuple[int, float, Mention]]

    @property
    def ambiguous(self) -> bool:
        return len(self.candidates) > 1 and self.candidates[0][1] < 0.5


class TopicLinker:
    """Aliases, word statistics, the relation model and the scorer's weights (module docstring)."""

    def __init__(self, kg: KnowledgeGraph, aliases: AliasTable, state: dict[str, Any]) -> None:
        self.aliases = aliases
        self.relations_of, self.pair_relations = topic_relations(kg)
        self.degree = torch.bincount(kg.train[:, [0, 2]].flatten(),
                                     minlength=kg.num_entities).tolist()  # train triples
        self.state = state  # what fit learned: word counts, relation model, weights
        self.doc_freq: dict[str, int] = state["doc_freq"]
        self.relation_model = TermModel.from_dict(state["relations"])
        self.weights = torch.tensor(state["weights"])  # (F,) over standardised features
        self.mean, self.std = torch.tensor(state["mean"]), torch.tensor(state["std"])

    def idf(self, word: str) -> float:
        n = self.state["questions"]
        return math.log((n + 1) / (self.doc_freq.get(word, 0) + 1))

    def features(self, question: str, posterior: dict[int, float]
                 ) -> tuple[list[Mention], torch.Tensor]:
        """The candidates of ``question`` and their raw features (C, F) (:data:`FEATURES`)."""
        # An entity without train triples has no neighbourhood for HittER to read: never a topic.
        found = [m for m in mentions(question, self.aliases) if self.degree[m.entity] > 0]
        words = normalise(question).split()
        caps = [any(c.isupper() for c in w)
                for w in re.sub(r"[^\w\s]", " ", question.replace("&", " and ")).split()]
        if len(caps) != len(words):
            caps = [False] * len(words)
        quoted = {normalise(q) for q in re.findall(r"['`\"‘“]([^'`\"’”]+)['\"’”]", question)}
        rows = []
        for m in found:
            span = words[m.start : m.start + m.words]
            idf = [self.idf(w) for w in span]
            rels = self.relations_of.get(m.entity, ())
            mass = sum(posterior.get(r, 0.0) for r in rels)
            top = max((posterior.get(r, 0.0) for r in rels), default=0.0)
            sharing = self.aliases.entities[m.alias]
            degree = self.degree[m.entity]
            rows.append([
                m.words, sum(caps[m.start : m.start + m.words]) / m.words, min(idf),
                sum(idf) / m.words, float(m.inside), math.log(1 + len(sharing)),
                math.log1p(degree), float(degree == max(self.degree[e] for e in sharing)),
                math.log(mass + 1e-3), mass, float(m.start == 0), float(m.alias in quoted),
                *(float(m.kind == k) for k in range(len(KINDS))), float(min(idf) > 2),
                float(m.words == len(words)), math.log(top + 1e-3),
                m.start / max(len(words) - 1, 1), (m.start + m.words) / len(words),
                math.log1p(len(rels)), 0.0, 0.0])
        x = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(FEATURES))
        if len(rows):  # the last two features compare each candidate's mass with the best's
            mass = x[:, FEATURES.index("relation mass")]
            x[:, -2] = mass / mass.max() if mass.max() > 0 else 0.0
            x[mass.argmax(), -1] = 1.0
        return found, x

    def link(self, question: str, top_k: int = 5) -> Link:
        found, x = self.features(question, self.relation_model.posterior(question))
        if not found:
            return Link(-1, [])
        p = torch.softmax(((x - self.mean) / self.std) @ self.weights, 0)  # (C,)
        order = p.argsort(descending=True)[:top_k].tolist()
        return Link(found[order[0]].entity, [(found[i].entity, float(p[i]), found[i])
                                              for i in order])

    @classmethod
    def fit(cls, kg: KnowledgeGraph, aliases: AliasTable, examples: Sequence[Any],
            folds: int = FOLDS) -> TopicLinker:
        """Fit on ``examples`` (QAExamples with topic and answer entities: train questions)."""
        pair = topic_relations(kg)[1]

        def relations(part: Iterable[Any]) -> TermModel:  # question -> topic-answer relations
            return TermModel.fit((ex.question, pair.get((ex.topic_entity, ex.answer_entity), ()))
                                 for ex in part)

        doc_freq = collections.Counter(w for ex in examples
                                       for w in set(normalise(ex.question).split()))
        state = {"format": LINKER_FORMAT, "questions": len(examples), "doc_freq": dict(doc_freq),
                 "relations": relations(examples).to_dict(),
                 "weights": [0.0] * len(FEATURES), "mean": [0.0] * len(FEATURES),
                 "std": [1.0] * len(FEATURES)}
        linker = cls(kg, aliases, state)
        held_out = [relations(ex for i, ex in enumerate(examples) if i % folds != k)
                    for k in range(folds)]
        groups = []  # (features (C, F), index of the annotated topic)
        for i, ex in enumerate(examples):
            found, x = linker.features(ex.question, held_out[i % folds].posterior(ex.question))
            gold = [j for j, m in enumerate(found) if m.entity == ex.topic_entity]
            if gold:
                groups.append((x, gold[0]))
        allx = torch.cat([x for x, _ in groups])
        mean, std = allx.mean(0), allx.std(0) + 1e-6
        K = max(len(x) for x, _ in groups)
        X = torch.zeros(len(groups), K, len(FEATURES))  # (Q, K, F) padded candidates
        pad = torch.ones(len(groups), K, dtype=torch.bool)
        for q, (x, _) in enumerate(groups):
            X[q, : len(x)], pad[q, : len(x)] = (x - mean) / std, False
        gold = torch.tensor([g for _, g in groups])
        w = torch.zeros(len(FEATURES), requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy((X @ w).masked_fill(pad, -1e9), gold)
            loss = loss + 1e-4 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        logger.info("topic linker fit on %d questions (%d with the topic among the candidates)",
                    len(examples), len(groups))
        state.update(weights=w.detach().tolist(), mean=mean.tolist(), std=std.tolist())
        return cls(kg, aliases, state)

    @classmethod
    def by_names(cls, kg: KnowledgeGraph, aliases: AliasTable) -> TopicLinker:
        """Without train questions: the longest mention not inside another, a name before an
        alias, then the entity with the most relations."""
        weights = dict.fromkeys(FEATURES, 0.0) | {
            "words": 4.0, "inside a longer mention": -8.0, "kind: name": 2.0, "log degree": 0.5}
        state = {"format": LINKER_FORMAT, "questions": 0, "doc_freq": {},
                 "relations": {"counts": {}, "questions": {}},
                 "weights": list(weights.values()), "mean": [0.0] * len(FEATURES),
                 "std": [1.0] * len(FEATURES)}
        return cls(kg, aliases, state)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.state), encoding="utf-8")

    @classmethod
    def load(cls, kg: KnowledgeGraph, aliases: AliasTable, path: str | Path) -> TopicLinker:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
        if state.get("format") != LINKER_FORMAT:
            raise ValueError(f"{path}: a topic linker of another version")
        return cls(kg, aliases, state)


def load_linker(data_dir: str | Path, kg: KnowledgeGraph, cache_dir: str | Path | None = None
                ) -> TopicLinker:
    """The topic linker of ``kg``: for FB15K-237 (whose ids the QA data use), fit on the
    filtered train questions of both QA datasets under ``data_dir`` the first time and kept
    beside the prepared splits (:func:`kgqa.prepare.prepared_dir`) after; for another graph, or
    without QA data, :meth:`TopicLinker.by_names`."""
    from kgqa.prepare import prepared_dir, qa_datasets, train_questions

    aliases = AliasTable.build(kg)
    if not qa_datasets(data_dir, kg):
        logger.info("no QA train questions for %s: topics linked by name only", kg.name)
        return TopicLinker.by_names(kg, aliases)
    folder = prepared_dir(data_dir, cache_dir=cache_dir, kg=kg) / f"linker-v{LINKER_FORMAT}"
    if (folder / "linker.json").is_file():
        return TopicLinker.load(kg, aliases, folder / "linker.json")
    examples = train_questions(data_dir, kg, cache_dir)
    logger.info("fitting the topic linker on %d train questions (once: kept in %s)",
                len(examples), folder)
    linker = TopicLinker.fit(kg, aliases, examples)
    write_dir_atomically(folder, lambda tmp: linker.save(tmp / "linker.json"))
    return linker

