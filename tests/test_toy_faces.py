"""Tests of the procedural face renderer (rsc.toy.faces)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rsc.toy.faces import GENDERS, GROUPS, FaceAttributes, random_attributes, render_face, render_faces


def _attrs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return random_attributes(n, seed=seed, stereotype_rate=0.5)


def test_constants_are_made_up_names() -> None:
    assert GROUPS == ("ardan", "belor", "cyran", "dovek")
    assert GENDERS == ("woman", "man")


def test_shape_dtype_and_size() -> None:
    imgs = render_faces(*_attrs(6), seed=1)
    assert imgs.shape == (6, 64, 64, 3)
    assert imgs.dtype == np.uint8
    small = render_faces(*_attrs(3), seed=1, size=32)
    assert small.shape == (3, 32, 32, 3)
    one = render_face(FaceAttributes(0, 1, False), np.random.default_rng(0))
    assert one.shape == (64, 64, 3) and one.dtype == np.uint8
    # Real pictures, not constant fills.
    assert all(img.std() > 20 for img in imgs)
    assert render_faces([], [], [], seed=0).shape == (0, 64, 64, 3)


def test_same_seed_same_bytes_and_other_seed_differs() -> None:
    attrs = _attrs(16)
    a = render_faces(*attrs, seed=3)
    b = render_faces(*attrs, seed=3)
    assert a.tobytes() == b.tobytes()
    c = render_faces(*attrs, seed=4)
    assert all(not np.array_equal(a[i], c[i]) for i in range(len(a)))


def test_subset_equals_slice_of_full_render() -> None:
    g, ge, st = _attrs(20, seed=5)
    full = render_faces(g, ge, st, seed=9)
    head = render_faces(g[:7], ge[:7], st[:7], seed=9)
    np.testing.assert_array_equal(head, full[:7])
    # Image i depends only on (seed, i): changing another image's attributes leaves it alone.
    g2 = g.copy()
    g2[10] = (g2[10] + 1) % len(GROUPS)
    other = render_faces(g2, ge, st, seed=9)
    np.testing.assert_array_equal(np.delete(other, 10, axis=0), np.delete(full, 10, axis=0))
    assert not np.array_equal(other[10], full[10])


def test_render_face_matches_render_faces() -> None:
    g, ge, st = _attrs(4, seed=2)
    batch = render_faces(g, ge, st, seed=12)
    for i in range(4):
        one = render_face(FaceAttributes(int(g[i]), int(ge[i]), bool(st[i])), np.random.default_rng([12, i]))
        np.testing.assert_array_equal(one, batch[i])


def test_stereotype_changes_the_face_strongly() -> None:
    diffs = []
    for i in range(40):
        base = FaceAttributes(i % 4, (i // 4) % 2, False)
        plain = render_face(base, np.random.default_rng([21, i])).astype(np.float64)
        stereo = render_face(
            FaceAttributes(base.group, base.gender, True), np.random.default_rng([21, i])
        ).astype(np.float64)
        diffs.append(np.abs(plain - stereo).mean())
    # Same pose, tones and background: only the distortion differs, and it is large.
    assert min(diffs) > 8.0, diffs
    assert np.mean(diffs) > 12.0


def test_same_rng_state_gives_matched_faces() -> None:
    # The background (top-left corner) does not depend on the attributes.
    a = render_face(FaceAttributes(0, 0, False), np.random.default_rng([1, 2]))
    b = render_face(FaceAttributes(3, 1, True), np.random.default_rng([1, 2]))
    np.testing.assert_array_equal(a[:4, :4], b[:4, :4])


def test_gender_changes_the_face() -> None:
    diffs = []
    for i in range(24):
        w = render_face(FaceAttributes(i % 4, 0, False), np.random.default_rng([5, i])).astype(np.float64)
        m = render_face(FaceAttributes(i % 4, 1, False), np.random.default_rng([5, i])).astype(np.float64)
        diffs.append(np.abs(w - m).mean())
    assert min(diffs) > 3.0, diffs


def test_groups_differ_in_skin_colour() -> None:
    n = 60
    groups = np.repeat(np.arange(len(GROUPS)), n)
    genders = np.tile(np.arange(len(GENDERS)), len(groups) // 2)
    imgs = render_faces(groups, genders, np.zeros(len(groups), bool), seed=11)
    # Median colour of a central patch (cheeks, nose) is the skin colour.
    skin = np.median(imgs[:, 26:38, 24:40].reshape(len(imgs), -1, 3).astype(np.float64), axis=1)
    centres = np.stack([skin[groups == k].mean(0) for k in range(len(GROUPS))])
    gaps = [np.linalg.norm(centres[i] - centres[j]) for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > 60.0, centres
    nearest = np.argmin(((skin[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest == groups).mean() >= 0.98
    # Skin is saturated (coloured), unlike the grey background.
    assert (centres.max(1) - centres.min(1)).min() > 60.0
    corner = imgs[:, 0, 0].astype(int)
    assert (corner.max(1) - corner.min(1)).max() <= 16


def test_random_attributes_balanced_and_deterministic() -> None:
    g, ge, st = random_attributes(803, seed=4, stereotype_rate=0.3)
    assert g.dtype == np.int64 and ge.dtype == np.int64 and st.dtype == np.bool_
    assert len(g) == len(ge) == len(st) == 803
    counts = np.bincount(g * len(GENDERS) + ge, minlength=len(GROUPS) * len(GENDERS))
    assert counts.min() >= 803 // 8 and counts.max() <= 803 // 8 + 1
    assert 0.2 < st.mean() < 0.4
    g2, ge2, st2 = random_attributes(803, seed=4, stereotype_rate=0.3)
    np.testing.assert_array_equal(g, g2)
    np.testing.assert_array_equal(ge, ge2)
    np.testing.assert_array_equal(st, st2)
    assert not np.array_equal(g, random_attributes(803, seed=5)[0])
    assert not random_attributes(50, seed=0, stereotype_rate=0.0)[2].any()
    assert random_attributes(50, seed=0, stereotype_rate=1.0)[2].all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": [0, 4], "genders": [0, 1], "stereotypes": [False, True]}, r"groups\[1\] = 4 .*\[0, 3\]"),
        ({"groups": [0, -1], "genders": [0, 1], "stereotypes": [False, True]}, r"groups\[1\] = -1"),
        ({"groups": [0, 1], "genders": [0, 2], "stereotypes": [False, True]}, r"genders\[1\] = 2 .*\[0, 1\]"),
        ({"groups": [0, 1], "genders": [0], "stereotypes": [False, True]}, r"same length, got 2, 1 and 2"),
        ({"groups": [0.5, 1], "genders": [0, 1], "stereotypes": [False, True]}, r"integer indices"),
        ({"groups": [0, 1], "genders": [0, 1], "stereotypes": [False, 2]}, r"stereotypes"),
    ],
)
def test_render_faces_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_faces(seed=0, **kwargs)


def test_other_bad_input() -> None:
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer, got -1"):
        render_faces([0], [0], [False], seed=-1)
    with pytest.raises(ValueError, match=r"size"):
        render_faces([0], [0], [False], seed=0, size=4)
    with pytest.raises(ValueError, match=r"group must be an integer index in \[0, 3\].*got 7"):
        FaceAttributes(7, 0, False)
    with pytest.raises(ValueError, match=r"gender .* got 2"):
        FaceAttributes(0, 2, False)
    with pytest.raises(ValueError, match=r"stereotype_rate .* got 1.5"):
        random_attributes(10, seed=0, stereotype_rate=1.5)
    with pytest.raises(ValueError, match=r"n must be"):
        random_attributes(-1, seed=0)


def test_render_speed() -> None:
    attrs = _attrs(300, seed=8)
    t0 = time.perf_counter()
    render_faces(*attrs, seed=8)
    per_image = (time.perf_counter() - t0) / 300
    # Target is ~0.5 ms on one core; generous bound for a busy CI machine.
    assert per_image < 5e-3, f"{per_image * 1e3:.2f} ms per image"
