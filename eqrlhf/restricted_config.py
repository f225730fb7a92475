"""A config restricted to the keys a stage declares (eqrlhf.stages), so an undeclared read fails loudly.

A stage's fingerprint covers only the keys its ``reads(cfg)`` declares; a key it reads without declaring
it is a stale skip waiting to happen (change the key, re-run, "unchanged, skipped"). ``eqrlhf.pipeline``
therefore hands each stage :func:`restrict`'s copy of the config: every field no declared key covers is
removed from its section's instance ``__dict__``, and reading it raises :class:`UndeclaredConfigRead`
naming the stage, the key and where to declare it. The copy pickles with its restriction (pydantic keeps
``__dict__`` and private attributes), so Ray tasks, actors and Ray Train workers that get the config
object get the same restriction; ``model_dump`` of a restricted section raises instead of writing a
partial tree that ``from_dict`` would silently fill with defaults.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, PrivateAttr
from pydantic_core import to_jsonable_python

# Keys every stage may read without declaring them. They only name folders: the output folder
# (run.dir = <run.output_dir>/<run.name>, also the default of every stage's input folder) and the files
# under {data_root}. A path is fingerprinted by itself: an input is a fingerprint part named by its
# resolved path, and a new output folder holds no state, so changing one of these re-runs the stage.
# `tracking` says where a run's records go (MLflow / W&B), never what a stage computes: changing it must not
# re-run a stage, so it is readable everywhere and in no fingerprint.
ALWAYS_ALLOWED = ("run.name", "run.output_dir", "data.data_root", "tracking")

DECLARED_IN = "eqrlhf/stages.py"


class UndeclaredConfigRead(Exception):
    """A stage read a config key its ``reads()`` does not declare: a bug in the code, not the user's.

    Not an AttributeError: ``getattr(section, key, default)`` and ``hasattr`` would swallow one and carry
    on with a default, which is the silent leak this exists to stop."""


class RestrictableSection(BaseModel):
    """Base of every config section: a restricted copy knows which stage it was made for."""

    # set only on sections that miss some field (a field of theirs or of a section below them)
    _restricted_for: str | None = PrivateAttr(None)  # the stage whose declared keys this copy holds
    _key: str = PrivateAttr("")  # this section's dotted key ("" for the whole config), for messages
    _whole: Any = PrivateAttr(None)  # on the top level only: the unrestricted config, for records

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails; a field is missing only from a restricted copy
        if name in type(self).model_fields:
            stage, key = self._restricted_for, self._key + name
            raise UndeclaredConfigRead(
                f"stage {stage!r} read {key!r}, which its reads() in {DECLARED_IN} does not declare: "
                "declare it there (it then becomes part of the stage's fingerprint) or stop reading it"
            )
        return super().__getattr__(name)

    def model_dump(self, **kwargs) -> dict[str, Any]:
        self._refuse_whole_dump()
        return super().model_dump(**kwargs)

    def model_dump_json(self, **kwargs) -> str:
        self._refuse_whole_dump()
        return super().model_dump_json(**kwargs)

    def _refuse_whole_dump(self) -> None:
        if self._restricted_for is not None:
            raise UndeclaredConfigRead(
                f"stage {self._restricted_for!r} dumped {self._key.rstrip('.') or 'the config'} whole, but its "
                f"reads() in {DECLARED_IN} declare only part of it: pass the config object to workers (it pickles "
                "with its restriction) and write records from whole_config_for_records()"
            )


def _wanted_tree(keys: tuple[str, ...]) -> dict:
    """``("a", "b.c", "b.d")`` -> ``{"a": None, "b": {"c": None, "d": None}}``; None = the whole value."""
    tree: dict = {}
    for key in sorted(keys, key=lambda k: k.count(".")):  # a whole section wins over keys inside it
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            if node.get(part, {}) is None:
                break
            node = node.setdefault(part, {})
        else:
            node[last] = None
    return tree


def _prune(section: RestrictableSection, wanted: dict, stage: str, key: str) -> bool:
    """Remove from ``section`` (in place) every field ``wanted`` does not cover; True when any was removed."""
    fields = type(section).model_fields
    unknown = sorted(set(wanted) - set(fields))
    if unknown:
        raise ValueError(f"stage {stage!r} declares {key + unknown[0]!r}, which is not a config key")
    removed = False
    for name in fields:
        if name not in wanted:
            del section.__dict__[name]
            section.__pydantic_fields_set__.discard(name)
            removed = True
        elif wanted[name] is not None:
            value = section.__dict__[name]
            if not isinstance(value, RestrictableSection):
                # a key inside a list, a mapping or an unset section cannot be kept apart from the rest
                raise ValueError(f"stage {stage!r} declares a key inside {key + name!r}: declare {key + name!r}")
            removed |= _prune(value, wanted[name], stage, f"{key}{name}.")
    if removed:
        section._restricted_for, section._key = stage, key
    return removed


def restrict(cfg: RestrictableSection, keys: tuple[str, ...], stage: str) -> Any:
    """A deep copy of ``cfg`` holding only ``keys`` (dotted; a section name keeps the whole section) and
    ALWAYS_ALLOWED; reading anything else raises UndeclaredConfigRead naming ``stage``."""
    restricted = cfg.model_copy(deep=True)
    _prune(restricted, _wanted_tree((*keys, *ALWAYS_ALLOWED)), stage, "")
    restricted._whole = whole_config_for_records(cfg)
    return restricted


def declared_tree(cfg: RestrictableSection, keys: tuple[str, ...]) -> dict:
    """The JSON tree of only ``keys``, read through ``cfg`` (an undeclared one raises): what a stage that
    fingerprints part of its own work (the evaluate stage's base model) digests instead of a dump."""
    tree: dict = {}
    for key in keys:
        *parents, last = key.split(".")
        node, value = tree, cfg
        for part in parents:
            node, value = node.setdefault(part, {}), getattr(value, part)
        node[last] = to_jsonable_python(getattr(value, last))
    return tree


def whole_config_for_records(cfg: Any) -> Any:
    """The whole config behind ``cfg`` (``cfg`` itself when it is not restricted): the stage's own values
    where it holds them (a stage may replace a section: the warm start's ``train`` and ``algorithm``), the
    unrestricted config's elsewhere.

    Only for records of the run, never for what a stage computes: the config hash in manifests,
    ``train_config.json`` and the model card describe the whole run. A value read from here is not part of
    the stage's fingerprint, so after a change to it the stage is skipped and its records keep the old one."""
    return _overlay(cfg._whole, cfg) if cfg._whole is not None else cfg


def _overlay(whole: RestrictableSection, part: RestrictableSection) -> RestrictableSection:
    if part._restricted_for is None:  # nothing removed below it: the stage's own value
        return part
    update = {
        name: _overlay(getattr(whole, name), value) if isinstance(value, RestrictableSection) else value
        for name, value in part.__dict__.items()
    }
    return whole.model_copy(update=update)
