"""Three interchangeable categorizers (labels, embedding head, LLM judge) as Ray Data stages.

``add_categories(ds, cfg)`` takes blocks with the row columns plus ``error`` and returns
the same columns plus ``category_error``: good rows get a category in EHD/IHD/MHD/none, or
a null category and ``"<kind>: <reason>"`` (kinds: "unmapped label", "unparsed", and "uncertain"
for the embedding head under ``categorize.embedding.min_confidence``) when the categorizer cannot
decide. Rows with an ``error`` pass through untouched.
"""

from __future__ import annotations

from eqrlhf.config import Config, ConfigError
from eqrlhf.data.categorizers.labels import UNCERTAIN, UNMAPPED_LABEL, UNPARSED, map_labels, validate_label_config

__all__ = ["UNCERTAIN", "UNMAPPED_LABEL", "UNPARSED", "add_categories", "input_block_rows", "validate_categorizer"]


def validate_categorizer(cfg: Config) -> None:
    """Everything that can be checked without Ray: label maps, the head file, the judge prompt."""
    validate_label_config(cfg)
    method = cfg.categorize.method
    if method == "embedding":
        from eqrlhf.data.categorizers.embedding import head_path, load_head

        emb = cfg.categorize.embedding
        path = head_path(cfg)
        try:
            head = load_head(path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"categorize.embedding.head: {err}") from None
        if head.embedding_model != emb.model:
            which = emb.head or f"(unset: the shipped head {path.name})"
            raise ConfigError(
                f"categorize.embedding.head {which} was fitted on '{head.embedding_model}' embeddings "
                f"but categorize.embedding.model is '{emb.model}'"
            )
    elif method == "judge":
        from eqrlhf.data.categorizers.judge import read_judge_template

        read_judge_template(cfg.resolve_path(cfg.categorize.judge.prompt_file))


def input_block_rows(cfg: Config) -> int:
    """Rows per input block: ``data.rows_per_block``, or a few batches for a model-based categorizer, whose
    actor pool needs many small blocks (see :func:`eqrlhf.ray_utils.blocks_for_actor_pool`)."""
    method = cfg.categorize.method
    if method == "labels":
        return cfg.data.rows_per_block
    section = cfg.categorize.embedding if method == "embedding" else cfg.categorize.judge
    return min(cfg.data.rows_per_block, 4 * section.batch_size)


def add_categories(ds, cfg: Config):
    """Append the categorizer chosen by ``categorize.method`` to a Ray Dataset (lazy)."""
    validate_categorizer(cfg)
    method = cfg.categorize.method
    if method == "labels":  # pure lookup: stateless tasks over whole blocks
        return ds.map_batches(map_labels, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=None)
    if method == "embedding":
        from eqrlhf.data.categorizers.embedding import EmbeddingCategorizer

        section, stage = cfg.categorize.embedding, EmbeddingCategorizer
    else:
        from eqrlhf.data.categorizers.judge import JudgeCategorizer

        section, stage = cfg.categorize.judge, JudgeCategorizer
    # model-based: callable classes, so each actor loads its model once
    return ds.map_batches(
        stage,
        fn_constructor_kwargs={"cfg": cfg},
        batch_format="pyarrow",
        batch_size=section.batch_size,
        concurrency=section.concurrency,
    )
