"""The easy-vqa test splits and their questions: the real split, a 2×2 mosaic split, question types, scoring.

easy-vqa (PyPI ``easy-vqa``, MIT) ships 4,000 train and 1,000 test images of 64×64 px, each one solid shape
(circle, rectangle, triangle) in one of eight colours on a light background, with 38,575 / 9,673 template
questions whose answers are one word (13 answers). Two splits are built from it, deterministically:

* ``easy-vqa``: the package's own questions, unchanged.
* ``mosaic``: 2×2 mosaics (128×128 px) of four images of the same split, with questions that need spatial
  detail: one quadrant's shape or colour ("what shape is at the top left?"), whether a quadrant holds a given
  shape or colour, and counts ("how many circles are there?"). A single large shape survives almost any token
  reduction; four half-size shapes in known places do not.

Every image's shape and colour are known: the colour from its pixels (easy-vqa draws each colour with one
exact RGB value), the shape from its questions (by elimination where no question names it). The questions
of any template are answered by :func:`answer_single` from those labels; the rule reproduces every answer of
the package's train and test questions (tested).

Question types (``qtype``): ``yes/no``, ``shape``, ``color`` (easy-vqa), ``position`` and ``count`` (mosaic).
This module needs only numpy and PIL; it reads the installed ``easy_vqa`` package and never downloads.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
#: easy-vqa's colours and the exact RGB it draws each with.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
QTYPES: tuple[str, ...] = ("yes/no", "shape", "color", "position", "count")
SPLITS: tuple[str, ...] = ("easy-vqa", "mosaic")
#: Every answer any split can have (easy-vqa's 13, then the count words).
ANSWERS: tuple[str, ...] = ("yes", "no", *SHAPES, *COLORS, *COUNT_WORDS)

TILE = 64
#: Mosaic split sizes: mosaics per split part and questions per mosaic.
MOSAIC_TEST_IMAGES = 500
MOSAIC_QUESTIONS = 6
MOSAIC_SEED = {"train": 1, "test": 2}


class DatasetError(RuntimeError):
    """easy-vqa is missing or not as expected; the message says how to install it."""


@dataclass(frozen=True)
class Tile:
    """One easy-vqa image and its labels."""

    image_id: int
    shape: str
    color: str


@dataclass(frozen=True)
class Question:
    """One question about one image of a split. ``image_key`` names the image inside its split."""

    split: str
    image_key: str
    question: str
    answer: str
    qtype: str


# ----------------------------------------------------------------------------------------------------------------
# Reading the package
# ----------------------------------------------------------------------------------------------------------------


def _package_dir() -> Path:
    try:
        import easy_vqa
    except ImportError as err:
        raise DatasetError(
            "the easy-vqa data set is not installed; install it with `pip install --no-deps easy-vqa` "
            "(the Makefile's `make install` does)."
        ) from err
    return Path(easy_vqa.__file__).parent / "data"


@lru_cache(maxsize=4)
def _read_questions(part: str) -> tuple[tuple[str, str, int], ...]:
    f = _package_dir() / part / "questions.json"
    return tuple((str(q), str(a), int(i)) for q, a, i in json.loads(f.read_text(encoding="utf-8")))


def questions_by_image(part: str) -> dict[int, list[str]]:
    """easy-vqa's questions of `part` ("train"/"test") per image id, in file order."""
    out: dict[int, list[str]] = {}
    for q, _a, i in _read_questions(part):
        out.setdefault(i, []).append(q)
    return out


def image_path(part: str, image_id: int) -> Path:
    """The PNG of easy-vqa image `image_id` of `part` ("train" or "test")."""
    return _package_dir() / part / "images" / f"{image_id}.png"


def load_tile_image(part: str, image_id: int) -> Image.Image:
    with Image.open(image_path(part, image_id)) as im:
        return im.convert("RGB")


def tile_color(image: Image.Image) -> str:
    """The colour name of the shape in a 64×64 easy-vqa image: the most frequent exact easy-vqa RGB value."""
    arr = np.asarray(image.convert("RGB")).reshape(-1, 3)
    counts = {name: int(np.all(arr == np.array(rgb, dtype=np.uint8), axis=1).sum()) for name, rgb in COLORS.items()}
    return max(counts, key=lambda k: counts[k])


def tile_shape_from_pixels(image: Image.Image, color: str) -> str:
    """The shape in a 64×64 easy-vqa image from its pixels: the fraction of its bounding box that the shape
    fills (rectangle ≈ 1, circle ≈ π/4, triangle ≈ 1/2). Used only where no question names the shape."""
    arr = np.asarray(image.convert("RGB")).astype(np.int16)
    mask = np.abs(arr - np.array(COLORS[color], dtype=np.int16)).sum(-1) < 96
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise DatasetError("an easy-vqa image without a shape of its colour")
    fill = mask.sum() / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "rectangle" if fill > 0.9 else ("circle" if fill > 0.65 else "triangle")


def _words(question: str) -> list[str]:
    return question.lower().replace("?", " ").split()


def _mentions(question: str) -> tuple[str | None, str | None, bool]:
    w = _words(question)
    shape = next((s for s in SHAPES if s in w), None)
    color = next((c for c in COLORS if c in w), None)
    negated = "not" in w or "no" in w
    return shape, color, negated


def answer_single(question: str, shape: str, color: str) -> str | None:
    """The answer to an easy-vqa template question about an image of `shape` in `color`, or None when the
    question does not apply to it (it names a shape or colour that the image's shape does not have)."""
    q_shape, q_color, negated = _mentions(question)
    w = _words(question)
    if w and w[0] == "what":
        if "color" in w:  # "what color is the triangle?", "what is the color of the shape?"
            return color if q_shape in (None, shape) else None
        return shape if q_color in (None, color) else None  # "what is the blue shape?", "what shape is present?"
    present = (q_shape == shape) if q_shape is not None else (q_color == color)
    return "yes" if present != negated else "no"


def qtype_single(question: str, answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


@lru_cache(maxsize=4)
def tiles(part: str) -> tuple[Tile, ...]:
    """Every image of `part` ("train"/"test") with its shape and colour, in image-id order."""
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    known: dict[int, set[str]] = {}
    excluded: dict[int, set[str]] = {}
    ids: set[int] = set()
    for q, a, i in _read_questions(part):
        ids.add(i)
        q_shape, q_color, negated = _mentions(q)
        if a in SHAPES:
            known.setdefault(i, set()).add(a)
        elif a in COLORS and q_shape is not None:
            known.setdefault(i, set()).add(q_shape)
        elif a in ("yes", "no") and q_shape is not None:
            present = (a == "yes") != negated
            (known if present else excluded).setdefault(i, set()).add(q_shape)
    out = []
    for i in sorted(ids):
        image = load_tile_image(part, i)
        color = tile_color(image)
        shapes = known.get(i, set()) or (set(SHAPES) - excluded.get(i, set()))
        if len(shapes) != 1:
            shapes = {tile_shape_from_pixels(image, color)}
        out.append(Tile(i, shapes.pop(), color))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------
# Mosaics
# ----------------------------------------------------------------------------------------------------------------


def mosaic_image(images: Sequence[Image.Image]) -> Image.Image:
    """Four 64×64 images as one 128×128 image, in QUADRANTS order (TL, TR, BL, BR)."""
    if len(images) != 4:
        raise ValueError(f"a mosaic takes 4 images, got {len(images)}")
    out = Image.new("RGB", (2 * TILE, 2 * TILE))
    for q, im in enumerate(images):
        out.paste(im.resize((TILE, TILE)) if im.size != (TILE, TILE) else im, ((q % 2) * TILE, (q // 2) * TILE))
    return out


def mosaic_questions(labels: Sequence[tuple[str, str]], rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """`n` (question, answer, qtype) about a mosaic whose quadrants hold `labels` [(shape, colour)] × 4.

    Half are about a quadrant (its shape, its colour, or yes/no on a shape or colour there), half are counts of
    a shape or a colour, asking about one that is present two times in three so that "zero" is not the prior.
    """
    out: list[tuple[str, str, str]] = []
    shapes = [s for s, _ in labels]
    colors = [c for _, c in labels]
    for j in range(n):
        if j % 2 == 0:
            q = rng.randrange(4)
            where = QUADRANTS[q]
            kind = rng.randrange(4)
            if kind == 0:
                out.append((f"what shape is at the {where}?", shapes[q], "position"))
            elif kind == 1:
                out.append((f"what color is the shape at the {where}?", colors[q], "position"))
            elif kind == 2:
                s = shapes[q] if rng.random() < 0.5 else rng.choice(SHAPES)
                out.append((f"is there a {s} at the {where}?", "yes" if s == shapes[q] else "no", "position"))
            else:
                c = colors[q] if rng.random() < 0.5 else rng.choice(list(COLORS))
                out.append((f"is the shape at the {where} {c}?", "yes" if c == colors[q] else "no", "position"))
        elif rng.random() < 0.5:
            s = rng.choice(shapes) if rng.random() < 2 / 3 else rng.choice(SHAPES)
            out.append((f"how many {s}s are there?", COUNT_WORDS[shapes.count(s)], "count"))
        else:
            c = rng.choice(colors) if rng.random() < 2 / 3 else rng.choice(list(COLORS))
            out.append((f"how many {c} shapes are there?", COUNT_WORDS[colors.count(c)], "count"))
    return out


@dataclass(frozen=True)
class Mosaic:
    key: str
    tiles: tuple[Tile, Tile, Tile, Tile]
    questions: tuple[tuple[str, str, str], ...]


@lru_cache(maxsize=4)
def mosaics(part: str, count: int = MOSAIC_TEST_IMAGES, n_questions: int = MOSAIC_QUESTIONS) -> tuple[Mosaic, ...]:
    """`count` mosaics of `part`'s images (seeded by MOSAIC_SEED[part]), each with `n_questions` questions."""
    rng = random.Random(MOSAIC_SEED[part])
    pool = tiles(part)
    out = []
    for m in range(count):
        four = tuple(rng.sample(pool, 4))
        qs = mosaic_questions([(t.shape, t.color) for t in four], rng, n_questions)
        out.append(Mosaic(f"m{m:04d}", four, tuple(qs)))  # type: ignore[arg-type]
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------
# The test splits
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One evaluation split: its questions (grouped by image, in a fixed order) and a way to get each image."""

    name: str
    questions: tuple[Question, ...]

    def image(self, key: str) -> Image.Image:
        if self.name == "easy-vqa":
            return load_tile_image("test", int(key))
        m = _mosaic_by_key(key)
        return mosaic_image([load_tile_image("test", t.image_id) for t in m.tiles])

    def image_keys(self) -> list[str]:
        return list(dict.fromkeys(q.image_key for q in self.questions))

    def limit(self, n_images: int | None) -> Split:
        """The questions of the first `n_images` images (all when None)."""
        if n_images is None:
            return self
        keep = set(self.image_keys()[:n_images])
        return Split(self.name, tuple(q for q in self.questions if q.image_key in keep))


@lru_cache(maxsize=1)
def _mosaic_index() -> dict[str, Mosaic]:
    return {m.key: m for m in mosaics("test")}


def _mosaic_by_key(key: str) -> Mosaic:
    return _mosaic_index()[key]


def test_split(name: str) -> Split:
    """The `easy-vqa` or `mosaic` test split (test images only; never seen in training)."""
    if name == "easy-vqa":
        qs = [
            Question("easy-vqa", str(i), q, a, qtype_single(q, a))
            for q, a, i in sorted(_read_questions("test"), key=lambda t: t[2])
        ]
        return Split(name, tuple(qs))
    if name == "mosaic":
        qs = [Question("mosaic", m.key, q, a, t) for m in mosaics("test") for q, a, t in m.questions]
        return Split(name, tuple(qs))
    raise ValueError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """The first word of a generated answer, lower-cased, without punctuation (exact match is on this)."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


@dataclass(frozen=True)
class Score:
    n: int
    correct: int
    by_type: dict[str, tuple[int, int]]  # qtype -> (correct, n)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def type_accuracy(self) -> dict[str, float]:
        return {t: c / n for t, (c, n) in self.by_type.items() if n}

    def to_dict(self) -> dict[str, object]:
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy, "by_type": self.type_accuracy(),
                "by_type_n": {t: n for t, (_, n) in self.by_type.items()}}


def score(questions: Sequence[Question], predictions: Sequence[str]) -> Score:
    """Exact-match accuracy of `predictions` (normalized) against each question's answer, overall and by type."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    by: dict[str, list[int]] = {}
    correct = 0
    for q, p in zip(questions, predictions, strict=True):
        ok = int(normalize_answer(p) == q.answer)
        correct += ok
        c = by.setdefault(q.qtype, [0, 0])
        c[0] += ok
        c[1] += 1
    return Score(len(questions), correct, {t: (c, n) for t, (c, n) in by.items()})


def blind_answers(questions: Sequence[Question]) -> list[str]:
    """The question-only baseline: for each question string, the most frequent answer to the same string in
    the training data (the train mosaics for mosaic questions); the overall training majority otherwise."""
    prior: dict[str, Counter[str]] = {}
    for q, a, _ in _read_questions("train"):
        prior.setdefault(q, Counter())[a] += 1
    for m in mosaics("train", count=4000):
        for q, a, _ in m.questions:
            prior.setdefault(q, Counter())[a] += 1
    overall = Counter(a for c in prior.values() for a, n in c.items() for _ in range(n)).most_common(1)[0][0]
    return [prior[q.question].most_common(1)[0][0] if q.question in prior else overall for q in questions]
