"""Fusion: layout, per-modality normalisation and weights, zero-filling, TikTok-like
image + audio alignment, collaborative vectors, save/load, summaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.errors import DataFormatError, ValidationError
from recsys.features import ItemFeatures, available_modalities, build_item_features, fuse, summarise
from recsys.features.fuse import features_dir


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_layout_and_unit_rows() -> None:
    rng = np.random.default_rng(1)
    text, image = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    feats = fuse({"text": text, "image": image}, [str(i) for i in range(5)])
    assert feats.layout == {"text": (0, 4), "image": (4, 7)}
    assert feats.matrix.shape == (5, 7) and feats.matrix.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats.matrix, axis=1), 1.0, atol=1e-6)
    # equal weights: each fully covered block holds half of the squared norm
    np.testing.assert_allclose(np.linalg.norm(feats.block("text"), axis=1), 2**-0.5, atol=1e-6)
    np.testing.assert_allclose(feats.block("image") * 2**0.5, _unit(image), atol=1e-6)


def test_scale_does_not_matter_but_weights_do() -> None:
    rng = np.random.default_rng(2)
    text, image = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
    ids = list("abcdef")
    base = fuse({"text": text, "image": image}, ids).matrix
    scaled = fuse({"text": text, "image": image * 1000.0}, ids).matrix
    np.testing.assert_allclose(base, scaled, atol=1e-6)
    weighted = fuse({"text": text, "image": image}, ids, weights={"image": 2.0})
    ratio = np.linalg.norm(weighted.block("image"), axis=1) / np.linalg.norm(
        weighted.block("text"), axis=1
    )
    np.testing.assert_allclose(ratio, 2.0, atol=1e-5)
    assert weighted.weights == {"text": 1.0, "image": 2.0}


def test_missing_rows_stay_zero_and_coverage_counts_them() -> None:
    text = np.ones((4, 2))
    image = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    feats = fuse({"text": text, "image": image}, ["a", "b", "c", "d"])
    assert not feats.block("image")[[1, 3]].any()
    assert feats.coverage == {"text": 1.0, "image": 0.5}
    assert feats.present("image").tolist() == [True, False, True, False]
    # a row with only text is all text after the final normalisation
    np.testing.assert_allclose(np.linalg.norm(feats.block("text")[1]), 1.0, atol=1e-6)
    # an item with no modality at all is a zero row, not NaN
    empty = fuse({"image": image}, ["a", "b", "c", "d"])
    assert np.isfinite(empty.matrix).all() and not empty.matrix[1].any()


@pytest.mark.parametrize(
    ("blocks", "weights"),
    [
        ({"text": np.ones((3, 2))}, None),  # wrong number of rows (ids has 4)
        ({"text": np.full((4, 2), np.nan)}, None),
        ({"text": np.ones((4,))}, None),
        ({"text": np.ones((4, 2))}, {"image": 1.0}),
        ({"text": np.ones((4, 2))}, {"text": -1.0}),
        ({}, None),
    ],
)
def test_fuse_rejects_bad_input(blocks, weights) -> None:
    with pytest.raises(ValidationError):
        fuse(blocks, ["a", "b", "c", "d"], weights=weights)


def test_tiktok_like_image_and_audio_stay_aligned(tiktok_like) -> None:
    assert available_modalities(tiktok_like) == ["image", "audio"]
    feats = build_item_features(tiktok_like)  # no text: the model is never needed
    assert feats.layout == {"image": (0, 16), "audio": (16, 22)}
    assert feats.coverage["image"] == pytest.approx(10 / 12)
    assert feats.coverage["audio"] == pytest.approx(9 / 12)
    assert list(feats.item_ids) == list(tiktok_like.item_ids)
    image, audio = tiktok_like.features["image"], tiktok_like.features["audio"]
    both = feats.present("image") & feats.present("audio")
    # row i of each block is item i's own vector, rescaled to norm 1/sqrt(2)
    np.testing.assert_allclose(feats.block("image")[both] * 2**0.5, _unit(image[both]), atol=1e-5)
    np.testing.assert_allclose(feats.block("audio")[both] * 2**0.5, _unit(audio[both]), atol=1e-5)
    # item 5 lacks both: zero row; item 2 has audio only: all of its norm is audio
    assert not feats.matrix[5].any()
    np.testing.assert_allclose(feats.block("audio")[2], _unit(audio[2:3])[0], atol=1e-5)
    # raw scales differ by ~10^4 but the shares do not
    rows = {r["modality"]: r for r in summarise(feats)}
    assert rows["image"]["mean_norm"] > 100 * rows["audio"]["mean_norm"]
    assert rows["image"]["share"] == pytest.approx(rows["audio"]["share"], abs=0.15)


def test_text_plus_collaborative_and_modality_choice(movie_dataset, fake_encoder, tmp_path) -> None:
    collab = torch.randn(4, 5)
    feats = build_item_features(
        movie_dataset,
        cache_dir=tmp_path,
        collaborative=collab,
        encoder=fake_encoder,
        progress=False,
    )
    assert feats.layout == {"text": (0, 8), "collaborative": (8, 13)}
    assert feats.coverage["text"] == pytest.approx(0.75)
    assert feats.stats["text"]["encoded"] == 3
    assert feats.info["dataset"] == "movies" and feats.info["fingerprint"]
    np.testing.assert_allclose(
        feats.block("collaborative")[2], _unit(collab.numpy()[2:3])[0], atol=1e-5
    )
    only = build_item_features(
        movie_dataset, cache_dir=tmp_path, modalities=["collaborative"], collaborative=collab
    )
    assert only.modalities == ["collaborative"]
    with pytest.raises(ValidationError, match="not available"):
        build_item_features(movie_dataset, cache_dir=tmp_path, modalities=["image"])


def test_save_load_round_trip(tiktok_like, tmp_path: Path) -> None:
    feats = build_item_features(tiktok_like, weights={"audio": 0.5})
    feats.save(tmp_path / "out")
    back = ItemFeatures.load(tmp_path / "out")
    np.testing.assert_array_equal(back.matrix, feats.matrix)
    assert back.layout == feats.layout
    assert back.coverage == pytest.approx(feats.coverage)
    assert back.weights == {"image": 1.0, "audio": 0.5}
    assert list(back.item_ids) == list(tiktok_like.item_ids)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_load_reports_bad_files(tiktok_like, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="features build"):
        ItemFeatures.load(tmp_path)
    build_item_features(tiktok_like).save(tmp_path)
    meta = json.loads((tmp_path / "item_features.json").read_text())
    meta["layout"]["audio"] = [16, 99]
    (tmp_path / "item_features.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match="layout"):
        ItemFeatures.load(tmp_path)
    (tmp_path / "item_features.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="invalid JSON"):
        ItemFeatures.load(tmp_path)


def test_summarise_rows(tiktok_like) -> None:
    rows = summarise(build_item_features(tiktok_like))
    assert [r["modality"] for r in rows] == ["image", "audio", "fused"]
    assert set(rows[0]) == {
        "modality", "dim", "coverage", "mean_norm", "weight", "share", "from_cache", "encoded",
    }  # fmt: skip
    assert rows[-1]["dim"] == 22 and rows[-1]["coverage"] == pytest.approx(11 / 12)
    assert rows[-1]["mean_norm"] == pytest.approx(1.0)
    assert rows[0]["share"] + rows[1]["share"] == pytest.approx(1.0)


def test_features_dir(tmp_path: Path) -> None:
    assert features_dir("ml-100k", tmp_path) == tmp_path.resolve() / "features" / "ml-100k"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "items.jsonl").write_text('{"item_id": "1"}\n')
    assert features_dir(tmp_path / "mine") == tmp_path / "mine"
