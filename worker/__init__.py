"""The Celery side of patchq: an app configured from Settings and one thin scoring task.

The task body lives in common.scoring, so workers add delivery guarantees and nothing else.
"""
