"""Scoring a run's images, one concern per module.

- `batch`: the task body `score_batch`, which the Celery task and the in-process path share;
- `stages`: the steps of one batch (claim, decode, backbone and search, write) and its outcome;
- `context`: `ScoringContext`, what every batch of one scoring process shares;
- `model_cache`: `ModelProvider`, the per-process cache of ready-to-score models;
- `isolation`: `Isolation`, which lets a batch a worker was lost on be scored alone.

common.pipelined runs the stages of several batches at once from threads.
"""
