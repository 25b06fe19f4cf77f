"""The user setting: the QA test questions answered the way ``kgqa.ask`` answers a user.

    python -m kgqa.evaluate user RUN_DIR... [--split test] [--data-dir D] [--names]

The cloze protocol (``kgqa.evaluate``, paper Table 6) hands the model the annotated topic entity
and the number of [MASK] tokens (the gold answer's word pieces). A user has neither. Here every
question of a run's split (``metrics.json`` names the dataset and split) is asked as
:func:`kgqa.ask.ask` asks it: the topic is linked (:mod:`kgqa.linker`; models without HittER
need none), 1 to ``--max-masks`` masks are tried, and a model that reads a KG answers with a
whole entity name of the graph (free text only where no name is likely). With ``--names`` a
plain LM also ranks the graph's entity names (what the names alone are worth).

An answer is right when its word pieces are the gold answer's (casefolded), as under the
protocol. Writes, beside the run's ``metrics.json``, ``user_setting.<split>.json`` (accuracy,
the protocol's accuracy of the same model, the share kept, how often the annotated topic was
linked and how many answers are entities) and ``predictions.user.<split>.jsonl``; the report
(``kgqa.evaluate report``) prints the user setting beside the protocol.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hitter_core.config import DEFAULT_KG
from hitter_core.data import default_data_dir, load_kg
from kgqa.ask import MIN_ENTITY_P, ask, load_for_asking
from kgqa.data import DATASETS
from kgqa.linker import TopicLinker, load_linker
from kgqa.lm import word_pieces
from kgqa.prepare import load_qa_splits
from kgqa.report import METRICS_FILE, USER_FILE, write_predictions

logger = logging.getLogger(__name__)


def user_setting(run_dir: str | Path, data_dir: str | Path | None = None, split: str = "test",
                 max_masks: int = 4, names: bool = False,
                 min_entity_p: float = MIN_ENTITY_P) -> dict[str, Any]:
    """Answer ``split`` of the run in ``run_dir`` (its ``best/``) as a user would; write and
    return the summary (module docstring)."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / METRICS_FILE
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (pass a finished run's directory,"
                                " e.g. runs/.../seed333)")
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    model, tokenizer, neighbours, kg, linker, entity_names = load_for_asking(
        run_dir / "best", data_dir, max_masks, names)
    graph = kg or (entity_names.kg if entity_names else load_kg(data_dir / DEFAULT_KG))
    examples = load_qa_splits(data_dir, metrics["dataset"], metrics["split"], kg=graph)[split]
    limit = (metrics.get("variant") or {}).get("protocol", {}).get("max_eval_examples")
    examples = examples[:limit] if limit else examples
    records, start = [], time.perf_counter()
    for ex in tqdm(examples, desc=f"user setting {run_dir}", unit="q", mininterval=10):
        topic = linker.link(ex.question).entity if linker is not None else -1
        answer = ask(model, tokenizer, kg, neighbours, ex.question, topic, max_masks,
                     names=entity_names, min_entity_p=min_entity_p)
        pieces, gold = word_pieces([answer.text.casefold(), ex.answer.casefold()], tokenizer)
        records.append({"question_id": ex.question_id, "question": ex.question,
                        "answer": ex.answer, "predicted": answer.text, "entity": answer.entity,
                        "topic": topic, "gold_topic": ex.topic_entity, "correct": pieces == gold})
    seconds = time.perf_counter() - start
    n = max(len(records), 1)
    correct = sum(r["correct"] for r in records)
    protocol = metrics[split]["accuracy"] if split in metrics else None
    summary = {
        "split": split, "accuracy": correct / n, "correct": correct, "total": len(records),
        "protocol_accuracy": protocol,
        "kept": correct / n / protocol if protocol else None,
        "topic_linked": (sum(r["topic"] == r["gold_topic"] for r in records) / n
                         if linker is not None else None),
        "entity_answers": sum(r["entity"] is not None for r in records) / n,
        "names": entity_names is not None, "max_masks": max_masks,
        "min_entity_p": min_entity_p, "seconds_per_question": seconds / n,
    }
    write_predictions(records, run_dir / f"predictions.user.{split}.jsonl")
    (run_dir / USER_FILE.format(split=split)).write_text(json.dumps(summary, indent=1) + "\n",
                                                         encoding="utf-8")
    return summary


def format_summary(run_dir: str | Path, s: dict[str, Any]) -> str:
    protocol = ("" if s["protocol_accuracy"] is None else
                f" (protocol {100 * s['protocol_accuracy']:.1f}%, kept {100 * s['kept']:.0f}%)")
    linked = ("" if s["topic_linked"] is None else
              f"; annotated topic linked {100 * s['topic_linked']:.1f}%")
    return (f"{run_dir}: user setting {100 * s['accuracy']:.1f}% ({s['correct']}/{s['total']})"
            f"{protocol}; entity answers {100 * s['entity_answers']:.0f}%{linked}; "
            f"{1000 * s['seconds_per_question']:.0f} ms/question")


def linker_accuracy(linker: TopicLinker, examples: Sequence[Any]) -> dict[str, float]:
    """Share of ``examples`` whose annotated topic is the linked entity (``accuracy``), and
    whose linked entity is the topic or another entity linked to the answer in the train graph
    (``answer_linked``: several entities of a question often lead to its answer)."""
    links = [linker.link(ex.question).entity for ex in examples]
    right = [e == ex.topic_entity for e, ex in zip(links, examples, strict=True)]
    near = [r or (e, ex.answer_entity) in linker.pair_relations for r, e, ex in
            zip(right, links, examples, strict=True)]
    n = max(len(examples), 1)
    return {"accuracy": sum(right) / n, "answer_linked": sum(near) / n, "correct": sum(right),
            "total": len(examples)}


def print_linker_accuracy(data_dir: str | Path | None, splits: Sequence[str]) -> None:
    """``python -m kgqa.evaluate linker``: the topic linker on both datasets' filtered splits."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    kg = load_kg(data_dir / DEFAULT_KG)
    linker = load_linker(data_dir, kg)
    for name in DATASETS:
        examples = load_qa_splits(data_dir, name, "filtered", kg=kg)
        for split in splits:
            r = linker_accuracy(linker, examples[split])
            print(f"{name} filtered {split}: the annotated topic for {100 * r['accuracy']:.1f}% "
                  f"({r['correct']}/{r['total']}); it or an entity linked to the answer for "
                  f"{100 * r['answer_linked']:.1f}%", flush=True)
