"""Time the coreset sampler at the size issue 7 targets and check what the projection costs.

235k x 272 random-normal float32 rows stand in for ~300 images' patches (28x28 each); random
normal data is the worst case for greedy k-center (no cluster structure to exploit). Then, on a
20k subsample, and on 20k clustered rows (closer to real patch features), compare the coverage
radius of the projected greedy with exact greedy (the same algorithm without projection) and with
a random subsample of the same size.

    PYTHONPATH=. .venv/bin/python bench/coreset_bench.py [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from common.engine.coreset import ApproximateGreedyCoresetSampler, RandomSubsampler, coverage_radius


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=235_000)
    parser.add_argument("--dim", type=int, default=272)
    parser.add_argument("--subsample", type=int, default=20_000)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    features = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
    before = _peak_rss_mb()
    sampler = ApproximateGreedyCoresetSampler(args.ratio, device=args.device)
    start = time.perf_counter()
    picked = sampler.sample(features)
    seconds = time.perf_counter() - start
    print(
        f"sample {args.rows} x {args.dim} -> {len(picked)} ({args.ratio:.0%}) on {args.device}: "
        f"{seconds:.1f} s, peak RSS +{_peak_rss_mb() - before:.0f} MB over the features"
    )

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((200, args.dim), dtype=np.float32) * 3
    clustered = centres[rng.integers(0, 200, args.subsample)] + rng.standard_normal(
        (args.subsample, args.dim), dtype=np.float32
    )
    for name, subset in [("random normal", features[: args.subsample]), ("clustered", clustered)]:
        _compare_coverage(name, subset, args.ratio)


def _compare_coverage(name: str, subset: np.ndarray, ratio: float) -> None:
    approx = coverage_radius(subset, ApproximateGreedyCoresetSampler(ratio).sample(subset))
    exact_sampler = ApproximateGreedyCoresetSampler(ratio, projection_dim=subset.shape[1])
    exact = coverage_radius(subset, exact_sampler.sample(subset))
    size = max(1, int(np.ceil(ratio * len(subset))))
    random = coverage_radius(subset, RandomSubsampler(size).sample(subset))
    print(
        f"coverage radius, {len(subset)} {name} rows: projected greedy {approx:.3f}, "
        f"exact greedy {exact:.3f} (approx/exact {approx / exact:.3f}), random {random:.3f}"
    )


if __name__ == "__main__":
    main()
