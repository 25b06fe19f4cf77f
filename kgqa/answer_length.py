"""How many word pieces the answer has, guessed from the question's words: what ``kgqa.ask``
and the user setting of ``kgqa.evaluate`` lack (the benchmark gives the cloze the gold answer's
number of [MASK] tokens; a user gives none).

The model reads the question with 1 to 4 masks and every entity name is scored at its own piece
count (:class:`kgqa.ask.EntityNames`), but a model trained with the gold count is confident at
any count, so names of the wrong length win: on WebQSP filtered test the main job's link-head
model answers 35.1% of questions this way and 46.9% at the gold count (its cloze protocol:
47.9%). :class:`AnswerLengths` is the linker's naive Bayes over question words and word pairs
(:class:`kgqa.linker.TermModel`), fit on the train questions' answers as the model's tokenizer
splits them (1, 2, 3, 4, 5 = five or more pieces); each name's score gains
``LENGTH_WEIGHT * log p(its length | question)``: 38.2% for that model (80% of its protocol
accuracy kept). It guesses the length of 64% of WebQSP filtered dev and test questions; a
logistic regression on the plain QA model's own [MASK] states does no better (61-67% on dev,
61-65% on test; bench/results/user-setting/README.md).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hitter_core.data import KnowledgeGraph
from hitter_core.run_dir import write_dir_atomically
from kgqa.batches import tokenizer_fingerprint
from kgqa.linker import TermModel
from kgqa.lm import word_pieces
from kgqa.prepare import prepared_dir, qa_datasets, train_questions
from kgqa.readers.names import MAX_NAME_PIECES

logger = logging.getLogger(__name__)

# The weight of the length prior, chosen on WebQSP filtered dev (99 questions) for the main
# job's two models (plain LM with names / link head): 0: 43.4 / 35.4%, 0.25: 46.5 / 45.5%,
# 0.5: 44.4 / 44.4%, 1: 43.4 / 41.4%.
LENGTH_WEIGHT = 0.25
LONGEST = 5  # the last label: five pieces or more
LENGTHS_FORMAT = 1


class AnswerLengths:
    """p(the answer's piece count | question) (module docstring); uniform without a model."""

    def __init__(self, model: TermModel | None) -> None:
        self.model = model

    @classmethod
    def fit(cls, examples: list[Any], tokenizer: Any) -> AnswerLengths:
        """Fit on QAExamples (their question and answer name)."""
        pieces = word_pieces([ex.answer for ex in examples], tokenizer)
        return cls(TermModel.fit((ex.question, [min(len(p), LONGEST)])
                                 for ex, p in zip(examples, pieces, strict=True)))

    def log_bonus(self, question: str, weight: float = LENGTH_WEIGHT) -> dict[int, float]:
        """``weight * log p(n | question)`` for n = 1, 2, ... (none without a model; the last
        label's for every longer n)."""
        if self.model is None or not self.model.questions:
            return {}
        p = self.model.posterior(question)
        return {n: weight * math.log(max(p.get(min(n, LONGEST), 0.0), 1e-12))
                for n in range(1, MAX_NAME_PIECES + 1)}


def load_answer_lengths(data_dir: str | Path, kg: KnowledgeGraph, tokenizer: Any,
                        cache_dir: str | Path | None = None) -> AnswerLengths:
    """The length prior for ``tokenizer``: fit on the filtered train questions of both QA
    datasets the first time (:func:`kgqa.prepare.train_questions`), kept beside the prepared
    splits after, one file per tokenizer; uniform for a graph without QA data."""
    if not qa_datasets(data_dir, kg):
        return AnswerLengths(None)
    folder = (prepared_dir(data_dir, cache_dir=cache_dir, kg=kg)
              / f"answer-lengths-v{LENGTHS_FORMAT}-{tokenizer_fingerprint(tokenizer)[:16]}")
    if (folder / "lengths.json").is_file():
        state = json.loads((folder / "lengths.json").read_text(encoding="utf-8"))
        return AnswerLengths(TermModel.from_dict(state))
    examples = train_questions(data_dir, kg, cache_dir)
    logger.info("fitting the answer-length prior on %d train questions (once: kept in %s)",
                len(examples), folder)
    lengths = AnswerLengths.fit(examples, tokenizer)
    write_dir_atomically(folder, lambda tmp: (tmp / "lengths.json").write_text(
        json.dumps(lengths.model.to_dict()), encoding="utf-8"))
    return lengths
