"""Loading a config: YAML files composed through ``extends``, dotted ``key=value`` overrides, and
validation whose errors name the key, the closest valid key, or what replaced a removed one."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from eqrlhf.algorithms.catalog import AMA_LOSSES
from eqrlhf.config.schema import Config
from eqrlhf.errors import ConfigError, tried

# keys that no longer exist, with what replaced them: a config that still sets one fails at load saying so
REMOVED_KEYS = {
    "ama.enabled": (
        f"the loss name turns AMA on: set algorithm.loss to one of {', '.join(AMA_LOSSES)} "
        "(ppo with ama.enabled=true is algorithm.loss=ama_ppo; where it was false, delete the key)"
    ),
    "rollout.engine": "set generation.engine instead: it chooses the engine of every stage, the rollout pool's too",
}


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model``; list items of a section appear as ``<list>.*.<key>``."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        item = get_args(ann)[0] if get_origin(ann) is list and get_args(ann) else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, prefix + name + "."))
        elif isinstance(item, type) and issubclass(item, BaseModel):
            keys.extend(_valid_keys(item, prefix + name + ".*."))
    return keys


def _suggest(bad: str) -> str:
    parts = bad.split(".")
    pattern = ".".join("*" if p.isdigit() else p for p in parts)  # data.sources.0.feilds -> data.sources.*.feilds
    valid = _valid_keys(Config)
    close = difflib.get_close_matches(pattern, valid, n=1, cutoff=0.5)
    if not close:  # try matching only the last component within the same section
        head, _, tail = pattern.rpartition(".")
        siblings = [k for k in valid if k.rpartition(".")[0] == head]
        close = difflib.get_close_matches(head + "." + tail if head else tail, siblings, n=1, cutoff=0.4)
    if not close:
        return ""
    indices = iter(p for p in parts if p.isdigit())
    return f" (did you mean '{'.'.join(next(indices, '0') if p == '*' else p for p in close[0].split('.'))}'?)"


def _parse_scalar(text: str) -> Any:
    """Override values are YAML scalars: 3, 0.5, true, null, [a, b], {k: v}."""
    return yaml.safe_load(text) if text != "" else ""


def apply_override(tree: dict, dotted: str) -> None:
    """``a.b.c=value``; a numeric part indexes a list (``data.sources.0.path=x``)."""
    if "=" not in dotted:
        raise ConfigError(f"override '{dotted}' is not of the form key=value")
    key, value = dotted.split("=", 1)
    parts = key.strip().split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:depth])
                raise ConfigError(
                    f"override '{key}': '{where}' is a list of {len(node)}; '{part}' is not an index in it"
                )
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[:depth])}' is not a section")
        if last:
            node[part] = _parse_scalar(value)
        else:
            node = node[part] if isinstance(node, list) else node.setdefault(part, {})


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden" and key in REMOVED_KEYS:
            lines.append(f"  '{key}' was removed: {REMOVED_KEYS[key]}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'{_suggest(key)}")
        elif e["type"] == "value_error":  # our own validators: the message says what is wrong
            # a check across sections (the model's own validator) has no key of its own: its message names them
            lines.append(f"  '{key}': {e['ctx']['error']}" if key else f"  {e['ctx']['error']}")
        else:
            lines.append(f"  '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def from_dict(tree: dict, origin: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file with its ``extends:`` chain applied (paths relative to the file that names them)."""
    if not path.is_file():
        if chain:  # an extends path is relative to the file that names it, which _read_yaml already applied
            raise ConfigError(f"config file not found: {path.absolute()} (extended by {chain[-1]})")
        raise ConfigError(f"config file not found: {tried(path)}")
    if path.resolve() in chain:
        raise ConfigError(f"config {path}: 'extends' loops back to itself ({' -> '.join(map(str, chain))})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    parents = tree.pop("extends", None) or []
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = _merge(merged, _read_yaml(path.parent / parent, (*chain, path.resolve())))
    return _merge(merged, tree)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (optional; ``extends: base.yaml`` or a list of them composes files, later ones and the file
    itself winning), apply dotted overrides, validate. No Ray, no I/O beyond the files."""
    tree: dict = {}
    origin = "defaults"
    if path is not None:
        tree = _read_yaml(Path(path))
        origin = str(path)
    for item in overrides:
        apply_override(tree, item)
    return from_dict(tree, origin + (f" + {len(overrides)} override(s)" if overrides else ""))
