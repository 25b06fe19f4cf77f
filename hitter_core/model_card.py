"""Model cards: the ``README.md`` in every saved model directory (the Hugging Face model-card
form: YAML metadata, then what the model is, its data, its configuration, the metrics it
reached, how to load it, the paper to cite). :func:`hitter_card` for HittER checkpoints;
``kgqa.train`` writes its QA models' cards with :func:`write_card` too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"
CITATION = """@inproceedings{chen-etal-2021-hitter,
    title = "{H}itt{ER}: Hierarchical Transformers for Knowledge Graph Embeddings",
    author = "Chen, Sanxing and Liu, Xiaodong and Gao, Jianfeng and Jiao, Jian and
              Zhang, Ruofei and Ji, Yangfeng",
    booktitle = "Proceedings of the 2021 Conference on Empirical Methods in Natural
                 Language Processing",
    year = "2021",
    url = "https://aclanthology.org/2021.emnlp-main.812",
}"""


def write_card(directory: str | Path, metadata: Mapping[str, Any], title: str,
               sections: Sequence[tuple[str, str]]) -> Path:
    """Write ``directory/README.md``: YAML front matter, a title, (heading, text) sections and
    the citation."""
    parts = ["---", yaml.safe_dump(dict(metadata), sort_keys=False).strip(), "---", "",
             f"# {title}", ""]
    for heading, text in (*sections, ("Citation", f"```bibtex\n{CITATION}\n```")):
        parts += [f"## {heading}", "", text.strip(), ""]
    path = Path(directory) / CARD
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def settings_table(settings: Mapping[str, Any]) -> str:
    return "\n".join(["| setting | value |", "|---|---|",
                      *(f"| `{k}` | {v} |" for k, v in settings.items())])


def hitter_card(directory: str | Path, model_config: Any, train_config: Any,
                metrics: Mapping[str, Any] | None = None, step: int | None = None,
                shown_as: str | Path | None = None) -> Path:
    """The card of a HittER checkpoint (``best/``): ``metrics`` is a filtered ranking result
    (``{"both": {"mrr", "hits@1", ...}}``) of ``metrics["split"]`` (default valid);
    ``shown_as``: the directory's final path when ``directory`` is a temporary one."""
    c, path = model_config, Path(shown_as or directory).as_posix()
    split = (metrics or {}).get("split", "valid")
    both = (metrics or {}).get("both", {})
    figures = "not evaluated yet"
    if both:
        row = " | ".join(f"{both.get(k, float('nan')):.4f}"
                         for k in ("mrr", "hits@1", "hits@3", "hits@10"))
        figures = (f"Filtered {split} ranking (both directions, filter = train + valid + "
                   f"test), checkpoint of step {step}:\n\n| MRR | Hits@1 | Hits@3 | Hits@10 |"
                   f"\n|---|---|---|---|\n| {row} |")
    metadata = {"library_name": "hitter-kgqa", "tags": ["knowledge-graph-embedding",
                                                         "link-prediction", "hitter"],
                "datasets": [c.dataset], "metrics": ["mrr", "hits@k"]}
    sections = [
        ("What it is", f"HittER (Chen et al., 2021): an entity Transformer over (entity, "
                       f"relation) pairs and a context Transformer over the source's "
                       f"{c.max_neighbours if c.use_context else 0} neighbours, scoring all "
                       f"{c.num_entities:,} entities (1vsAll) for a query (entity, relation)."),
        ("Data", f"{c.dataset}: {c.num_entities:,} entities, {c.num_relations} relations; "
                 f"trained on its train split, selected on filtered valid MRR."),
        ("Configuration", settings_table({
            "hidden_size": c.hidden_size, "layers (entity + context)":
            f"{c.num_entity_layers} + {c.num_context_layers if c.use_context else 0}",
            "max_neighbours": c.max_neighbours, "batch_size": train_config.batch_size,
            "lr": train_config.lr, "max_epochs": train_config.max_epochs,
            "seed": train_config.seed})
         + "\n\nThe full resolved configuration is `run_config.yaml` beside this card."),
        ("Metrics", figures),
        ("How to use", f"""```python
from hitter_core.checkpoint import load_hitter
model = load_hitter("{path}")
```
```bash
python -m hitter_core.evaluate {path}   # filtered test ranking
python -m hitter_core.predict {path} ENTITY RELATION
```"""),
    ]
    return write_card(directory, metadata, f"HittER on {c.dataset}", sections)
