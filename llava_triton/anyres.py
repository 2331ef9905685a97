"""LLaVA-NeXT's dynamic resolution ("anyres"): how an image becomes tiles, and tiles become image tokens.

An image of (height, width) is resized, keeping its aspect ratio, into the best of the checkpoint's
`image_grid_pinpoints` (transformers' `select_best_resolution`), padded to it and cut into a grid of
`rows x cols` tiles of image_size x image_size; a base tile (the whole image squashed to one tile) comes
first. Each tile goes through the vision encoder and projector on its own: `side x side` embeddings a
tile (side = image_size // patch_size, CLS dropped).

The language model then sees, per image (transformers' `LlavaNextModel.pack_image_features`):

    base tile's side*side embeddings, row by row
    for each row of the grid's feature map (rows*side rows, cols*side columns), cropped to the image's
    own aspect ratio (the padding removed): that row's embeddings, then `image_newline`

`num_image_tokens` counts them; `pack_index` says, for every one of them, which tile embedding (or the
newline) it is, so packing is one gather on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers.image_processing_utils import select_best_resolution

from .spec import IMAGE_NEWLINE_FILE, ModelSpec


@dataclass(frozen=True)
class TileLayout:
    """One image's tiles and image tokens."""

    height: int  # the image's, as decoded
    width: int
    rows: int  # the grid, base tile not included
    cols: int
    side: int  # feature rows (and columns) of one tile
    # The grid's feature map after unpadding: rows kept [top, bottom), columns kept [left, right).
    top: int
    bottom: int
    left: int
    right: int

    @property
    def num_tiles(self) -> int:
        return 1 + self.rows * self.cols

    @property
    def num_image_tokens(self) -> int:
        kept_rows = self.bottom - self.top
        return self.side * self.side + kept_rows * (self.right - self.left) + kept_rows  # base, grid, newlines


def tile_layout(height: int, width: int, spec: ModelSpec) -> TileLayout:
    """The layout of an image of `height` x `width` pixels under `spec`'s pinpoints (a llava_next spec)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    best_height, best_width = select_best_resolution((height, width), [list(p) for p in spec.image_grid_pinpoints])
    rows, cols = best_height // spec.image_size, best_width // spec.image_size
    side = spec.image_size // spec.patch_size
    feature_rows, feature_cols = rows * side, cols * side
    top, bottom, left, right = 0, feature_rows, 0, feature_cols
    # transformers' unpad_image, on the feature map: the side that was padded loses its padding, the
    # same amount at each end (the 7-digit rounding is theirs: it absorbs float error before int()).
    if width / height > feature_cols / feature_rows:
        kept = int(round(height * (feature_cols / width), 7))
        padding = (feature_rows - kept) // 2
        top, bottom = padding, feature_rows - padding
    else:
        kept = int(round(width * (feature_rows / height), 7))
        padding = (feature_cols - kept) // 2
        left, right = padding, feature_cols - padding
    return TileLayout(height, width, rows, cols, side, top, bottom, left, right)


def max_tiles_per_image(spec: ModelSpec) -> int:
    """The most tiles any image can make under the spec (1 for LLaVA-1.5)."""
    if not spec.anyres:
        return 1
    return 1 + max((h // spec.image_size) * (w // spec.image_size) for h, w in spec.image_grid_pinpoints)


def pack_index(layouts: Sequence[TileLayout]) -> np.ndarray:
    """(sum of num_image_tokens,) int64: for each image token of the request, in order, its row in

        source = concat(every tile's embeddings, flattened to (num_tiles * side * side, C), image_newline)

    (the newline is the last row). The tiles are the request's, image after image, each image's base
    tile first, as the preprocess model sends them.
    """
    parts = []
    tile_start = 0
    newline = sum(layout.num_tiles for layout in layouts) * (layouts[0].side ** 2 if layouts else 0)
    for layout in layouts:
        per_tile = layout.side * layout.side
        base = tile_start * per_tile + np.arange(per_tile, dtype=np.int64)
        r = np.arange(layout.top, layout.bottom, dtype=np.int64)[:, None]  # feature-map rows kept
        c = np.arange(layout.left, layout.right, dtype=np.int64)[None, :]  # feature-map columns kept
        tile = 1 + (r // layout.side) * layout.cols + (c // layout.side)  # grid tiles follow the base, row-major
        within = (r % layout.side) * layout.side + (c % layout.side)
        grid = (tile_start + tile) * per_tile + within  # (kept rows, kept cols)
        with_newlines = np.concatenate([grid, np.full((grid.shape[0], 1), newline, dtype=np.int64)], axis=1)
        parts += [base, with_newlines.reshape(-1)]
        tile_start += layout.num_tiles
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def load_image_newline(version_dir: str | Path):
    """The (text_hidden_size,) `image_newline` tensor the export saved in the language model's version
    directory (spec.IMAGE_NEWLINE_FILE), on the CPU in its saved dtype."""
    from safetensors.torch import load_file

    path = Path(version_dir) / IMAGE_NEWLINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a LLaVA-NeXT language model needs the image_newline the "
                                "export writes (export again)")
    return load_file(path)["image_newline"]
