"""The model card (README.md) of a saved QA model: the LM, the knowledge it reads, the
protocol, the accuracy it reached (hitter_core.model_card for the form and the citation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hitter_core.model_card import settings_table, write_card
from kgqa.readers import parse_reader

KG_INIT_WORDS = {"pretrained": "pretrained weights", "random": "random weights",
                 "frequency": "control: its scores replaced by answer frequencies"}


def qa_card(directory: str | Path, model_config: Any, train_config: Any, dev: float,
            epoch: int, test: dict[str, Any] | None = None,
            shown_as: str | Path | None = None) -> Path:
    """Card of ``kgqa.train``'s ``best/``: dev accuracy at ``epoch``; ``test`` (accuracy,
    correct, total) once the test split was read; ``shown_as``: the final path of a
    temporary ``directory``."""
    m, t = model_config, train_config
    reader = parse_reader(m.reader)
    if m.kg_checkpoint is None:
        knowledge = f"none: {reader.description} (reader `{m.reader}`, kgqa.readers)"
    else:
        knowledge = (f"HittER `{m.kg_checkpoint}` ({'frozen' if m.freeze_kg else 'co-trained'},"
                     f" {KG_INIT_WORDS[m.kg_init]}), read by {reader.description} (reader "
                     f"`{m.reader}`, kgqa.readers)")
    result = f"dev accuracy {dev:.4f} (epoch {epoch})"
    if test is not None:
        result += (f"; test accuracy {test['accuracy']:.4f} ({test['correct']} / "
                   f"{test['total']}), read once with this checkpoint")
    path = Path(shown_as or directory).as_posix()
    sections = [
        ("What it is", f"A masked LM (`{Path(m.lm).name}`) fine-tuned for cloze-form factoid QA "
                       f"(HittER paper, section 4). Knowledge: {knowledge}."),
        ("Data", f"{t.dataset} {t.split} (HittER's released splits; dev = "
                 f"{t.dev_fraction:.0%} of train, chosen by question id)."),
        ("Configuration", settings_table({
            "epochs": t.epochs, "batch_size": t.batch_size, "lr_new": t.lr_new,
            "lr_pretrained": t.lr_pretrained, "seed": t.seed,
            "max_neighbours": m.max_neighbours})),
        ("Metrics", result),
        ("How to use", f"""```bash
python -m kgqa.ask {path} "who wrote hamlet?"
```
```python
from kgqa.model import load_qa_model
model, tokenizer, neighbours = load_qa_model("{path}")
```"""),
    ]
    metadata = {"library_name": "hitter-kgqa", "tags": ["question-answering", "fill-mask",
                                                         "knowledge-graph", "hitter"],
                "datasets": [t.dataset], "metrics": ["accuracy"]}
    return write_card(directory, metadata, f"KG-enhanced {Path(m.lm).name} for {t.dataset}",
                      sections)
