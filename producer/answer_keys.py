"""`patchq run --labels FILE`: labels known from elsewhere, recorded as verdicts on a run.

A seed layout's `test/` images are unlabelled on disk, so that fit never validates or chooses
on them; an answer key for them (an inspection lab's findings, the demo's `test_labels.csv`)
is what judges a model on images nothing was fitted or chosen on. Recorded as verdicts of the
reviewer "answer key <file name>", the labels count in `patchq aggregate` as reviewers'
verdicts do, stay in the database for later aggregates and reports, and teach the model its
false alarms through `fit --update --from-run` like any other verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from common.data.layouts import LayoutError, iter_archive
from common.store.reviews import record_known_labels


@dataclass(frozen=True)
class AnswerKey:
    """One manifest's labelled rows: absolute image path -> 0 normal / 1 defect."""

    source: Path
    labels: dict[str, int]

    @classmethod
    def read(cls, source: Path) -> AnswerKey:
        """Read it whole (answer keys cover test sets, not archives), before any scoring, so a
        wrong file fails at once; rows without a label (unsure) are skipped."""
        if source.is_dir():
            raise LayoutError(
                f"{source}: --labels needs a .csv/.txt manifest of paths with a label column, "
                "not a folder"
            )
        labels = {
            str(record.path.absolute()): record.label
            for record in iter_archive(source, category="")
            if record.label is not None
        }
        return cls(source, labels)

    def record(self, sessions: sessionmaker[Session], run_id: int) -> None:
        """Record the labels as verdicts on the run's images, once, and say how many matched."""
        with sessions.begin() as session:
            reviewer = f"answer key {self.source.name}"
            recorded = record_known_labels(session, run_id, self.labels, reviewer)
        print(
            f"answer key {self.source}: {recorded} new labels of {len(self.labels)} "
            "recorded as verdicts"
        )
