"""The settings that define a PatchCore model besides its memory bank: PatchCoreConfig.

One frozen value, validated once when it is made, stored in every model file and read back
from it (``to_dict`` / ``from_dict``, which fills the fields older files lack so that they
score as they did). Apart from common/engine/patchcore.py so that what a model *is* can be
read, checked and compared without the code that runs it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.data.images import Preprocessing
from common.engine.backbones import backbone_spec
from common.engine.features import BORDERS, REFLECT_PAD
from common.engine.normalise import FUSIONS as Z_FUSIONS
from common.engine.normalise import TAIL_FUSIONS, TAIL_SCALES
from common.errors import PatchqError

SCORERS = ("patch", "global", "fused")
# How the fused scorer combines its parts: tail-probability tests (the default since artifact
# version 4, chosen on bench/accuracy.py and elpv, docs/accuracy.md) or the older z-score max/mean.
FUSIONS = TAIL_FUSIONS + Z_FUSIONS


PRECISIONS = ("auto", "float32", "bfloat16")
DISTANCES = ("l2", "cosine")


@dataclass(frozen=True)
class PatchCoreConfig:
    """Everything that defines a model besides its memory bank; stored in the artifact."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ()  # empty: the backbone's default (stride 8 + stride 16)
    image_size: int = 224
    crop_from: int | None = None  # seed recipe: resize to crop_from, centre-crop image_size
    projection_dim: int | None = None
    coreset_ratio: float = 0.1
    max_bank: int | None = None  # seed recipe: random subsample cap instead of the coreset
    # Memory bank index; "auto" = exact flat for small banks, IVF for large ones, and fit names
    # "ivfpq" when it picks that for the largest (memory_bank.saved_index).
    index: str = "auto"
    num_neighbors: int = 1  # b in eq. 7; 1 = plain max distance, no reweighting
    weights: str | None = None  # weight file, "random" (tests only), or None for the default
    seed: int = 0
    scorer: str = "fused"  # image score: "patch" (s*), "global" (Mahalanobis) or "fused"
    tile_size: int | None = None  # score tiles of this size cut from the image_size input
    tile_overlap: int = 32
    # Backbone arithmetic: "auto" = bfloat16 where the hardware has it natively, else float32.
    # bfloat16 features differ from float32 ones by ~2% (relative), so for scores that are
    # identical across machines of different kinds, pin it to "float32" or "bfloat16".
    precision: str = "auto"
    # How the 3x3 patch average treats the image edge (common/engine/features.py).
    border: str = "zeros"
    fusion: str = "min-p"
    # The tail probabilities' scale (common/engine/normalise.py TailModel).
    tail_scale: str = "std"
    # Patch distance: "l2" (PatchCore's) or "cosine" (unit patch vectors; search_vectors).
    distance: str = "l2"
    # Neighbours only from bank patches within this many grid cells (Chebyshev) of the test
    # patch's cell, for aligned parts; None: anywhere (PatchCore's).
    position_radius: int | None = None
    # Image score: the mean of the largest share of patch distances; None: s*, the largest.
    top_share: float | None = None

    def __post_init__(self) -> None:
        spec = backbone_spec(self.backbone)
        if not self.layers:
            object.__setattr__(self, "layers", spec.default_layers)
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.image_size < 32 or self.image_size % 32:
            raise PatchqError(f"image size must be a multiple of 32, got {self.image_size}")
        if not 0 < self.coreset_ratio <= 1:
            raise PatchqError(f"coreset ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.num_neighbors < 1:
            raise PatchqError(f"num_neighbors must be at least 1, got {self.num_neighbors}")
        if self.scorer not in SCORERS:
            raise PatchqError(f"scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if self.precision not in PRECISIONS:
            raise PatchqError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.fusion not in FUSIONS:
            raise PatchqError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.tail_scale not in TAIL_SCALES:
            raise PatchqError(
                f"tail scale must be one of {', '.join(TAIL_SCALES)}, got {self.tail_scale!r}"
            )
        if self.border not in BORDERS:
            raise PatchqError(f"border must be one of {', '.join(BORDERS)}, got {self.border!r}")
        if self.border == "reflect" and REFLECT_PAD % min(spec.strides[n] for n in self.layers):
            raise PatchqError(
                f"border 'reflect' needs a layer of stride {REFLECT_PAD} or finer, "
                f"got {self.layers}"
            )
        if self.tile_size is not None:
            self._check_tiles()
        self._check_candidates()

    def _check_tiles(self) -> None:
        tile, overlap = self.tile_size or 0, self.tile_overlap
        if tile < 32 or tile % 32 or overlap % 32 or not 0 <= overlap < tile < self.image_size:
            raise PatchqError(
                f"tiles need multiples of 32 with 0 <= overlap < tile size < image size, got "
                f"tile {tile}, overlap {overlap}, image {self.image_size}"
            )

    def _check_candidates(self) -> None:
        if self.distance not in DISTANCES:
            raise PatchqError(
                f"distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}"
            )
        radius = self.position_radius
        if radius is not None and (type(radius) is not int or radius < 0):
            raise PatchqError(
                f"position radius must be a whole number of grid cells >= 0, got {radius!r}; e.g. 2"
            )
        if self.top_share is not None and not 0 < self.top_share <= 1:
            raise PatchqError(f"top share must be in (0, 1], got {self.top_share}; e.g. 0.01")
        if self.top_share is not None and self.num_neighbors > 1:
            # Eq. 7 weighs s* by how isolated the one most anomalous patch's m* is; a mean of
            # many patch distances has no single m* to weigh it by.
            raise PatchqError(
                f"top share {self.top_share} pools many patch distances, but num_neighbors "
                f"{self.num_neighbors} reweights the largest one alone (eq. 7); use one of them"
            )

    @property
    def input_size(self) -> int:
        """The size the backbone sees: a tile when tiling, else the whole image."""
        return self.tile_size or self.image_size

    def preprocessing(self) -> Preprocessing:
        spec = backbone_spec(self.backbone)
        return Preprocessing(
            image_size=self.image_size, crop_from=self.crop_from, mean=spec.mean, std=spec.std
        )

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PatchCoreConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PatchqError(f"unknown model settings {sorted(unknown)}; is patchq too old?")
        values = dict(data)
        values["layers"] = tuple(values.get("layers", ()))  # type: ignore[arg-type]
        values.setdefault("precision", "float32")  # models saved before the field were float32
        # Before artifact version 4: border averages of real neighbours, z-score max fusion.
        values.setdefault("border", "mean")
        values.setdefault("fusion", "max")
        # Before tail scales were named: the mean excess over the median.
        values.setdefault("tail_scale", "mean-excess")
        return cls(**values)  # type: ignore[arg-type]
