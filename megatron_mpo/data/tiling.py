"""InternVL dynamic tiling: an image becomes a grid of square tiles plus a thumbnail.

Reproduces InternVL's ``dynamic_preprocess`` / ``find_closest_aspect_ratio``: among
grids ``(cols, rows)`` with ``min_num <= cols*rows <= max_num`` (visited in InternVL's
order: by tile count) take the one whose aspect ratio is closest to the image's; on a
tie the later (larger) grid wins only when the image area exceeds half the grid's pixel
area. The image is resized (bicubic) to the grid, cut into row-major tiles and, when
there is more than one tile, a bicubic thumbnail of the whole image is appended. Tiles
are normalised with ImageNet mean/std. The tile size is a parameter (448 for released
models, e.g. 56 for tiny test models).
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)


# Upper bound of a tile budget: the grid search costs O(max_num log max_num), so its input
# must be bounded (a sample's max_dynamic_patch is clamped to data.max_tiles, itself <= this).
MAX_TILES = 256


@functools.lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> Tuple[Tuple[int, int], ...]:
    """Grids ``(cols, rows)`` in InternVL's visiting order (sorted by tile count).

    InternVL collects the grids in a set and sorts it by tile count; grids of equal count
    keep the set's iteration order, which decides ties. The set is filled here with the
    same grids in the order of their first insertion in InternVL's triple loop
    (``n = max(min_num, cols, rows)``, then cols, rows), so it iterates identically,
    without InternVL's O(max_num**3) loop.
    """
    if min_num < 1 or max_num > MAX_TILES:
        raise ValueError(f"tile grid search needs min_num >= 1 and max_num <= {MAX_TILES}, "
                         f"got min_num={min_num}, max_num={max_num}")
    grids = [(i, j) for i in range(1, max_num + 1) for j in range(1, max_num // i + 1) if i * j >= min_num]
    ratios = set(sorted(grids, key=lambda g: (max(min_num, *g), g[0], g[1])))
    return tuple(sorted(ratios, key=lambda x: x[0] * x[1]))


def choose_grid(width: int, height: int, image_size: int, min_num: int = 1, max_num: int = 12) -> Tuple[int, int]:
    """The ``(cols, rows)`` grid InternVL picks for a ``width`` x ``height`` image."""
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def count_tiles(width: int, height: int, image_size: int, max_num: int, min_num: int = 1, use_thumbnail: bool = True) -> int:
    """Number of tiles (thumbnail included) without touching pixels."""
    cols, rows = choose_grid(width, height, image_size, min_num, max_num)
    blocks = cols * rows
    return blocks + (1 if use_thumbnail and blocks != 1 else 0)


def tiles_per_image(max_tiles: int, num_images: int) -> int:
    """Tile budget of each image of a multi-image sample (InternVL: max(1, max // n))."""
    return max(1, max_tiles // max(1, num_images))


def dynamic_preprocess(
    image: Image.Image, image_size: int, max_num: int, min_num: int = 1, use_thumbnail: bool = True
) -> List[Image.Image]:
    """The tiles of ``image`` (RGB PIL images of ``image_size`` squared), row-major."""
    width, height = image.size
    cols, rows = choose_grid(width, height, image_size, min_num, max_num)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for i in range(cols * rows):
        x, y = (i % cols) * image_size, (i // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def normalize_tiles(tiles: List[Image.Image]) -> torch.Tensor:
    """``[N, 3, S, S]`` float32 tensor of the tiles, ImageNet-normalised.

    Same arithmetic as torchvision's ``ToTensor`` + ``Normalize`` (x / 255, - mean, / std),
    done in place on one preallocated tensor.
    """
    if not tiles:
        raise ValueError("no tiles")
    width, height = tiles[0].size
    out = torch.empty(len(tiles), 3, height, width, dtype=torch.float32)
    for k, tile in enumerate(tiles):
        rgb = tile if tile.mode == "RGB" else tile.convert("RGB")
        out[k].copy_(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
    out.div_(255.0)
    out.sub_(_MEAN).div_(_STD)
    return out


def image_to_tiles(
    image: Image.Image, image_size: int, max_num: int, min_num: int = 1, use_thumbnail: bool = True
) -> torch.Tensor:
    """Tile and normalise one image: ``[N, 3, image_size, image_size]``."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return normalize_tiles(dynamic_preprocess(rgb, image_size, max_num, min_num, use_thumbnail))
