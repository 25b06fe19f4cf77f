"""Factoid-QA sources -> one example schema (paper section 4, "Factoid QA Experiments").

Four input formats, one output record (:class:`QAExample`: question id, question text, topic
entity, relation id, answer name, answer entity):

* WebQSP v1.0 (``WebQSP.{train,test}.json``), FreebaseQA as released
  (``FreebaseQA-{train,dev,eval}.json``) and the FreebaseQA pre-release ``.tab`` files are read
  into :class:`Question` records (text + semantic parses in file order);
  :func:`select_examples` then turns each question into at most one example with HittER's rule.
* HittER's released files (``hitter_format/relphormer[-filtered]/*.json``) already hold one
  example per question; :func:`read_hitter_json` reads them.

The selection rule (``../shared/design/REFERENCE.md``; it reproduces HittER's released WebQSP
files question by question): walk the parses in order; the first parse whose topic MID and
whose **first** answer MID are both in the KG gives topic and answer. If there is none, the
**last** parse does (HittER's loop simply ended there) and its topic / answer entity are kept
only where they are in the KG. The answer name is that answer's name; a question without one
(no parse, no answer, an empty or missing name, e.g. WebQSP "Value" answers) is dropped and
counted. The filtered split is then exactly the examples whose topic and answer are both in the
KG. The relation id is 0 for every example, as in the released data (a dummy: the question's
own relation is not given to HittER).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hitter_core.data import DataFormatError

logger = logging.getLogger(__name__)

DUMMY_RELATION = 0  # the released data give relation 0 to every question (REFERENCE.md)
HITTER_PLACEHOLDER_ID = 14540  # HittER's "not in FB15K-237" id (also the real entity /m/0q96)
# Known errors in HittER's released files: (file question id, question text) -> true id.
HITTER_ERRATA = {("WebQTest-0", "where did djokovic come from?"): "WebQTest-600"}

_MID = re.compile(r"^[mg]\.[0-9a-z_]+$")  # Freebase ids as written in WebQSP / FreebaseQA


@dataclass(frozen=True)
class Answer:
    mid: str | None  # Freebase MID as written in the source ("m.0abc"); None for literal values
    name: str | None


@dataclass(frozen=True)
class Parse:
    topic_mid: str | None
    answers: tuple[Answer, ...]


@dataclass(frozen=True)
class Question:
    question_id: str
    text: str
    parses: tuple[Parse, ...]


@dataclass(frozen=True)
class QAExample:
    """One question in the common schema. Entity ids index the KG vocabulary (LibKGE order)."""

    question_id: str
    question: str
    topic_entity: int | None  # None: the topic is not in the KG (no KG input)
    answer: str  # answer name; the cloze labels are its word pieces
    answer_entity: int | None  # None: the answer is not in the KG
    relation: int = DUMMY_RELATION

    @property
    def in_graph(self) -> bool:
        """Member of the filtered split: topic and answer both in the KG."""
        return self.topic_entity is not None and self.answer_entity is not None


@dataclass
class Selection:
    """Examples kept from one file and the questions dropped, by reason (ids in file order)."""

    source: str
    num_questions: int
    examples: list[QAExample]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, question_id: str) -> None:
        self.skipped.setdefault(reason, []).append(question_id)

    def log_skips(self) -> None:
        for reason, ids in self.skipped.items():
            shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
            logger.warning(
                "%s: dropped %d questions (%s): %s", self.source, len(ids), reason, shown
            )


def kg_mid(mid: str | None) -> str | None:
    """``m.0abc`` (WebQSP / FreebaseQA spelling) -> ``/m/0abc`` (FB15K-237 spelling)."""
    return None if mid is None else "/" + mid.replace(".", "/", 1)


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (data/README.md says where to get it)")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: malformed JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not valid UTF-8 at byte {e.start}; save the file as "
                              f"UTF-8") from None


def _get(record: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(record, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataFormatError(f"{where}: missing field {key!r}")
    return record[key]


def _mid(value: Any, where: str) -> str | None:
    if value is None or value == "null":
        return None
    if not isinstance(value, str) or not _MID.match(value):
        raise DataFormatError(f"{where}: malformed Freebase MID {value!r} (expected e.g. m.0abc)")
    return value


def _name(value: Any, where: str) -> str | None:
    """An answer name: a string, or null (no name: the question is skipped and counted)."""
    if value is not None and not isinstance(value, str):
        raise DataFormatError(f"{where}: answer name {value!r} is a {type(value).__name__}, "
                              f"not a string")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{where}: the question text is missing or empty")
    return value.strip()


def _questions_list(data: Any, path: Path) -> list[Any]:
    questions = _get(data, "Questions", str(path))
    if not isinstance(questions, list):
        raise DataFormatError(f"{path}: 'Questions' must be a list")
    return questions


def read_webqsp(path: str | Path) -> list[Question]:
    """Official WebQSP v1.0 JSON (``Questions[].Parses[].Answers[]``). Answers of type
    ``Value`` (dates, numbers) have no MID and no ``EntityName``."""
    path = Path(path)
    out = []
    for i, q in enumerate(_questions_list(_load_json(path), path)):
        qid = _get(q, "QuestionId", f"{path}: question #{i}")
        where = f"{path}: {qid}"
        parses = []
        for p in _get(q, "Parses", where):
            topic = _mid(_get(p, "TopicEntityMid", where), where)
            answers = []
            for a in _get(p, "Answers", where):
                is_entity = _get(a, "AnswerType", where) == "Entity"
                mid = _mid(_get(a, "AnswerArgument", where), where) if is_entity else None
                answers.append(Answer(mid, _name(_get(a, "EntityName", where), where)))
            parses.append(Parse(topic, tuple(answers)))
        out.append(Question(qid, _text(_get(q, "RawQuestion", where), where), tuple(parses)))
    return out


def read_freebaseqa_json(path: str | Path) -> list[Question]:
    """Official FreebaseQA JSON (kelvin-jiang/FreebaseQA): ``Questions[]`` with ``Question-ID``,
    ``RawQuestion`` and ``Parses[].Answers[]`` of ``AnswersMid`` and ``AnswersName`` (a list of
    strings; its first entry is the answer name)."""
    path = Path(path)
    out = []
    for i, q in enumerate(_questions_list(_load_json(path), path)):
        qid = _get(q, "Question-ID", f"{path}: question #{i}")
        where = f"{path}: {qid}"
        parses = []
        for p in _get(q, "Parses", where):
            topic = _mid(_get(p, "TopicEntityMid", where), where)
            answers = []
            for a in _get(p, "Answers", where):
                names = _get(a, "AnswersName", where)
                if isinstance(names, str):
                    names = [names]
                name = _name(names[0], where) if isinstance(names, list) and names else None
                answers.append(Answer(_mid(_get(a, "AnswersMid", where), where), name))
            parses.append(Parse(topic, tuple(answers)))
        out.append(Question(qid, _text(_get(q, "RawQuestion", where), where), tuple(parses)))
    return out


def read_freebaseqa_tab(path: str | Path) -> list[Question]:
    """FreebaseQA pre-release ``.tab`` (Dec 2017): one row per (question, parse) with 8 fields
    (mention, Freebase name, topic MID, predicate, CVT predicate or ``null``, answer MID, answer
    string, question; the question is CSV-quoted when it holds quotes). Rows of one question
    are not contiguous; parses keep file order. The files carry no question ids: questions are
    numbered by first appearance, ``<file stem>-tab-<n>`` (these ids are not the release's).
    Answer strings are lower-cased, as the release's ``AnswersName`` are."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    grouped: dict[str, list[Parse]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if not row:
                continue
            where = f"{path}:{line_no}"
            if len(row) != 8:
                raise DataFormatError(f"{where}: expected 8 tab-separated fields, got {len(row)}")
            text = _text(row[7], where)
            answer = Answer(_mid(row[5], where), row[6].strip().lower() or None)
            grouped.setdefault(text, []).append(Parse(_mid(row[2], where), (answer,)))
    return [
        Question(f"{path.stem}-tab-{n}", text, tuple(parses))
        for n, (text, parses) in enumerate(grouped.items())
    ]


def select_examples(
    questions: Iterable[Question], entity_index: Mapping[str, int], source: str = ""
) -> Selection:
    """Apply HittER's rule (module docstring) to every question. ``entity_index`` maps KG MIDs
    (``/m/0abc``) to ids. Dropped questions are counted in ``Selection.skipped``."""
    questions = list(questions)
    sel = Selection(source, len(questions), [])
    seen: set[str] = set()
    for q in questions:
        if q.question_id in seen:
            raise DataFormatError(f"{source}: question id {q.question_id} occurs twice")
        seen.add(q.question_id)
        chosen = next(
            (
                p
                for p in q.parses
                if kg_mid(p.topic_mid) in entity_index
                and p.answers
                and kg_mid(p.answers[0].mid) in entity_index
            ),
            q.parses[-1] if q.parses else None,
        )
        if chosen is None:
            sel.skip("no parse", q.question_id)
            continue
        if not chosen.answers:
            sel.skip("no answer", q.question_id)
            continue
        answer = chosen.answers[0]
        name = (answer.name or "").strip()
        if not name:
            sel.skip("no answer name", q.question_id)
            continue
        sel.examples.append(
            QAExample(
                question_id=q.question_id,
                question=q.text,
                topic_entity=entity_index.get(kg_mid(chosen.topic_mid)),
                answer=name,
                answer_entity=entity_index.get(kg_mid(answer.mid)),
            )
        )
    sel.log_skips()
    return sel


def read_hitter_json(
    path: str | Path, num_entities: int, placeholder_id: int | None = HITTER_PLACEHOLDER_ID
) -> Selection:
    """HittER's released QA examples (keys ``QuestionID, RawQuestion, TopicEntityID,
    AnswerEntityName, AnswerEntityID, RelationID``; ids in LibKGE order).

    ``placeholder_id`` (14540) is read as "not in the KG". It is also a real entity
    (/m/0q96), which the files cannot tell apart; in the released files it never stands for
    it: no filtered example uses 14540, and the full-file examples whose ids are both
    different from 14540 are exactly the filtered ones. ``AnswerEntity`` (stored label ids,
    often not word pieces) is ignored: labels come from ``AnswerEntityName`` through the
    model's tokenizer. Known id errors (:data:`HITTER_ERRATA`) are corrected.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of examples")
    sel = Selection(str(path), len(data), [])
    seen: set[str] = set()
    for i, e in enumerate(data):
        qid = _get(e, "QuestionID", f"{path}: example #{i}")
        where = f"{path}: {qid}"
        text = _text(_get(e, "RawQuestion", where), where)
        qid = HITTER_ERRATA.get((qid, text), qid)
        if qid in seen:
            raise DataFormatError(f"{where}: question id occurs twice")
        seen.add(qid)
        ids = []
        for key in ("TopicEntityID", "AnswerEntityID"):
            value = _get(e, key, where)
            if not isinstance(value, int) or not 0 <= value < num_entities:
                raise DataFormatError(f"{where}: {key} {value!r} is not an entity id of the KG")
            ids.append(None if value == placeholder_id else value)
        relation = _get(e, "RelationID", where)
        if not isinstance(relation, int) or relation < 0:
            raise DataFormatError(f"{where}: RelationID {relation!r} is not a relation id")
        name = _get(e, "AnswerEntityName", where)
        if not isinstance(name, str) or not name.strip():
            sel.skip("no answer name", qid)
            continue
        sel.examples.append(QAExample(qid, text, ids[0], name.strip(), ids[1], relation))
    sel.log_skips()
    return sel
