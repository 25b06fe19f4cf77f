"""python -m hitter_core.analyze: hop distances on a hand-made graph, and every file of the
report for two tiny checkpoints (context-free and full) of a small synthetic graph."""

import json

import torch

from hitter_core.analyze import hop_distances, main
from hitter_core.config import HittERConfig
from hitter_core.data import KnowledgeGraph, load_kg
from hitter_core.model import HittER


def chain_graph() -> KnowledgeGraph:
    """0 - 1 - 2 - 3 - 4 - 5 - 6 (a chain), and 7 alone (only in test)."""
    train = torch.tensor([[0, 0, 1], [2, 0, 1], [2, 1, 3], [3, 0, 4], [5, 1, 4], [5, 0, 6]])
    test = torch.tensor([[0, 0, 7]])
    return KnowledgeGraph(name="chain", directory=None, entities=[f"e{i}" for i in range(8)],
                          relations=["r0", "r1"], entity_names=[f"e{i}" for i in range(8)],
                          splits={"train": train, "valid": train[:1], "test": test})


def test_hops_in_the_undirected_train_graph():
    kg = chain_graph()
    sources = torch.tensor([0, 0, 0, 0, 6, 3, 0, 4])
    targets = torch.tensor([1, 2, 4, 6, 0, 3, 7, 2])
    # 0->6 is 6 hops and 0->7 unreachable: both beyond max_hops=4 -> 5; edges count either way
    assert hop_distances(kg, sources, targets, max_hops=4, chunk=2).tolist() == [
        1, 2, 4, 5, 5, 0, 5, 2]


def test_report_files(tmp_path):
    root = tmp_path / "data" / "tiny"
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    lines = {f"e{h}\tr{r}\te{t}" for h, r, t in torch.randint(0, 12, (60, 3), generator=g).tolist()
             if h != t and r < 3}
    lines = sorted(lines)
    (root / "train.txt").write_text("\n".join(lines[:-8]) + "\n")
    (root / "valid.txt").write_text("\n".join(lines[-8:-4]) + "\n")
    (root / "test.txt").write_text("\n".join(lines[-4:]) + "\n")
    kg = load_kg(root)
    for name, context in (("no-context", False), ("full", True)):
        model = HittER(HittERConfig(dataset="tiny", num_entities=kg.num_entities,
                                    num_relations=kg.num_relations, hidden_size=16,
                                    num_attention_heads=2, intermediate_size=32,
                                    num_context_layers=1, use_context=context))
        model.save_pretrained(tmp_path / name / "best")
    (tmp_path / "full" / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.5}) + "\n"
        + json.dumps({"step": 2, "valid_mrr": 0.1}) + "\n")
    out = tmp_path / "report"
    assert main([str(tmp_path / "full" / "best"), str(tmp_path / "no-context" / "best"),
                 "--out", str(out), "--data-dir", str(tmp_path / "data"),
                 "--entities", kg.entity_names[0]]) == 0
    for name in ("report.md", "analysis.json", "per_relation.png", "hops.png", "training.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "![](hops.png)" in report and "| e" in report and "no-context" in report
    analysis = json.loads((out / "analysis.json").read_text())
    assert sum(h["count"] for h in analysis["full"]["hops"].values()) == 2 * len(kg.test)


def test_qa_plots(tmp_path):
    from kgqa.analyze import main as qa_main

    def row(label, mean, seeds):
        return {"label": label, "dataset": "webqsp", "split": "filtered", "n": len(seeds),
                "mean": mean, "std": 1.0 if len(seeds) > 1 else None, "seeds": seeds,
                "breakdown": {"neighbour": {"questions": 3, "accuracy": mean + 5},
                              "other": {"questions": 1, "accuracy": mean - 5}}}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"rows": [row("minilm", 44.6, [1, 2, 3]),
                                           row("minilm + copy", 50.0, [1, 2, 3]),
                                           {"label": "paper", "n": 0, "mean": None}]}))
    assert qa_main([str(report), "--out", str(tmp_path / "plots")]) == 0
    for name in ("qa_accuracy.png", "qa_breakdown.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
