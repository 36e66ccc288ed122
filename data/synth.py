"""The built-in dataset: simple scenes of coloured shapes, five truthful captions each.

Everything a caption says (count, size, colour, shape, position) is drawn in the image and
nothing else is, so a model can only score well by reading the image. Written in the Kaggle
layout (Images/*.jpg + captions.txt) with a `captune.yaml` preset for CPU training.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

CANVAS = 128
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 190), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (13, 17), "large": (27, 33)}  # side length range in pixels
POSITIONS = {"left": (0, 43), "middle": (43, 85), "right": (85, 128)}  # x band of every shape
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
BACKGROUNDS = ((245, 245, 240), (230, 235, 245), (240, 232, 220), (225, 240, 228))

PRESET = """\
# captune preset for the built-in synthetic dataset (written by `captune data synth`).
# Nothing is downloaded: small encoders with random weights, kept frozen, on 64-pixel images.
# Their features are computed once and cached, so both architectures train in about two
# minutes on a 2-core CPU. Options given on the command line win over these.
cnn-lstm:
  encoder: vgg-small
  pretrained: false
  fine_tune: false
  image_size: 64
  embed_size: 128
  hidden_size: 256
  vocab_threshold: 2
  lr: 0.002
  batch_size: 64
  epochs: 20
resnet-gru:
  encoder: resnet18
  pretrained: false
  fine_tune: false
  image_size: 64
  embed_size: 128
  hidden_size: 256
  vocab_threshold: 2
  lr: 0.002
  batch_size: 64
  epochs: 20
"""


@dataclass(frozen=True)
class Scene:
    count: int
    size: str
    colour: str
    shape: str
    position: str

    def captions(self) -> list[str]:
        """Five differently worded, equally true captions. Filler words are few and differ
        between wordings, so n-grams shared by all captions cannot be matched without the image."""
        n, many = self.count, self.count > 1
        noun = self.shape + ("s" if many else "")
        article = "a" if n == 1 else COUNT_WORDS[n]
        where = "in the middle" if self.position == "middle" else f"on the {self.position}"
        return [
            f"{article} {self.size} {self.colour} {noun} {where}",
            f"{COUNT_WORDS[n]} {self.colour} {noun} , all {self.size} , {self.position}",
            f"{self.position} : {article} {self.size} {noun} in {self.colour}",
            f"{self.size} {self.colour} {noun} {where} , {COUNT_WORDS[n]} in number",
            f"{self.colour} {self.size} {noun} , {COUNT_WORDS[n]} , placed {self.position}",
        ]


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice((1, 2, 3)), rng.choice(list(SIZES)), rng.choice(list(COLOURS)),
                 rng.choice(SHAPES), rng.choice(list(POSITIONS)))


def draw(scene: Scene, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS), rng.choice(BACKGROUNDS))
    pen = ImageDraw.Draw(image)
    x0, x1 = POSITIONS[scene.position]
    placed: list[tuple[int, int, int]] = []
    while len(placed) < scene.count:
        placed = []
        for _ in range(scene.count):
            side = rng.randint(*SIZES[scene.size])
            for _attempt in range(50):
                cx = rng.uniform(x0 + side / 2, x1 - side / 2)
                cy = rng.uniform(side / 2 + 2, CANVAS - side / 2 - 2)
                if all(abs(cy - py) > (side + ps) / 2 + 2 or abs(cx - px) > (side + ps) / 2 + 2
                       for px, py, ps in placed):
                    placed.append((cx, cy, side))
                    break
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[scene.colour])
    for cx, cy, side in placed:
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        if scene.shape == "circle":
            pen.ellipse(box, fill=colour)
        elif scene.shape == "square":
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return image


def write_synthetic(out: str | Path, images: int = 3000, seed: int = 0) -> Path:
    """Write the built-in dataset at `out` (Kaggle layout); the same seed gives the same bytes."""
    if images < 10:
        raise ValueError(f"--images must be at least 10 (one per split and some to train), got {images}")
    out = Path(out)
    image_dir = out / "Images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(images):
        rng = random.Random(seed * 1_000_003 + i)
        scene = random_scene(rng)
        name = f"synth_{seed}_{i:06d}.jpg"
        draw(scene, rng).save(image_dir / name, quality=90)
        rows.extend((name, caption) for caption in scene.captions())
    with open(out / "captions.txt", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    (out / "captune.yaml").write_text(PRESET)
    return out
