"""Control tags: ``[helpful=2][harmless=0] <prompt>``.

``levels`` maps each attribute to its number of levels L (requested levels are 0..L-1); its key order is
the tag order. The tagged text is the same for both encodings: with ``text`` the tokenizer splits a tag
into ordinary tokens; with ``special_tokens`` every possible tag (``[helpful=0]`` .. ``[harmless=2]``) is
one added token, the embeddings are resized to the new vocabulary, and the tokenizer is saved with the
model (training checkpoints save it too), so a reload produces the same ids.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from eqrlhf.errors import ConfigError

TAG = re.compile(r"\[([^\[\]=\s]+)=([^\[\]\s]*)\]")


class ControlError(ConfigError):
    """A control setting that cannot be used; the message names the attribute and the allowed range."""


def check_levels(levels: dict[str, int]) -> None:
    """The configured attributes: at least one, plain names, two levels or more each."""
    if not levels:
        raise ControlError("control.levels is empty: name at least one attribute, e.g. {helpful: 3}")
    for name, count in levels.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ControlError(f"control.levels: attribute name {name!r} must be a plain identifier")
        if count < 2:
            raise ControlError(f"control.levels.{name}={count}: an attribute needs at least 2 levels")


def check_setting(requested: dict[str, int], levels: dict[str, int], where: str = "control setting") -> None:
    """Every configured attribute exactly once, each level an integer in 0..L-1."""
    unknown = [a for a in requested if a not in levels]
    if unknown:
        raise ControlError(f"{where}: unknown attribute {unknown[0]!r}; known attributes: {list(levels)}")
    missing = [a for a in levels if a not in requested]
    if missing:
        raise ControlError(f"{where}: no level for attribute(s) {missing}")
    for name, value in requested.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ControlError(f"{where}: level of {name!r} must be an integer, got {value!r}")
        if not 0 <= value < levels[name]:
            raise ControlError(f"{where}: {name}={value} is out of range 0..{levels[name] - 1}")


def tag(name: str, level: int) -> str:
    return f"[{name}={level}]"


def format_tags(requested: dict[str, int], levels: dict[str, int]) -> str:
    """``[helpful=2][harmless=0]``: attributes in config order, whatever the order of ``requested``."""
    check_setting(requested, levels)
    return "".join(tag(name, requested[name]) for name in levels)


def tag_prompt(prompt: str, requested: dict[str, int], levels: dict[str, int]) -> str:
    return f"{format_tags(requested, levels)} {prompt}"


def parse_tags(text: str, levels: dict[str, int]) -> tuple[dict[str, int], str]:
    """Split leading tags off ``text``: (levels requested, the rest without its leading space).

    Raises ControlError for an unknown attribute, a repeated or missing one, a non-integer or
    out-of-range level.
    """
    requested: dict[str, int] = {}
    pos = 0
    while match := TAG.match(text, pos):
        name, value = match.group(1), match.group(2)
        if name in requested:
            raise ControlError(f"tags in {text[: match.end()]!r}: attribute {name!r} is given twice")
        if not re.fullmatch(r"-?\d+", value):
            raise ControlError(f"tags in {text[: match.end()]!r}: level of {name!r} must be an integer, got {value!r}")
        requested[name] = int(value)
        pos = match.end()
    check_setting(requested, levels, where=f"tags of {text[:80]!r}")
    return requested, text[pos:].removeprefix(" ")


def all_settings(levels: dict[str, int]) -> list[dict[str, int]]:
    """Every combination of levels, the first attribute varying slowest."""
    names = list(levels)
    return [dict(zip(names, combo)) for combo in itertools.product(*(range(levels[n]) for n in names))]


def control_tokens(levels: dict[str, int]) -> list[str]:
    """Every tag that can occur: the tokens added with ``encoding: special_tokens``."""
    return [tag(name, k) for name, count in levels.items() for k in range(count)]


def add_control_tokens(tokenizer, model, levels: dict[str, int]) -> int:
    """Add the tags as special tokens and grow the model's embeddings to the tokenizer; returns tokens added.

    New rows are initialised by transformers' ``resize_token_embeddings`` (mean of the old embeddings), so
    an untrained tag starts as an average token rather than noise.
    """
    added = tokenizer.add_tokens(control_tokens(levels), special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return added


def check_single_tokens(tokenizer, levels: dict[str, int]) -> None:
    """Each tag must encode to exactly one id (what ``special_tokens`` promises after a reload)."""
    for text in control_tokens(levels):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ControlError(
                f"tokenizer splits control tag {text!r} into {len(ids)} tokens: it was not saved with the control "
                "tokens (run `eqrlhf control-data` with control.encoding=special_tokens and train from its model)"
            )


def prepare_tagged_model(base: str, out_dir: Path, levels: dict[str, int], dtype: str = "float32") -> Path:
    """``base`` with the control tokens added and embeddings resized, saved (safetensors + tokenizer) in
    ``out_dir``: the model to train with ``encoding: special_tokens``."""
    from eqrlhf.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base, dtype=dtype)
    add_control_tokens(tokenizer, model, levels)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
