"""`make bench`: patchq's speed and accuracy, side by side with the naive reference, on one run.

One machine's absolute times are noise (other load, turbo, thermal state), so every figure that
matters is also given as a ratio to the naive notebook PatchCore measured in the same run on the
same images and backbone. Data: the elpv-dataset demo category ``mono`` (real solar-cell
images). The bank is built from ``--train`` good images; scoring and AUROC use held-out good
images plus the labelled defects, never bank images.

Prints a table and writes everything to ``--json`` (default bench-results.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sqlalchemy import select

from bench.naive import NaivePatchCore, score_all
from common.data.batches import iter_batches
from common.data.images import load_rgb
from common.data.layouts import ImageRecord, discover
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.fit import fit_category
from common.engine.memory_bank import MemoryBank
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import PatchCore, build_extractor
from common.scoring.batch import score_batch
from common.scoring.context import ScoringContext
from common.scoring.model_cache import ModelProvider
from common.scoring.stages import TIMING_KEYS
from common.store.connection import open_database
from common.store.image_rows import ImageRow, register_images
from common.store.model_rows import store_model
from common.store.run_rows import create_run
from common.store.schema import Image, Score
from producer.demo_data import write_elpv_demo

CATEGORY = "mono"
HOLDOUT = 0.2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("demo-data-full"), help="demo data root")
    parser.add_argument("--train", type=int, default=300, help="good images in the memory bank")
    parser.add_argument("--eval-normal", type=int, default=60, help="held-out good images scored")
    parser.add_argument("--eval-defect", type=int, default=60, help="labelled defects scored")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--bank-sizes", default="10000,100000,300000,1000000", help="search-cost sweep sizes"
    )
    parser.add_argument(
        "--approx-max", type=int, default=300_000, help="largest bank to build HNSW/IVF for"
    )
    parser.add_argument(
        "--precision", default="auto", help="backbone arithmetic: auto, float32, bfloat16"
    )
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    return parser.parse_args(argv)


def select_records(
    root: Path, n_train: int, n_normal: int, n_defect: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(records for fit: train good + defects, evaluation records) of the demo category."""
    write_elpv_demo(root)
    records = discover(root, [CATEGORY])
    good = [r for r in records if r.split == "train" and r.label == 0]
    # Shuffled: the files are in module order, and later modules look different from earlier ones.
    good = [good[i] for i in np.random.default_rng(0).permutation(len(good))]
    defects = [r for r in records if r.label == 1][:n_defect]
    n_good = min(len(good), round(n_train / (1 - HOLDOUT)))
    fit_records = good[:n_good] + defects
    evaluation = good[n_good : n_good + n_normal] + defects
    return fit_records, evaluation


def bench_fit(records: list[ImageRecord], config: PatchCoreConfig, batch_size: int) -> dict:
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    result = fit_category(records, config, HOLDOUT, "cpu", batch_size, progress=False)
    return {
        "result": result,
        "total_s": time.perf_counter() - start,
        "features_s": result.timings["features_s"],
        "coreset_s": result.timings["coreset_s"],
        "bank_images": result.validation["bank_images"],
        "bank_size": result.validation["bank_size"],
        "peak_rss_growth_mb": _peak_rss_mb() - rss_before,
        "validation_auroc": result.validation["auroc"],
    }


def bench_scoring(
    model: PatchCore, evaluation: list[ImageRecord], batch_size: int, workdir: Path
) -> dict:
    """The real in-process path: SQLite run, `score_batch` per batch, rows written."""
    with open_database(f"sqlite:///{workdir / 'bench.db'}") as (_, factory):
        data = save_artifact(model, CATEGORY)
        with factory.begin() as session:
            model_id = store_model(
                session, CATEGORY, data, artifact_hash(data), model.config.backbone,
                model.config.to_dict(), None, model.bank.size,
            )  # fmt: skip
            run_id = create_run(session, "bench", "bench", batch_size)
            rows = [
                ImageRow(category=CATEGORY, path=str(r.path), model_id=model_id, label=r.label)
                for r in evaluation
            ]
            register_images(session, run_id, rows)
            ids = list(session.scalars(select(Image.id).where(Image.run_id == run_id)))
        provider = ModelProvider(factory, workdir / "cache", device="cpu")
        provider.get(model_id)  # load once, as a worker does before its first batch
        context = ScoringContext(factory, provider, "bench")
        timings = dict.fromkeys(TIMING_KEYS, 0.0)
        start = time.perf_counter()
        for i in range(0, len(ids), batch_size):
            outcome = score_batch(context, run_id, ids[i : i + batch_size])
            for key, value in outcome.timings.items():
                timings[key] += value
        elapsed = time.perf_counter() - start
        with factory() as session:
            scored = session.execute(
                select(Image.label, Score.score).join(Score, Score.image_id == Image.id)
            ).all()
    labels, scores = zip(*scored, strict=True)
    n = len(ids)
    return {
        "images": n,
        "ms_per_image": 1000 * elapsed / n,
        "images_per_s": n / elapsed,
        "split_ms_per_image": {k.removesuffix("_s"): 1000 * v / n for k, v in timings.items()},
        "auroc": float(roc_auc_score(labels, scores)),
    }


def bench_naive(
    model: PatchCore, bank_paths: list[Path], evaluation: list[ImageRecord], seed: int
) -> dict:
    """The notebook recipe on the same bank images, backbone and evaluation images."""
    # A notebook runs the backbone in float32, as PyTorch does unless told otherwise.
    extractor = build_extractor(replace(model.config, precision="float32"), torch.device("cpu"))
    start = time.perf_counter()
    naive = NaivePatchCore.fit(extractor, model.preprocessing, bank_paths, seed)
    fit_s = time.perf_counter() - start
    scores, seconds = score_all(naive, [r.path for r in evaluation])
    labels = [r.label for r in evaluation]
    return {
        "fit_s": fit_s,
        "bank_size": naive.index.ntotal,
        "ms_per_image": 1000 * seconds,
        "images_per_s": 1 / seconds,
        "auroc": float(roc_auc_score(labels, scores)),
    }


def bench_index_choice(model: PatchCore, evaluation: list[ImageRecord], batch_size: int) -> list:
    """Search time and patch-score (s*) AUROC on the real bank, for each index type."""
    paths = [r.path for r in evaluation]
    patches = np.concatenate(
        [
            model.extractor(decoded.tensor).numpy()
            for _, decoded in iter_batches(paths, model.preprocessing, batch_size)
        ]
    )
    flat = patches.reshape(-1, patches.shape[-1])
    labels = [r.label for r in evaluation]
    rows = []
    for index in ("flat", "ivf", "hnsw"):
        bank = MemoryBank(model.bank.vectors, index=index)
        start = time.perf_counter()
        distances, _ = bank.search(flat, 1)
        seconds = time.perf_counter() - start
        s_star = distances[:, 0].reshape(len(paths), -1).max(axis=1)
        rows.append(
            {"index": index, "ms_per_image": 1000 * seconds / len(paths),
             "patch_auroc": float(roc_auc_score(labels, s_star))}
        )  # fmt: skip
    return rows


def bench_search(
    model: PatchCore, evaluation: list[ImageRecord], sizes: list[int], approx_max: int
) -> list[dict]:
    """Search cost of one image's patches vs bank size, per index type, with recall@1."""
    base = model.bank.vectors
    queries = model.extractor(
        torch.stack([model.preprocessing.to_tensor(load_rgb(evaluation[-1].path))])
    ).numpy()
    queries = queries.reshape(-1, queries.shape[-1])
    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        # Real bank patches, repeated with small noise to reach sizes beyond the real bank.
        picks = rng.integers(0, len(base), size)
        noise = rng.normal(0, 0.05 * base.std(), (size, base.shape[1])).astype(np.float32)
        vectors = base[picks] + noise
        exact = None
        for index in ("flat", "hnsw", "ivf"):
            if index != "flat" and size > approx_max:
                continue
            start = time.perf_counter()
            bank = MemoryBank(vectors, index=index)
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            _, found = bank.search(queries, 1)
            search_ms = 1000 * (time.perf_counter() - start)
            if exact is None:
                exact = found
            recall = float((found[:, 0] == exact[:, 0]).mean())
            rows.append(
                {"bank": size, "index": index, "build_s": build_s,
                 "ms_per_image": search_ms, "recall_at_1": recall}
            )  # fmt: skip
    return rows


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(results: dict) -> None:
    fit, scoring, naive = results["fit"], results["scoring"], results["naive"]
    print(f"\n== fit (mono, {fit['bank_images']} bank images) ==")
    print(
        f"features {fit['features_s']:.1f} s  coreset {fit['coreset_s']:.1f} s  "
        f"total {fit['total_s']:.1f} s  bank {fit['bank_size']:,} patches  "
        f"peak RSS growth {fit['peak_rss_growth_mb']:.0f} MB"
    )
    print("\n== scoring, in-process end to end (SQLite writes included) ==")
    print(f"{'':>12} {'ms/img':>8} {'img/s':>8} {'AUROC':>7} {'bank':>9}")
    print(
        f"{'patchq':>12} {scoring['ms_per_image']:8.1f} {scoring['images_per_s']:8.1f} "
        f"{scoring['auroc']:7.3f} {fit['bank_size']:9,}"
    )
    print(
        f"{'naive':>12} {naive['ms_per_image']:8.1f} {naive['images_per_s']:8.1f} "
        f"{naive['auroc']:7.3f} {naive['bank_size']:9,}"
    )
    arithmetic = "bfloat16" if results["backbone_bfloat16"] else "float32"
    print(
        f"speed-up vs naive: {results['speedup_vs_naive']:.1f}x  (patchq: fused score, "
        f"{results['index']} index, {arithmetic} backbone; naive: s*, float32)"
    )
    split = "  ".join(f"{k} {v:.1f}" for k, v in scoring["split_ms_per_image"].items())
    print(f"patchq ms/image split: {split}")
    print(f"\n== index choice on the real bank ({fit['bank_size']:,} patches) ==")
    print(f"{'index':>6} {'ms/img':>8} {'s* AUROC':>9}")
    for row in results["index_choice"]:
        print(f"{row['index']:>6} {row['ms_per_image']:8.1f} {row['patch_auroc']:9.3f}")
    print(f"\n== search cost vs bank size (one image = {results['patches']} patches) ==")
    print(f"{'bank':>9} {'index':>6} {'build s':>8} {'ms/img':>8} {'recall@1':>9}")
    for row in results["search"]:
        print(
            f"{row['bank']:9,} {row['index']:>6} {row['build_s']:8.2f} "
            f"{row['ms_per_image']:8.1f} {row['recall_at_1']:9.3f}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    fit_records, evaluation = select_records(
        args.data, args.train, args.eval_normal, args.eval_defect
    )
    config = PatchCoreConfig(precision=args.precision)
    fit = bench_fit(fit_records, config, args.batch_size)
    result = fit.pop("result")
    # Defects were used in fit's validation; none is in the bank, so scoring them is honest.
    with tempfile.TemporaryDirectory() as workdir:
        scoring = bench_scoring(result.model, evaluation, args.batch_size, Path(workdir))
    bank_paths = [r.path for r in fit_records if r.path in result.bank_paths]
    naive = bench_naive(result.model, bank_paths, evaluation, config.seed)
    sizes = [int(s) for s in args.bank_sizes.split(",")]
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()},
        "fit": fit,
        "scoring": scoring,
        "naive": naive,
        "speedup_vs_naive": scoring["images_per_s"] / naive["images_per_s"],
        "index": result.model.bank.index_type,
        "backbone_bfloat16": result.model.extractor.bfloat16,
        "index_choice": bench_index_choice(result.model, evaluation, args.batch_size),
        "patches": (config.image_size // 8) ** 2,
        "search": bench_search(result.model, evaluation, sizes, args.approx_max),
    }  # fmt: skip
    print_table(results)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
