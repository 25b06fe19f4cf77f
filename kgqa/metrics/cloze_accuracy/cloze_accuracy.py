"""Cloze accuracy of factoid QA (paper section 4, "Factoid QA Experiments"; REFERENCE.md "QA").

A question is answered correctly only if **every** masked word piece is right: the predicted
piece ids equal the gold ones position by position, and the two sequences have the same
length. There are no ties to break: each prediction is the top-1 piece at its mask position
(ties inside ``argmax`` go to the lowest id, torch's rule), and a question is right or wrong.
Accuracy is the share of questions answered correctly; an empty input is an error.

Loaded by path, offline (``evaluate.load("kgqa/metrics/cloze_accuracy")``); inputs are one
sequence of word-piece ids per question (any lengths).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Exact match of every masked word piece: the share of questions whose predicted
piece ids equal the gold piece ids (same length, same ids in the same order)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of sequences of int, the predicted word-piece ids of each question.
    references: list of sequences of int, the gold word-piece ids of each question.
Returns:
    accuracy: float in [0, 1], share of questions with every piece right.
    correct: int, number of such questions.
    total: int, number of questions.
Examples:
    >>> metric = evaluate.load("kgqa/metrics/cloze_accuracy")
    >>> metric.compute(predictions=[[5, 6], [7]], references=[[5, 6], [8]])
    {'accuracy': 0.5, 'correct': 1, 'total': 2}
"""

_CITATION = """@inproceedings{chen-etal-2021-hitter,
  title = {HittER: Hierarchical Transformers for Knowledge Graph Embeddings},
  author = {Chen, Sanxing and Liu, Xiaodong and Gao, Jianfeng and Jiao, Jian and Zhang, Ruofei
            and Ji, Yangfeng},
  booktitle = {Proceedings of EMNLP},
  year = {2021}
}"""


def _padded(sequences: list, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, width) int64 ids padded with -1 (never a piece id), and the (Q,) lengths."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)  # (Q,)
    out = np.full((len(sequences), width), -1, dtype=np.int64)
    flat = [np.asarray(s, dtype=np.int64) for s in sequences]
    # Row-major boolean assignment fills each row's leading ``length`` cells in order.
    out[np.arange(width) < lengths[:, None]] = np.concatenate(flat) if flat else []
    return out, lengths


def exact_match(predictions: list, references: list) -> np.ndarray:
    """(Q,) bool: whether each question's predicted pieces equal its gold pieces exactly
    (same length, same ids in the same order)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    width = max((len(s) for s in (*predictions, *references)), default=0)
    pred, pred_len = _padded(predictions, width)  # (Q, W), (Q,)
    gold, gold_len = _padded(references, width)
    return (pred_len == gold_len) & (pred == gold).all(axis=1)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClozeAccuracy(evaluate.Metric):
    """Every-mask-right accuracy (exact match of each word piece)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions: list, references: list) -> dict:
        if not len(references):
            raise ValueError("cloze accuracy of no questions is undefined")
        correct = exact_match(predictions, references)
        return {
            "accuracy": float(correct.mean()),
            "correct": int(correct.sum()),
            "total": int(len(correct)),
        }
