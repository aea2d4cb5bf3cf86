"""Verdicts given in `patchq review` reach the category's next `fit --auto` as labelled defects."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from aggregator.category_data import model_choice
from common.data.layouts import discover
from common.engine.model_config import PatchCoreConfig
from common.settings import Settings
from common.store.connection import make_engine
from common.store.image_rows import ImageRow, image_ids_by_path, register_images
from common.store.reviews import add_verdict, reviewed_defect_paths
from common.store.run_rows import create_run
from common.store.schema import Model
from producer.fitting import REVIEWED, FitPlan, fit_and_store, with_reviewed_defects
from synthetic.layouts import make_seed_layout

BASE = PatchCoreConfig(image_size=64, coreset_ratio=0.25)


def test_a_reviewed_defect_replaces_the_layouts_record_of_its_image(tmp_path: Path) -> None:
    root = make_seed_layout(tmp_path, "tex", n_good=4, n_bad=0, n_test=2).parent
    records = discover(root)
    test_image = next(r for r in records if r.split == "test")
    marked = with_reviewed_defects(records, [str(test_image.path.absolute()), "/gone.png"])
    assert len(marked) == len(records)  # the missing file is ignored, the test image replaced
    reviewed = [r for r in marked if r.defect_type == REVIEWED]
    assert [(r.path, r.split, r.label) for r in reviewed] == [
        (test_image.path.absolute(), "train", 1)
    ]


def test_fit_review_refit_chooses_on_the_reviewed_defects(tmp_path: Path) -> None:
    root = make_seed_layout(tmp_path / "data", "tex", n_good=20, n_bad=0, n_test=10).parent
    records = discover(root)
    url = f"sqlite:///{tmp_path / 'patchq.db'}"
    settings = Settings.load({"database_url": url, "device": "cpu", "batch_size": 16})
    first = fit_and_store(records, FitPlan(BASE, auto=False), settings)["tex"]

    # A run scores the test images and a reviewer marks the defective ones (odd names).
    test_paths = sorted(str(r.path.absolute()) for r in records if r.split == "test")
    defects = [p for p in test_paths if int(Path(p).stem) % 2]
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        run_id = create_run(session, "lot-1", str(root), 4)
        rows = [ImageRow(category="tex", path=p, model_id=first, split="test") for p in test_paths]
        register_images(session, run_id, rows)
        ids = image_ids_by_path(session, run_id, test_paths)
        for path in test_paths:
            verdict = "defect" if path in defects else "normal"
            add_verdict(session, run_id, ids[path], verdict, "alice")
        add_verdict(session, run_id, ids[defects[0]], "normal", "bob")  # the latest verdict counts
    with Session(engine) as session:
        assert reviewed_defect_paths(session, "tex") == defects[1:]

    second = fit_and_store(records, FitPlan(BASE), settings)["tex"]
    with Session(engine) as session:
        validation = session.scalar(select(Model.validation).where(Model.id == second))
    engine.dispose()
    auto = validation["auto"]
    assert auto["labelled_defects"] == {"folder": 0, "review": len(defects) - 1}
    assert "chosen_on" not in auto  # chosen on labels, cross-fitted, not on synthesised ones
    assert set(auto["report_auroc_by_kind"]) == {REVIEWED}
    assert set(defects[1:]) <= set(auto["selection_paths"])


def test_the_report_says_what_chose_the_model() -> None:
    assert model_choice({}) == ""
    assert "without labelled defects" in model_choice(
        {"chosen": "fine fused", "chosen_on": "synthesised"}
    )
    labelled = model_choice(
        {"chosen": "cosine patch", "labelled_defects": {"folder": 3, "review": 5}}
    )
    assert labelled == (
        "--auto chose cosine patch on 3 labelled defects from the data folder and 5 marked "
        "defect in review"
    )
