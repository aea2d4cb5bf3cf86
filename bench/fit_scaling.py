"""Fit time and peak memory as the good images grow (issue 25, item 2), and what the chunked
coreset costs in accuracy against the greedy coreset over all patches.

    PYTHONPATH=. .venv/bin/python -m bench.fit_scaling --sizes 200,800,3000 [--code DIR]
        [--label-free]
    PYTHONPATH=. .venv/bin/python -m bench.fit_scaling --accuracy --train 640 --draws 3

Scaling: the largest size's good images of the benchmarks' stripes texture (synthetic
``make_normal``, 224 px, seeds 0..N-1) are written once under ``--folder`` (kept for reruns);
each size fits the first N of them in a fresh child process with the default settings (one
model, 20% held out for calibration, as ``fit_category``) and reports its stages' times, the
bank and the child's peak RSS (``ru_maxrss``, imports included). ``--code DIR`` runs the
children on another checkout (``git archive main | tar -x -C DIR``) for the figures before.
``--label-free`` fits as `patchq fit` does by default on good images alone: the label-free
choice (``fit_label_free``), which on a texture fits two candidates (the default and `fine`)
and scores synthesised defects to choose; the fit time and peak RSS are then all of it, the
stage columns the chosen candidate's.

Accuracy: per draw, the train images' patch features are extracted once and reduced two ways,
by greedy over all of them (fit before chunking) and chunk by chunk (fit now, CHUNK_ROWS); each
bank then scores test images neither saw: s* (the largest patch distance) AUROC of the test
normals against each tiny and local defect kind, the mean s* of the test normals (how closely
the bank covers unseen normal patches) and each selection's time; then the mean over draws.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from common.data.layouts import ImageRecord
from common.engine.features import PatchFeatureExtractor
from common.engine.fit import DEFAULT_HOLDOUT, FitResult, fit_category
from common.engine.label_free import fit_label_free
from common.engine.memory_bank import MemoryBank
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import build_extractor, extract_patches, resolve_device
from synthetic.layouts import save
from synthetic.textures import LOCAL_KINDS, TINY_KINDS, make_defect, make_normal

SIZE = 224
FOLDER = Path("build/fit-scaling")  # git-ignored; kept between runs as an image cache
KINDS = TINY_KINDS + LOCAL_KINDS  # the defects s*, which the bank decides, is there to find
STAGES = ("features_s", "coreset_s", "validation_s", "search_cost_s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="200,800,3000", help="good images per fit")
    parser.add_argument("--folder", type=Path, default=FOLDER, help="where the images go")
    parser.add_argument("--code", type=Path, help="run the fits on this checkout instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--label-free", action="store_true", help="as `patchq fit` by default")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--accuracy", action="store_true", help="chunked vs all-at-once coreset")
    parser.add_argument("--train", type=int, default=640, help="--accuracy: bank images")
    parser.add_argument("--draws", type=int, default=3, help="--accuracy: image sets")
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(fit_once(args.folder, args.child, args.device, args.label_free)))
    elif args.accuracy:
        compare_coresets(args.train, args.draws, args.device)
    else:
        sizes = [int(n) for n in args.sizes.split(",")]
        write_good(args.folder, max(sizes))
        print(table([fit_in_child(args, n) for n in sizes]))


def write_good(folder: Path, count: int) -> None:
    """Good images 0..count-1 as PNG files; those already written are kept."""
    for i in range(count):
        path = folder / f"{i:05d}.png"
        if not path.exists():
            save(make_normal(SIZE, i), path)


def fit_in_child(args: argparse.Namespace, count: int) -> dict:
    """One fit of ``count`` images in a fresh interpreter: its figures and the load around it
    (the machine is shared, so the load says how far to trust the times)."""
    code = args.code or Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": str(code.resolve())}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(count)]
    command += ["--folder", str(args.folder.resolve()), "--device", args.device]
    command += ["--label-free"] if args.label_free else []
    load = os.getloadavg()[0]
    done = subprocess.run(command, env=env, cwd=code, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1]) | {"load": (load, os.getloadavg()[0])}


def fit_once(folder: Path, count: int, device: str, label_free: bool) -> dict:
    """Fit the first ``count`` good images as `patchq fit` fits one model (or, ``label_free``,
    as it chooses one by default); its figures."""
    paths = sorted(folder.glob("*.png"))[:count]
    records = [ImageRecord(p, "stripes", "train", 0, "good") for p in paths]
    start = time.perf_counter()
    chosen = "one model"
    if label_free:
        auto = fit_label_free(records, PatchCoreConfig(), DEFAULT_HOLDOUT, device)
        result: FitResult = auto.fit
        chosen = auto.chosen
    else:
        result = fit_category(records, PatchCoreConfig(), DEFAULT_HOLDOUT, device)  # bars on stderr
    return {
        "images": count,
        "model": chosen,
        "bank": result.model.bank.size,
        "wall_s": time.perf_counter() - start,
        "timings": result.timings,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def table(rows: list[dict]) -> str:
    """The fits as a markdown table."""
    lines = [
        "| good images | model | bank patches | fit | "
        + " | ".join(STAGES)
        + " | peak RSS | load |",
        "|---" * (6 + len(STAGES)) + "|",
    ]
    for row in rows:
        stages = " | ".join(f"{row['timings'].get(s, 0):.1f}" for s in STAGES)
        load = "-".join(f"{x:.1f}" for x in row["load"])
        lines.append(
            f"| {row['images']:,} | {row['model']} | {row['bank']:,} | {row['wall_s']:.1f} s | "
            f"{stages} | {row['peak_rss_mb'] / 1024:.2f} GB | {load} |"
        )
    return "\n".join(lines)


def compare_coresets(train: int, draws: int, device: str) -> None:
    """Per draw and on average: the all-at-once and the chunked coreset on the same features."""
    figures: dict[str, list[dict[str, float]]] = {"all at once": [], "chunked": []}
    for draw in range(draws):
        for name, result in _one_draw(train, draw, device).items():
            figures[name].append(result)
            print(f"draw {draw} {name}: " + _line(result), flush=True)
    for name, results in figures.items():
        mean = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
        print(f"mean over {draws} draws, {name}: " + _line(mean))


def _one_draw(train: int, draw: int, device: str) -> dict[str, dict[str, float]]:
    # Here, not at the top: --code runs this file's fits on checkouts that predate them.
    from common.engine.coreset import CHUNK_ROWS, ApproximateGreedyCoresetSampler, ChunkedSelection

    config = PatchCoreConfig(precision="float32")  # the same figures on any CPU
    extractor = build_extractor(config, resolve_device(device))
    base = 100_000 * draw
    features = _features(extractor, config, [make_normal(SIZE, base + i) for i in range(train)])
    tests = _test_features(extractor, config, base)
    sampler = ApproximateGreedyCoresetSampler(config.coreset_ratio, seed=config.seed, device=device)
    results = {}
    for name, chunk_rows in (("all at once", None), ("chunked", CHUNK_ROWS)):
        selection = ChunkedSelection(sampler.sample, chunk_rows)
        for image in features:
            selection.add(image, np.zeros(len(image)))
        bank = selection.result()[0]
        results[name] = _judge(bank, tests) | {"select_s": selection.seconds}
    return results


def _features(
    extractor: PatchFeatureExtractor, config: PatchCoreConfig, images: list[np.ndarray]
) -> list[np.ndarray]:
    """Each image's (patches, D) features, in batches of 32."""
    found: list[np.ndarray] = []
    preprocessing = config.preprocessing()
    for start in range(0, len(images), 32):
        batch = [preprocessing.to_tensor(Image.fromarray(a)) for a in images[start : start + 32]]
        patches = extract_patches(extractor, config, torch.stack(batch))
        found += list(patches.reshape(len(patches), -1, patches.shape[-1]))
    return found


def _test_features(
    extractor: PatchFeatureExtractor, config: PatchCoreConfig, base: int
) -> dict[str, list[np.ndarray]]:
    """100 test normals and 25 images of each kind, on seeds no train image has."""
    normals = [make_normal(SIZE, base + 5000 + i) for i in range(100)]
    tests = {"good": _features(extractor, config, normals)}
    for k, kind in enumerate(KINDS):
        images = [make_defect(SIZE, base + 10_000 + 100 * k + i, kind) for i in range(25)]
        tests[kind] = _features(extractor, config, images)
    return tests


def _judge(bank: np.ndarray, tests: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """s* AUROC per kind against the test normals, and the test normals' mean s*."""
    index = MemoryBank(bank, index="flat")
    s_star = {
        kind: np.array([index.search(image, 1)[0].max() for image in images])
        for kind, images in tests.items()
    }
    normal = s_star.pop("good")
    figures = {"normal_s": float(normal.mean()), "bank": float(len(bank))}
    for kind, scores in s_star.items():
        labels = np.r_[np.zeros(len(normal)), np.ones(len(scores))]
        figures[kind] = float(roc_auc_score(labels, np.r_[normal, scores]))
    return figures


def _line(figures: dict[str, float]) -> str:
    aurocs = ", ".join(f"{kind} {figures[kind]:.4f}" for kind in KINDS)
    return (
        f"bank {figures['bank']:,.0f}, select {figures['select_s']:.1f} s, "
        f"test normals' mean s* {figures['normal_s']:.3f}, s* AUROC {aurocs}"
    )


if __name__ == "__main__":
    main()
