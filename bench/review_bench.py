"""Measure one turn of the review loop on real images: the elpv solar-cell demo data.

1. `patchq run` fits the category on train/good and scores everything (train/bad labelled).
2. A simulated reviewer marks every *flagged* test image with the answer key's label
   (test_labels.csv; cells the annotators were unsure about are skipped), as rows of the
   reviews table, exactly as the review page writes them.
3. `patchq fit --update` learns the reviewed normals and prints its own held-out before/after,
   at the threshold the run was flagged with.
4. Then, on every test image with an answer-key label that did not go into the update (most
   were never reviewed), old and new model side by side: false alarms at that threshold,
   defects still flagged, AUROC.
5. `patchq aggregate` relabels the run with the verdicts (and chooses a new threshold).

    PYTHONPATH=. .venv/bin/python bench/review_bench.py --limit 600 [--scorer patch] [--device cuda]

Writes its database and data under --work (default build/review-bench).
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from sqlalchemy import func, select

from common.engine.artifact import load_artifact
from common.engine.bank_update import image_scores
from common.store.aggregate_schema import Prediction
from common.store.connection import open_database
from common.store.model_rows import load_model_bytes
from common.store.reviews import add_verdict
from common.store.run_rows import resolve_run
from common.store.schema import Image, Model
from common.store.threshold_queries import category_threshold
from producer.cli import main as patchq
from producer.demo_data import write_elpv_demo
from producer.fit_update import reviewed_images

RUN = "review-bench"


def answer_key(folder: Path) -> dict[str, int]:
    """test image file name -> 0/1 from test_labels.csv (unsure cells left out)."""
    with (folder / "test_labels.csv").open(encoding="utf-8") as handle:
        return {
            Path(row["path"]).name: int(row["label"])
            for row in csv.DictReader(handle)
            if row["label"]
        }


def simulate_review(url: str, category: str, key: dict[str, int]) -> tuple[int, int]:
    """Mark the flagged test images with their true label; (normal, defect) verdict counts."""
    counts = [0, 0]
    with open_database(url) as (_, sessions), sessions.begin() as session:
        run_id, _ = resolve_run(session, RUN)
        threshold = category_threshold(session, run_id, category)
        assert threshold is not None
        flagged = session.execute(
            select(Image.id, Image.path)
            .join(Prediction, Prediction.image_id == Image.id)
            .where(
                Image.run_id == run_id,
                Image.split == "test",
                Prediction.policy == threshold.policy,
                Prediction.is_anomaly,
            )
        ).all()
        for image_id, path in flagged:
            label = key.get(Path(path).name)
            if label is not None:
                add_verdict(session, run_id, image_id, ("normal", "defect")[label], "answer-key")
                counts[label] += 1
    return counts[0], counts[1]


def compare_on_unused(url: str, category: str, key: dict[str, int], batch_size: int) -> None:
    """Old vs new model on the answer-keyed test images that did not go into the update."""
    with open_database(url) as (_, sessions), sessions() as session:
        run_id, _ = resolve_run(session, RUN)
        threshold = category_threshold(session, run_id, category)
        old_id = session.scalars(select(Image.model_id).where(Image.run_id == run_id)).first()
        new_id = session.scalars(select(func.max(Model.id))).one()
        update = {r.path for r in reviewed_images(session, run_id, category, 0.2, 0).update}
        paths = [
            Path(p)
            for p in session.scalars(
                select(Image.path).where(Image.run_id == run_id, Image.split == "test")
            )
            if Path(p).name in key and Path(p) not in update
        ]
        before = load_artifact(load_model_bytes(session, old_id)[0])
        after = load_artifact(load_model_bytes(session, new_id)[0])
    labels = np.array([key[p.name] for p in paths])
    print(
        f"\nanswer-keyed test images not used for the update: {len(paths)} "
        f"({int((labels == 0).sum())} normal, {int(labels.sum())} defective); "
        f"threshold {threshold.value:.4g} ({threshold.policy})"
    )
    scored = {}
    for name, model in (("before", before), ("after", after)):
        scores = image_scores(model, paths, batch_size)
        scored[name] = values = np.array([scores[p] for p in paths])
        flagged = values >= threshold.value
        print(
            f"  {name:<6} AUROC {roc_auc_score(labels, values):.3f}  "
            f"false alarms {int(flagged[labels == 0].sum())}/{int((labels == 0).sum())}  "
            f"defects flagged {int(flagged[labels == 1].sum())}/{int(labels.sum())}  "
            f"median defect {np.median(values[labels == 1]):.4g}"
        )
    ratio = scored["after"][labels == 1] / scored["before"][labels == 1]
    print(
        f"  defects' scores after / before: min {ratio.min():.3f}, median "
        f"{np.median(ratio):.3f}; {int((ratio < 0.9).sum())} fell by more than 10%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/review-bench"))
    parser.add_argument("--category", default="mono", choices=("mono", "poly"))
    parser.add_argument("--limit", type=int, default=600, help="cells drawn from the category")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--scorer",
        choices=("patch", "global", "fused"),
        help="fit this scorer alone (--no-auto); default: patchq's default, where --auto "
        "chooses among its candidates (the fused scorer on elpv mono)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = write_elpv_demo(
        args.work / "data", [args.category], limit_per_category=args.limit, good_test_share=0.5
    )
    url = f"sqlite:///{args.work / 'patchq.db'}"
    os.environ["PATCHQ_DATABASE_URL"] = url
    common = ["--device", args.device, "--batch-size", str(args.batch_size)]
    scorer = ["--scorer", args.scorer, "--no-auto"] if args.scorer else []
    patchq(["run", str(data), "--category", args.category, "--run", RUN, *scorer,
            "--out", str(args.work / "out"), *common])  # fmt: skip
    key = answer_key(data / args.category)
    normal, defect = simulate_review(url, args.category, key)
    print(f"\nsimulated review of the flagged test images: {normal} normal, {defect} defect")
    patchq(["fit", "--update", args.category, "--from-run", RUN, *common])
    compare_on_unused(url, args.category, key, args.batch_size)
    patchq(["aggregate", RUN, "--out", str(args.work / "out")])


if __name__ == "__main__":
    main()
