"""End-to-end fine-tuning of the embedding categorizer: LoRA adapters on the sentence encoder plus a softmax head.

A frozen encoder with a linear head plateaus at macro-F1 0.45-0.49 on the Equilibrate labels
(docs/categorizer_cv.md); this module lets the encoder itself move, for benchmarks/categorizer_finetune.py.
The adapter is low-rank (LoRA) so that a winner could ship small: per adapted linear layer ``W`` two matrices
``A`` (r x in) and ``B`` (out x r), merged at load time as ``W += (alpha / r) * B @ A`` into the bundled encoder,
so inference costs exactly what the frozen encoder costs. The head is the same
:class:`~eqrlhf.data.categorizers.embedding.Head` (softmax over the L2-normalised sentence embedding,
temperature-scaled) the JSON heads use, so ``embed`` + ``decide_categories`` (and ``min_confidence``) apply as is.

File format: safetensors (``ADAPTER_FORMAT`` in its metadata) with tensors ``head.coef``, ``head.intercept`` and
``lora.<module>.A`` / ``.B``; the metadata holds classes, encoder, rank, alpha, temperature and a JSON
provenance/metrics document. Nothing is unpickled. ``rank = 0`` trains the weights themselves (measured only).

Not the default categorizer: measured, it does not reach the issue-17 target (docs/categorizer_cv.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ADAPTER_FORMAT = "eqrlhf-lora-head/1"
# attention projections of a BERT-style encoder (MiniLM); "attention.output.dense" is the attention output,
# matched as a suffix so the feed-forward "output.dense" is left alone
LORA_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


@dataclass(frozen=True)
class FinetuneSettings:
    """Fixed hyper-parameters (chosen on fold 0's inner validation split only; see benchmarks/categorizer_finetune.py)."""

    rank: int = 8  # 0 = full fine-tuning
    # adapt only the last `top_layers` transformer layers (0 = all): the hidden states entering them are computed
    # once and cached, so an epoch costs a forward+backward through those layers only (see `lower_states`)
    top_layers: int = 0
    targets: tuple[str, ...] = LORA_TARGETS
    alpha: float = 16.0
    epochs: int = 4
    lr: float = 5e-4  # LoRA matrices (or the whole encoder when rank = 0: use ~3e-5)
    head_lr: float = 1e-3
    batch_size: int = 16
    warmup: float = 0.1  # fraction of steps with a linear warm-up, then linear decay to 0
    class_weight: str = "balanced"  # "balanced" (n / (k * n_c)), "sqrt" or "none"
    seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def class_weights(y: np.ndarray, k: int, how: str) -> np.ndarray:
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w = len(y) / (k * np.maximum(counts, 1))
    return {"balanced": w, "sqrt": np.sqrt(w), "none": np.ones(k)}[how]


# --- LoRA -----------------------------------------------------------------------------------------


def _lora_linear_class():
    import torch
    from torch import nn

    class LoRALinear(nn.Module):
        """``base(x) + scale * x @ A.T @ B.T`` with ``base`` frozen; B starts at zero, so training starts at the base."""

        def __init__(self, base: nn.Linear, rank: int, alpha: float):
            super().__init__()
            self.base, self.scale = base, alpha / rank
            self.A = nn.Parameter(torch.empty(rank, base.in_features))
            self.B = nn.Parameter(torch.zeros(base.out_features, rank))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
            for p in base.parameters():
                p.requires_grad_(False)

        def forward(self, x):
            return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale

    return LoRALinear


def add_lora(model, rank: int, alpha: float, targets=LORA_TARGETS, layers=None) -> list[str]:
    """Freeze ``model`` and wrap every linear layer whose name ends with a target (and, with ``layers``, sits in
    ``encoder.layer.<i>`` for one of those i) in a LoRA layer; returns the names."""
    from torch import nn

    lora_linear = _lora_linear_class()
    for p in model.parameters():
        p.requires_grad_(False)
    prefixes = tuple(f"encoder.layer.{i}." for i in layers) if layers is not None else ("",)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(tuple(targets)) and n.startswith(prefixes)
    ]
    if not names:
        raise ValueError(f"no linear layer of the encoder ends with any of {list(targets)}")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, lora_linear(getattr(owner, child), rank, alpha))
    return names


def lora_tensors(model, names: list[str]) -> dict[str, np.ndarray]:
    return {
        f"lora.{n}.{part}": getattr(model.get_submodule(n), part).detach().float().numpy().copy()
        for n in names
        for part in ("A", "B")
    }


def merge_lora(model, tensors: dict[str, np.ndarray], scale: float) -> int:
    """Add ``scale * B @ A`` to each named linear weight of a plain (unwrapped) encoder; returns the count."""
    import torch

    modules = sorted({k[len("lora.") : -len(".A")] for k in tensors if k.endswith(".A")})
    with torch.no_grad():
        for name in modules:
            layer = model.get_submodule(name)
            a, b = (torch.from_numpy(tensors[f"lora.{name}.{p}"]) for p in ("A", "B"))
            if b.shape[0] != layer.weight.shape[0] or a.shape[1] != layer.weight.shape[1]:
                raise ValueError(f"adapter for {name}: {tuple(b.shape)} x {tuple(a.shape)} does not fit the encoder")
            layer.weight += scale * (b @ a).to(layer.weight.dtype)
    return len(modules)


# --- training and inference -----------------------------------------------------------------------


def _encode(st_model, texts: list[str]):
    # the encoder's own tokenizer settings (max_seq_length 256), exactly as `embed` runs it at categorize time
    prepare = getattr(st_model, "preprocess", None) or st_model.tokenize  # sentence-transformers >= 6 renamed it
    return st_model(prepare(texts))["sentence_embedding"]


def lower_states(st_model, texts: list[str], top_layers: int, batch_size: int = 64) -> list[np.ndarray]:
    """Per text, the (tokens, dim) hidden states entering the last ``top_layers`` layers of the frozen encoder.

    Exact for training the top layers only: nothing below them changes. Tokenised as the encoder tokenises at
    categorize time (its max_seq_length), so the cached path and ``embed`` see the same tokens.
    """
    import torch

    bert, tok = st_model[0].auto_model, st_model[0].tokenizer
    first = len(bert.encoder.layer) - top_layers
    out: list[np.ndarray] = [np.zeros(0)] * len(texts)
    order = np.argsort([len(t) for t in texts])
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = tok(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=st_model.max_seq_length,
                return_tensors="pt",
            )
            hidden = bert(**enc, output_hidden_states=True).hidden_states[first]
            for j, i in enumerate(idx):
                out[i] = hidden[j, : int(enc["attention_mask"][j].sum())].float().numpy().copy()
    return out


def _top_encode(bert, states: list[np.ndarray], top_layers: int):
    """Sentence embeddings from cached lower states: the top layers, mean pooling over tokens, L2 normalisation
    (what the Transformer / Pooling(mean) / Normalize modules of the bundled encoder do)."""
    import torch

    lengths = [len(s) for s in states]
    h = torch.zeros(len(states), max(lengths), states[0].shape[1])
    mask = torch.zeros(len(states), max(lengths), dtype=torch.long)
    for j, s in enumerate(states):
        h[j, : len(s)], mask[j, : len(s)] = torch.from_numpy(s), 1
    attn = bert._create_attention_masks(mask, None, h, None, None)[0]  # the model's own mask for its attention kind
    for layer in bert.encoder.layer[len(bert.encoder.layer) - top_layers :]:
        h = layer(h, attn)
    m = mask.unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)


def train(
    st_model,
    texts: list[str],
    y: np.ndarray,
    k: int,
    settings: FinetuneSettings,
    init_head: tuple[np.ndarray, np.ndarray] | None = None,
    on_epoch=None,
    log=print,
    states: list[np.ndarray] | None = None,
):
    """Fine-tune ``st_model`` (a SentenceTransformer whose last module L2-normalises) with a k-class head.

    ``init_head`` (coef, intercept), e.g. a logistic regression on the frozen embeddings, starts the head where a
    linear probe ends, so the first steps refine the encoder instead of undoing it under a random head.
    ``on_epoch(epoch, head)`` is called after each epoch (for inner-validation curves). Returns
    ``(head, lora_names)`` with ``head`` a torch Linear; ``lora_names`` is empty for full fine-tuning.
    With ``settings.top_layers``, ``states`` are the texts' ``lower_states`` (computed here when not given).
    """
    import torch
    from torch import nn

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    encoder, top = st_model[0].auto_model, settings.top_layers
    n_layers = len(encoder.encoder.layer)
    layers = range(n_layers - top, n_layers) if top else None
    if top and states is None:
        states = lower_states(st_model, texts, top)
    if settings.rank > 0:
        names = add_lora(encoder, settings.rank, settings.alpha, settings.targets, layers)
    else:
        names = []
        for p in (encoder.encoder.layer[n_layers - top :] if top else encoder).parameters():
            p.requires_grad_(True)
    dim = (getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension)()
    head = nn.Linear(dim, k)
    if init_head is not None:
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(init_head[0], dtype=torch.float32))
            head.bias.copy_(torch.as_tensor(init_head[1], dtype=torch.float32))
    params = [p for p in encoder.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(
        [{"params": params, "lr": settings.lr}, {"params": head.parameters(), "lr": settings.head_lr}],
        weight_decay=0.01,
    )
    steps_per_epoch = math.ceil(len(texts) / settings.batch_size)
    total, warm = steps_per_epoch * settings.epochs, max(1, int(settings.warmup * steps_per_epoch * settings.epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    loss_fn = nn.CrossEntropyLoss(
        weight=torch.as_tensor(class_weights(y, k, settings.class_weight), dtype=torch.float32)
    )
    lengths = np.array([len(t) for t in texts])
    for epoch in range(settings.epochs):
        st_model.train()
        started, seen, total_loss = time.time(), 0, 0.0
        # batches of similar length (little padding), visited in random order
        order = np.argsort(lengths + rng.uniform(0, lengths.std() / 2 + 1, len(lengths)))
        batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
        for idx in rng.permutation(len(batches)):
            b = batches[idx]
            batch = (
                _top_encode(encoder, [states[i] for i in b], top) if top else _encode(st_model, [texts[i] for i in b])
            )
            logits = head(batch)
            loss = loss_fn(logits, torch.as_tensor(y[b]))
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params + list(head.parameters()), 1.0)
            optim.step()
            sched.step()
            seen, total_loss = seen + len(b), total_loss + loss.item() * len(b)
        log(f"    epoch {epoch + 1}/{settings.epochs}: loss {total_loss / seen:.4f} ({time.time() - started:.0f}s)")
        if on_epoch is not None:
            on_epoch(epoch + 1, head)
    st_model.eval()
    return head, names


def predict_logits(
    st_model, head, texts: list[str], batch_size: int = 64, top_layers: int = 0, states=None
) -> np.ndarray:
    """Logits of ``texts``; with ``top_layers`` and their ``states`` cached, through the top layers only."""
    import torch

    st_model.eval()
    order = np.argsort([len(t) for t in texts])
    out = np.zeros((len(texts), head.out_features), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            if top_layers:
                emb = _top_encode(st_model[0].auto_model, [states[i] for i in idx], top_layers)
            else:
                emb = _encode(st_model, [texts[i] for i in idx])
            out[idx] = head(emb).float().numpy()
    return out


# --- the shipped file -----------------------------------------------------------------------------


def save_adapter(path: Path, head, lora: dict[str, np.ndarray], meta: dict, extra: dict) -> None:
    """Write head + LoRA matrices as safetensors; ``meta`` (classes, embedding_model, rank, alpha, temperature)
    and ``extra`` (provenance, metrics) go into the string metadata."""
    from safetensors.numpy import save_file

    tensors = {
        "head.coef": head.weight.detach().float().numpy().copy(),
        "head.intercept": head.bias.detach().float().numpy().copy(),
        **lora,
    }
    metadata = {"format": ADAPTER_FORMAT, "meta": json.dumps(meta), "extra": json.dumps(extra)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def read_adapter(path: Path) -> tuple[dict[str, np.ndarray], dict, dict]:
    """(tensors, meta, extra) of a file written by :func:`save_adapter`; safetensors only, no pickles."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{path}: format is {metadata.get('format')!r}, expected {ADAPTER_FORMAT!r}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return tensors, json.loads(metadata["meta"]), json.loads(metadata.get("extra", "{}"))


def load_adapter(path: str | Path):
    """(head, lora, scale) of a file written by :func:`save_adapter`: the softmax :class:`Head` (temperature
    included), the LoRA matrices and their ``alpha / rank`` scale. Safetensors only, no pickles."""
    from eqrlhf.config import CATEGORIES
    from eqrlhf.data.categorizers.embedding import Head
    from eqrlhf.errors import InputError

    path = Path(path)
    try:
        tensors, meta, _ = read_adapter(path)
    except ValueError as err:
        raise InputError(str(err), file=path) from None
    bad = [c for c in meta["classes"] if c not in CATEGORIES]
    if bad:
        raise InputError(f"holds {bad}, not categories {list(CATEGORIES)}", file=path, field="classes")
    if not float(meta["temperature"]) > 0 or not int(meta["rank"]) > 0:
        raise InputError(f"temperature {meta['temperature']} / rank {meta['rank']} must be positive", file=path)
    head = Head(
        list(meta["classes"]),
        tensors["head.coef"].astype(np.float32),
        tensors["head.intercept"].astype(np.float32),
        meta["embedding_model"],
        meta.get("normalization", "l2"),
        float(meta["temperature"]),
    )
    lora = {k: v.astype(np.float32) for k, v in tensors.items() if k.startswith("lora.")}
    return head, lora, float(meta["alpha"]) / int(meta["rank"])


def load_adapter_categorizer(path: str | Path, model: str | None = None):
    """(head, encoder with the adapter merged into its weights): the fine-tuned categorizer, run with the same
    ``embed`` + ``decide_categories`` as a JSON head, so ``min_confidence`` routing is unchanged."""
    from eqrlhf.data.categorizers.embedding import load_encoder

    head, lora, scale = load_adapter(path)
    encoder = load_encoder(model or head.embedding_model)
    merge_lora(encoder[0].auto_model, lora, scale)
    return head, encoder
