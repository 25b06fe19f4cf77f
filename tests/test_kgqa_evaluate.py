"""QA evaluation (kgqa/evaluate.py, kgqa/metrics/cloze_accuracy): the every-mask-right metric
on hand-made cases, per-question predictions from a stub model, the predictions file and the
mean ± std report over seeds."""

import json

import pytest
import torch
from torch import nn

from kgqa.evaluate import (
    accuracy,
    load_metric,
    main,
    predict,
    prediction_records,
    write_predictions,
)
from kgqa.model import KGQAOutput
from kgqa.report import build_report, find_run_results, format_markdown


@pytest.fixture(scope="module")
def metric():
    return load_metric()


# ---------------------------------------------------------------------- metric


@pytest.mark.parametrize("predictions, references, expected", [
    ([[5, 6], [7]], [[5, 6], [7]], 1.0),  # all right
    ([[5, 9], [7]], [[5, 6], [7]], 0.5),  # one piece wrong: that question is wrong
    ([[9, 6, 3]], [[5, 6, 3]], 0.0),  # first piece wrong, rest right
    ([[5]], [[5, 6]], 0.0),  # prediction a strict prefix of the gold
    ([[5, 6, 7]], [[5, 6]], 0.0),  # gold a strict prefix of the prediction
    ([[6, 5]], [[5, 6]], 0.0),  # right pieces, wrong order
    ([[1], [2, 3], [4, 5, 6], [7]], [[1], [2, 3], [4, 5, 0], [8]], 0.5),
])
def test_metric_hand_made(metric, predictions, references, expected):
    res = metric.compute(predictions=predictions, references=references)
    assert res["accuracy"] == pytest.approx(expected)
    assert res["total"] == len(references)
    assert res["correct"] == round(expected * len(references))


def test_metric_rejects_empty_and_misaligned(metric):
    with pytest.raises(ValueError):
        metric.compute(predictions=[], references=[])
    with pytest.raises(ValueError):
        metric.compute(predictions=[[1]], references=[[1], [2]])


# ---------------------------------------------------------------------- predict


class StubLM(nn.Module):
    """Predicts the batch's ``guess`` at the labelled positions (one-hot logits over V=10)."""

    def forward(self, labels, guess, **_):
        positions = labels != -100  # (B, L)
        logits = nn.functional.one_hot(guess[positions], 10).float()  # (M, V)
        return KGQAOutput(log_probs=logits.log_softmax(-1), labels=labels[positions],
                          rows=positions.nonzero()[:, 0])


def stub_batches():
    # Question 0: 2 masks, both right; 1: 1 mask, wrong; 2: 3 masks, middle one wrong;
    # 3 (second batch): 1 mask, right.
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, 7, -100, -100, -100],
                           [-100, 1, 2, 3, -100]])
    guess = torch.tensor([[0, 3, 4, 0, 0], [0, 8, 0, 0, 0], [0, 1, 9, 3, 0]])
    yield {"input_ids": torch.zeros_like(labels), "labels": labels, "guess": guess}
    yield {"input_ids": torch.zeros(1, 3, dtype=torch.long),
           "labels": torch.tensor([[-100, -100, 5]]), "guess": torch.tensor([[0, 0, 5]])}


def test_predict_splits_per_question_and_matches_metric(metric):
    model = StubLM().train()
    preds = predict(model, stub_batches(), torch.device("cpu"))
    assert preds.predicted == [[3, 4], [8], [1, 9, 3], [5]]
    assert preds.gold == [[3, 4], [7], [1, 2, 3], [5]]
    assert preds.correct == [True, False, False, True]
    assert accuracy(preds, metric) == {"accuracy": 0.5, "correct": 2, "total": 4}
    assert model.training  # mode restored


def test_predictions_file(tmp_path, minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    gold = [tok("paris", add_special_tokens=False)["input_ids"],
            tok("william shakespeare", add_special_tokens=False)["input_ids"]]
    preds = predict(StubLM(), [], torch.device("cpu"))
    preds.predicted, preds.gold, preds.correct = [gold[0], gold[0]], gold, [True, False]
    examples = [{"question_id": "q1", "question": "capital of france?", "answer": "Paris"},
                {"question_id": "q2", "question": "who wrote hamlet?",
                 "answer": "William Shakespeare"}]
    write_predictions(prediction_records(examples, preds, tok), tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in rows] == ["paris", "paris"]
    assert [r["correct"] for r in rows] == [True, False]
    assert rows[1]["answer"] == "William Shakespeare" and rows[1]["question_id"] == "q2"
    with pytest.raises(ValueError):
        prediction_records(examples[:1], preds, tok)


# ---------------------------------------------------------------------- report


def run_result(seed, acc, kg="none", split="filtered", dataset="webqsp"):
    return {"lm": "minilm", "kg": kg, "dataset": dataset, "split": split, "seed": seed,
            "test": {"accuracy": acc}, "dev": {"accuracy": acc / 2}}


def test_report_mean_std_over_seeds():
    results = [run_result(1, 0.40), run_result(2, 0.50), run_result(3, 0.60),
               run_result(1, 0.30, kg="co-trained"), run_result(1, 0.20, split="full")]
    report = build_report(results)
    rows = {(r["kg"], r["split"]): r for r in report["rows"]}
    base = rows[("none", "filtered")]
    assert base["n"] == 3 and base["seeds"] == [1, 2, 3]
    assert base["mean"] == pytest.approx(50.0)
    assert base["std"] == pytest.approx(10.0)  # sample std of 40, 50, 60
    assert base["dev_mean"] == pytest.approx(25.0)
    assert rows[("co-trained", "filtered")]["std"] is None  # one seed: no std
    table = format_markdown(report, paper=False).splitlines()
    assert table[0] == "| model | protocol | webqsp full | webqsp filtered |"  # full first
    assert table[2] == "| minilm | – | 20.0 (n=1) | 50.0 ± 10.0 (n=3) |"
    assert table[3] == "| minilm + HittER co-trained, paper adapters | – | – | 30.0 (n=1) |"


def test_report_rejects_a_seed_counted_twice():
    with pytest.raises(ValueError, match="two runs of seed 1"):
        build_report([run_result(1, 0.4), run_result(1, 0.5)])


def test_report_cli_reads_nested_runs(tmp_path, capsys):
    for i, acc in enumerate([0.25, 0.75]):
        d = tmp_path / "runs" / f"seed{i}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(run_result(i, acc)))
    assert len(find_run_results([tmp_path / "runs"])) == 2
    main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert "50.0 ± 35.4 (n=2)" in out
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["rows"][0]["test_accuracy"] == [25.0, 75.0]
    assert "50.0 ± 35.4" in (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(FileNotFoundError):
        main(["report", str(tmp_path / "nowhere")])
