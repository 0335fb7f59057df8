"""The easy-vqa splits: labels, the template answerer, the mosaic split, scoring and the blind baseline."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ficoco import vqa


@pytest.mark.parametrize("part", ["train", "test"])
def test_answerer_reproduces_every_easy_vqa_answer(part: str) -> None:
    tiles = {t.image_id: t for t in vqa.tiles(part)}
    questions = vqa._read_questions(part)
    assert len(tiles) == {"train": 4000, "test": 1000}[part]
    assert len(questions) == {"train": 38575, "test": 9673}[part]
    wrong = [(q, a) for q, a, i in questions if vqa.answer_single(q, tiles[i].shape, tiles[i].color) != a]
    assert wrong == []


def test_labels_from_pixels_agree_with_questions() -> None:
    tiles = vqa.tiles("test")
    agree = sum(vqa.tile_shape_from_pixels(vqa.load_tile_image("test", t.image_id), t.color) == t.shape for t in tiles)
    assert agree >= 0.99 * len(tiles)
    assert set(Counter(t.color for t in tiles)) == set(vqa.COLORS)


def test_mosaic_split_is_deterministic_and_consistent() -> None:
    a, b = vqa.mosaics("test"), vqa.mosaics("test")
    assert a == b and len(a) == vqa.MOSAIC_TEST_IMAGES
    test_ids = {t.image_id for t in vqa.tiles("test")}
    for m in a[:50]:
        assert {t.image_id for t in m.tiles} <= test_ids and len({t.image_id for t in m.tiles}) == 4
        shapes = [t.shape for t in m.tiles]
        colors = [t.color for t in m.tiles]
        for q, ans, qtype in m.questions:
            assert qtype in ("position", "count") and ans in vqa.ANSWERS
            if q.startswith("what shape is at the "):
                assert ans == shapes[vqa.QUADRANTS.index(q[len("what shape is at the "):-1])]
            if q.startswith("how many ") and q.endswith(" shapes are there?"):
                assert ans == vqa.COUNT_WORDS[colors.count(q.split()[2])]
    # the image: quadrant pixels are the tiles' own
    img = np.asarray(vqa.test_split("mosaic").image(a[0].key))
    tr = np.asarray(vqa.load_tile_image("test", a[0].tiles[1].image_id))
    assert img.shape == (128, 128, 3) and np.array_equal(img[:64, 64:], tr)


def test_split_limit_and_types() -> None:
    s = vqa.test_split("easy-vqa")
    assert len(s.questions) == 9673 and set(q.qtype for q in s.questions) == {"yes/no", "shape", "color"}
    sub = s.limit(3)
    assert sub.image_keys() == s.image_keys()[:3] and all(q.image_key in sub.image_keys() for q in sub.questions)
    m = vqa.test_split("mosaic")
    assert len(m.questions) == vqa.MOSAIC_TEST_IMAGES * vqa.MOSAIC_QUESTIONS
    with pytest.raises(ValueError, match="unknown split"):
        vqa.test_split("nope")


def test_score_and_normalize() -> None:
    qs = vqa.test_split("easy-vqa").limit(1).questions
    right = [q.answer.upper() + "." for q in qs]
    sc = vqa.score(qs, right)
    assert sc.accuracy == 1.0 and sum(n for _, n in sc.by_type.values()) == len(qs)
    wrong = ["banana"] * len(qs)
    assert vqa.score(qs, wrong).accuracy == 0.0
    assert vqa.normalize_answer("  Circle </s>") == "circle" and vqa.normalize_answer("") == ""
    with pytest.raises(ValueError):
        vqa.score(qs, right[:-1])


def test_blind_baseline_uses_question_text_only() -> None:
    s = vqa.test_split("easy-vqa").limit(40)
    preds = vqa.blind_answers(s.questions)
    by_text: dict[str, set[str]] = {}
    for q, p in zip(s.questions, preds, strict=True):
        by_text.setdefault(q.question, set()).add(p)
    assert all(len(v) == 1 for v in by_text.values())
    acc = vqa.score(s.questions, preds).accuracy
    assert 0.4 < acc < 0.9  # the text prior: well above chance on yes/no, but not the answers
