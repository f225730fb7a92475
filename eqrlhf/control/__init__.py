"""Controllable safety and helpfulness (Tuan et al. 2024, arXiv 2404.01295).

The operator picks a level per attribute (default ``helpful`` and ``harmless``, ``control.levels`` levels
each) and the request carries it as tags in front of the user prompt: ``[helpful=2][harmless=0] <prompt>``.

- :mod:`eqrlhf.control.encoding`: tags (format, parse, tag a prompt), every setting, special tokens;
- :mod:`eqrlhf.control.binning`: quantile edges over a pool of scores, scores -> levels;
- :mod:`eqrlhf.control.scorers`: helpfulness (reward model) and harmlessness (negated cost, or a refusal judge);
- :mod:`eqrlhf.control.selfgen`: `eqrlhf control-data`, self-generated tagged rows for the existing trainer;
- :mod:`eqrlhf.control.baselines`: training-free prompting and reranking;
- :mod:`eqrlhf.control.serve`: `eqrlhf control-generate`, generation at chosen levels through the rollout pool.

The objectives (``clm``, ``exmate``) live in :mod:`eqrlhf.algorithms.losses`, the evaluation in
:mod:`eqrlhf.evaluate.controllability`.
"""
