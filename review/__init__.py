"""The review page (`patchq review`): people triage a run's flagged images, verdicts go to SQL.

A package of its own because it is a long-running server with its own dependency (tornado),
like worker/; it reads what the aggregator wrote and imports nothing heavy (no torch, no FAISS).
"""
