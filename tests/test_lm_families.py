"""Any masked LM: the paper's adapters and the link head attach to each supported family (BERT,
RoBERTa, XLM-R, ALBERT, DeBERTa-v2), offline, on tiny random configs with tokenizers trained
here from the QA questions and the graph's entity names (sentencepiece for the families that use
it, byte-level BPE for RoBERTa, MiniLM's WordPiece for BERT). Each trains one step, round-trips
save_pretrained / from_pretrained, and answers through kgqa.ask; the adapters sit at the depths
"every second layer" gives on the model's own layers (ALBERT's one shared layer included)."""

import shutil

import pytest
import torch
from tokenizers import AddedToken
from transformers import (
    AlbertConfig,
    AlbertTokenizer,
    AutoTokenizer,
    BertConfig,
    DebertaV2Config,
    DebertaV2Tokenizer,
    RobertaConfig,
    RobertaTokenizer,
    XLMRobertaConfig,
    XLMRobertaTokenizer,
)

from hitter_core.neighbours import NeighbourIndex
from kgqa.ask import EntityNames, ask
from kgqa.batches import make_batch
from kgqa.config import KGQAConfig
from kgqa.data import QAExample
from kgqa.lm import FAMILIES, encoder_layers, load_tokenizer, masked_lm_from_config, word_pieces
from kgqa.model import KGEnhancedLM, build_model, load_qa_model
from kgqa.qa_readers import read_webqsp
from kgqa.readers.adapters import CrossAttentionAdapter

NAMES = ["Paris", "France", "Berlin", "Germany", "Mogadishu", "Somalia", "Europe", "Africa"]
TRAIN = ["Paris\tcapital_of\tFrance", "Berlin\tcapital_of\tGermany",
         "Mogadishu\tcapital_of\tSomalia", "France\tpart_of\tEurope",
         "Germany\tpart_of\tEurope", "Somalia\tpart_of\tAfrica"]
QUESTIONS = [("what is the capital of this country?", "France", "Paris"),
             ("what is the capital of this country?", "Somalia", "Mogadishu"),
             ("where is this country?", "Germany", "Europe")]
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=130)
SPECIAL = ["[CLS]", "[SEP]", "[MASK]", "<mask>", "[PAD]", "[UNK]"]  # every family's
SENTENCEPIECE = {"albert": (AlbertTokenizer, "spiece.model"),
                 "xlm-roberta": (XLMRobertaTokenizer, "sentencepiece.bpe.model"),
                 "deberta-v2": (DebertaV2Tokenizer, "spm.model")}


@pytest.fixture(scope="module")
def texts(data_root, fb15k237):
    questions = [q.text for q in read_webqsp(data_root / "webqsp" / "WebQSP.train.json")]
    return questions + list(fb15k237.entity_names) + [q for q, _, _ in QUESTIONS] + NAMES


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_graph):
    """A six-triple graph with names and a tiny HittER of two context layers."""
    root = tmp_path_factory.mktemp("families")
    kg = toy_graph(root / "toy", TRAIN, NAMES, hitter=dict(
        hidden_size=16, intermediate_size=32, num_context_layers=2))
    return root, kg


def tokenizer_of(family, texts, path, minilm_path):
    """A tokenizer of the family, trained on ``texts`` and saved to ``path``."""
    if family == "bert":
        tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    elif family == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=1000, show_progress=False,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        bpe.save_model(str(path))
        # roberta-base's mask token takes the space before it, as here
        tokenizer = RobertaTokenizer.from_pretrained(path, mask_token=AddedToken(
            "<mask>", lstrip=True, special=True))
    else:
        import sentencepiece

        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=str(path / "sp"), vocab_size=1000,
            user_defined_symbols=SPECIAL, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            minloglevel=2)
        cls, file = SENTENCEPIECE[family]
        shutil.move(path / "sp.model", path / file)
        (path / "sp.vocab").unlink()
        kwargs = dict(unk_token="[UNK]", pad_token="[PAD]") if family == "deberta-v2" else {}
        tokenizer = cls.from_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return tokenizer


def lm_config(family, tokenizer):
    n = len(tokenizer)
    pad = dict(pad_token_id=tokenizer.pad_token_id)
    return {"bert": lambda: BertConfig(vocab_size=n, **TINY),
            "roberta": lambda: RobertaConfig(vocab_size=n, **TINY, **pad),
            "xlm-roberta": lambda: XLMRobertaConfig(vocab_size=n, **TINY, **pad),
            # one layer shared across the four depths, word embeddings narrower than the states
            "albert": lambda: AlbertConfig(vocab_size=n, embedding_size=16, num_hidden_groups=1,
                                           inner_group_num=1, **TINY, **pad),
            # the current MLM head (not legacy), which reads the word embeddings
            "deberta-v2": lambda: DebertaV2Config(vocab_size=n, relative_attention=True,
                                                  pos_att_type=["p2c", "c2p"], legacy=False,
                                                  **TINY, **pad)}[family]()


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_and_link_head_on_every_family(family, texts, toy, tmp_path, minilm_path,
                                                one_thread):
    root, kg = toy
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    tokenizer = tokenizer_of(family, texts, lm_dir, minilm_path)
    torch.manual_seed(0)
    masked_lm_from_config(lm_config(family, tokenizer).to_dict()).save_pretrained(lm_dir)
    tokenizer = load_tokenizer(str(lm_dir))

    config = KGQAConfig(lm=str(lm_dir), kg_checkpoint=str(root / "hitter"), reader="paper+link",
                        freeze_kg=True, max_neighbours=8)
    model, _ = build_model(config)
    assert model.lm.config.model_type == family
    # "every second layer" on the model's own 4 layers and HittER's 2: depths 3 and 4
    assert model.layer_mapping == {3: 2, 4: 2}
    depths = [d for _, ds in encoder_layers(model.lm) for d in ds]
    assert depths == [1, 2, 3, 4]
    calls = []
    for m in model.modules():
        if isinstance(m, CrossAttentionAdapter):
            m.register_forward_hook(lambda *_: calls.append(1))
    model.mask_token_id = tokenizer.mask_token_id
    model.head.set_tables(kg, tokenizer)
    index = NeighbourIndex.build(kg, seed=model.config.kg_config["neighbour_order_seed"])
    examples = [QAExample(f"q{i}", q, kg.entity_names.index(t), a, kg.entity_names.index(a))
                for i, (q, t, a) in enumerate(QUESTIONS)]
    batch = make_batch(examples, tokenizer, index, 8)
    # the masks are the answers' own word pieces, as read after a space
    gold = [p for a in word_pieces([a for _, _, a in QUESTIONS], tokenizer) for p in a]
    assert batch["labels"][batch["labels"] != -100].tolist() == gold
    assert len({len(p) for p in word_pieces(NAMES, tokenizer)}) > 1 or family == "bert"

    model.train()
    loss = model(**batch).loss
    assert len(calls) == 2 and torch.isfinite(loss)  # one adapter call per adapted depth
    loss.backward()
    adapters = [m for m in model.modules() if isinstance(m, CrossAttentionAdapter)]
    assert len(adapters) == 2
    assert all(a.query.weight.grad.abs().sum() > 0 for a in adapters)
    assert model.head.gate.weight.grad.abs().sum() > 0  # the link head's weight beta
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()

    model.eval()
    with torch.no_grad():
        before = model(**batch).log_probs
    model.save_pretrained(tmp_path / "qa")
    tokenizer.save_pretrained(tmp_path / "qa")
    loaded, tokenizer, index = load_qa_model(tmp_path / "qa", data_dir=root)
    assert isinstance(loaded, KGEnhancedLM)
    with torch.no_grad():
        after = loaded(**batch).log_probs
    torch.testing.assert_close(after, before)

    names = EntityNames(kg, tokenizer, max_masks=3)
    got = ask(loaded, tokenizer, kg, index, QUESTIONS[0][0], kg.entity_names.index("France"),
              max_masks=3, names=names, min_entity_p=1e-9)
    assert got.entity is not None and got.text.casefold() in {n.casefold() for n in NAMES}
    unlikely = ask(loaded, tokenizer, kg, index, QUESTIONS[0][0], 1, max_masks=3, names=names,
                   min_entity_p=1.0)
    assert unlikely.entity is None and unlikely.free_text and unlikely.text.strip()


def test_an_unsupported_masked_lm_is_one_clear_error():
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    lm = DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2,
                                                hidden_dim=32))
    with pytest.raises(ValueError, match="no encoder layers found .*bert, roberta"):
        encoder_layers(lm)
