"""Small synthetic MMPR-style data (drawn shapes), for tests, benchmarks and demos.

Nothing is downloaded: images are drawn with PIL from a seed, questions and answers
are short English sentences about the drawn shapes.
"""

from __future__ import annotations

import json
import os
import random
from typing import List, Sequence, Tuple

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle")


def draw_image(width: int, height: int, seed: int) -> Tuple[Image.Image, str, str]:
    """An RGB image with one large shape; returns (image, color, shape)."""
    rng = random.Random(seed)
    color = rng.choice(sorted(COLORS))
    shape = rng.choice(SHAPES)
    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    side = max(2, min(width, height) // 2)
    x0 = rng.randint(0, max(0, width - side))
    y0 = rng.randint(0, max(0, height - side))
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    if shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.ellipse(box, fill=COLORS[color])
    for _ in range(3):  # a little texture so JPEG sizes are realistic
        x, y = rng.randint(0, width - 1), rng.randint(0, height - 1)
        draw.line((x, y, rng.randint(0, width - 1), rng.randint(0, height - 1)), fill=(30, 30, 30), width=1)
    return img, color, shape


def write_synthetic_mmpr(
    out_dir: str,
    num_records: int = 32,
    image_sizes: Sequence[Tuple[int, int]] = ((96, 64), (64, 96), (80, 80), (160, 48)),
    seed: int = 0,
    multi_image_every: int = 5,
    text_only_every: int = 7,
) -> str:
    """Write ``images/``, ``shapes.jsonl``, ``texts.jsonl`` and ``meta.json``; returns the meta path.

    ``shapes`` holds single-image records plus a multi-image record every
    ``multi_image_every`` and a text-only one every ``text_only_every``; ``texts`` holds
    ``num_records // 4`` text-only records.
    """
    rng = random.Random(seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    shapes: List[dict] = []
    for i in range(num_records):
        if text_only_every and i % text_only_every == text_only_every - 1:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            shapes.append({"id": f"shapes-{i}", "question": f"What is {a} plus {b}?",
                           "chosen": f"{a} plus {b} equals {a + b}.", "rejected": f"{a} plus {b} equals {a + b + 1}."})
            continue
        count = 2 if multi_image_every and i % multi_image_every == multi_image_every - 1 else 1
        names, facts = [], []
        for k in range(count):
            w, h = image_sizes[(i + k) % len(image_sizes)]
            img, color, shape = draw_image(w, h, seed * 100003 + i * 7 + k)
            ext = "png" if (i + k) % 3 == 0 else "jpg"
            name = f"img_{i:05d}_{k}.{ext}"
            img.save(os.path.join(img_dir, name), quality=90) if ext == "jpg" else img.save(os.path.join(img_dir, name))
            names.append(name)
            facts.append((color, shape))
        if count == 1:
            color, shape = facts[0]
            wrong = "circle" if shape == "square" else "square"
            shapes.append({"id": f"shapes-{i}", "image": names[0], "question": "What shape is in the image?",
                           "chosen": f"The image shows a {color} {shape}.", "rejected": f"The image shows a {color} {wrong}."})
        else:
            question = "Image-1: <image>\nImage-2: <image>\nDo the two images show the same color?"
            same = facts[0][0] == facts[1][0]
            shapes.append({"id": f"shapes-{i}", "image": names, "question": question,
                           "chosen": "Yes, they do." if same else "No, they do not.",
                           "rejected": "No, they do not." if same else "Yes, they do."})
    texts = []
    for i in range(max(1, num_records // 4)):
        a = rng.randint(2, 9)
        texts.append({"question": f"How many sides does a shape with {a} corners have?",
                      "chosen": f"It has {a} sides.", "rejected": f"It has {a + 1} sides."})
    for name, rows in (("shapes.jsonl", shapes), ("texts.jsonl", texts)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    meta = {
        "shapes": {"root": "images", "annotation": "shapes.jsonl", "repeat_time": 1, "length": len(shapes)},
        "texts": {"root": "images", "annotation": "texts.jsonl", "repeat_time": 1, "length": len(texts)},
    }
    meta_path = os.path.join(out_dir, "meta.json")
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return meta_path
