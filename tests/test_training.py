"""Training: it lowers the loss, is seeded, resumes exactly; checkpoints round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ihf_bids.harmonize import CheckpointError, load_model, save_model
from ihf_bids.model import (
    FlowConfig,
    HarmonyLoss,
    IHFHarmony,
    LevelConfig,
    channel_statistics,
    load_vgg19,
    restore_background,
    shifted_statistics,
    site_shift,
    to_vgg_input,
)
from ihf_bids.model.losses import ANATOMY_LAYERS
from ihf_bids.model.vgg import ARTEFACT_LAYERS
from ihf_bids.train import SliceBank, TrainConfig, TrainingVolume, build_site_profiles, train_model

SMALL_ARCH = FlowConfig(levels=(LevelConfig(2, 8), LevelConfig(2, 16)), embedding_hidden=32).to_dict()


def _blobs(rng: np.random.Generator, shape=(24, 28, 12)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 'brain' of two tissues inside an ellipsoid; subjects vary a little."""
    from scipy.ndimage import gaussian_filter

    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1)[:, None, None, None] / 2
    radius = np.sqrt((((grid - centre) / (np.array(shape)[:, None, None, None] * 0.42)) ** 2).sum(0))
    mask = radius < 1
    shared = gaussian_filter(np.random.default_rng(42).standard_normal(shape), 2)
    tissue = shared + 0.05 * gaussian_filter(rng.standard_normal(shape), 2) > 0
    return tissue & mask, mask


def _site_volume(tissue, mask, site: str, rng) -> np.ndarray:
    """Two sites with different tissue contrast, scaling and noise."""
    contrast = {"a": (60.0, 100.0), "b": (500.0, 600.0)}[site]
    img = np.where(tissue, contrast[0], contrast[1]) * mask
    return (img + rng.normal(0, 5, img.shape) * mask).clip(0).astype(np.float32)


@pytest.fixture(scope="module")
def bank() -> SliceBank:
    rng = np.random.default_rng(0)
    volumes = []
    for subject in range(3):
        tissue, mask = _blobs(rng)
        for site in ("a", "b"):
            volumes.append(TrainingVolume(_site_volume(tissue, mask, site, rng), site, "T1w", f"{subject}", mask))
    return SliceBank(volumes)


@pytest.fixture(scope="module")
def vgg():
    return load_vgg19()


def _fixed_batch_loss(model, vgg, bank, profiles) -> float:
    """The training objective on one fixed batch whose targets are the other site."""
    x_np, samples = bank.sample(np.random.default_rng(123), 16)
    x = torch.from_numpy(x_np)
    other = {"a": "b", "b": "a"}
    emb = {key: torch.from_numpy(p.embeddings) for key, p in profiles.items()}
    shift = site_shift(
        torch.stack([emb[other[s.source_site], s.modality][s.position] for s in samples]),
        torch.stack([emb[s.source_site, s.modality][s.position] for s in samples]),
    )
    with torch.no_grad():
        source = vgg(to_vgg_input(x), ARTEFACT_LAYERS + ANATOMY_LAYERS)
        target = shifted_statistics({k: channel_statistics(source[k]) for k in ARTEFACT_LAYERS}, shift)
        out = restore_background(x, model(x, shift))
        loss, _ = HarmonyLoss()(
            source,
            vgg(to_vgg_input(out), ARTEFACT_LAYERS + ANATOMY_LAYERS),
            target,
            generator=torch.Generator().manual_seed(0),
        )
    return float(loss)


def test_slice_bank_draws_targets_at_same_position(bank):
    x, samples = bank.sample(np.random.default_rng(0), 40)
    assert x.shape == (40, 3, 24, 28)
    same_site = 0
    for window, sample in zip(x, samples):
        # The window is slice `position` of a volume of the source site.
        source = next(i for i, v in enumerate(bank.volumes) if np.array_equal(bank.window(i, sample.position), window))
        assert bank.volumes[source].site == sample.source_site
        assert sample.modality == "T1w" and sample.target_site in ("a", "b")
        same_site += sample.source_site == sample.target_site
    assert 0 < same_site < 40, "targets include the source's own site and the other one"
    assert bank.sites == ["a", "b"]
    assert bank.summary()["volumes"] == {"T1w": {"a": 3, "b": 3}}


def test_slice_bank_needs_two_sites():
    vol = TrainingVolume(np.ones((8, 8, 4), np.float32), "a", "T1w", "1")
    with pytest.raises(ValueError, match="two or more sites"):
        SliceBank([vol])


def test_tiny_training_lowers_the_loss(bank, vgg, tmp_path):
    torch.manual_seed(0)
    profiles = build_site_profiles(bank, vgg=vgg)
    assert set(profiles) == {("a", "T1w"), ("b", "T1w")}
    before = _fixed_batch_loss(IHFHarmony(FlowConfig.from_dict(SMALL_ARCH)), vgg, bank, profiles)
    config = TrainConfig(steps=60, batch_size=8, learning_rate=2e-3, seed=0, architecture=SMALL_ARCH)
    result = train_model(bank, config, tmp_path, progress=False, vgg=vgg)
    after = _fixed_batch_loss(result.model, vgg, bank, profiles)
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == [
        "site-a_modality-T1w_profile.npz",
        "site-b_modality-T1w_profile.npz",
    ]
    assert after < 0.8 * before, (before, after)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["sites"] == ["a", "b"] and meta["modalities"] == ["T1w"]
    assert meta["training"]["steps"] == 60 and len(meta["sha256"]) == 64


def test_training_is_seeded_and_resumes_exactly(bank, vgg, tmp_path):
    config = TrainConfig(steps=6, batch_size=4, seed=3, checkpoint_every=3, architecture=SMALL_ARCH)
    full = train_model(bank, config, tmp_path / "full", progress=False, vgg=vgg)
    again = train_model(bank, config, tmp_path / "again", progress=False, vgg=vgg, resume=False)
    # Interrupted after 3 steps, then resumed from train_state.pt to 6.
    half = TrainConfig(**{**config.__dict__, "steps": 3})
    train_model(bank, half, tmp_path / "resumed", progress=False, vgg=vgg)
    resumed = train_model(bank, config, tmp_path / "resumed", progress=False, vgg=vgg)
    for other in (again, resumed):
        for (name, p), q in zip(full.model.state_dict().items(), other.model.state_dict().values()):
            assert torch.equal(p, q), name
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = IHFHarmony(FlowConfig.from_dict(SMALL_ARCH))
    save_model(model, tmp_path, {"sites": ["a"], "modalities": ["T1w"]})
    loaded, meta = load_model(tmp_path)
    assert meta["sites"] == ["a"] and FlowConfig.from_dict(meta["architecture"]) == FlowConfig.from_dict(SMALL_ARCH)
    for p, q in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(p, q)


def test_checkpoint_errors(tmp_path):
    model = IHFHarmony(FlowConfig.from_dict(SMALL_ARCH))
    save_model(model, tmp_path, {})
    with pytest.raises(CheckpointError, match="no model checkpoint"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(tmp_path, expected_sha256="0" * 64)
    # A corrupted file no longer matches its recorded hash.
    data = bytearray((tmp_path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path)
    # A checkpoint whose weights do not fit its declared architecture.
    other = tmp_path / "other"
    save_model(model, other, {})
    payload = torch.load(other / "model.pt", weights_only=True)
    meta = json.loads(payload["metadata"])
    meta["architecture"]["levels"][0]["hidden"] = 12
    payload["metadata"] = json.dumps(meta)
    torch.save(payload, other / "model.pt")
    with pytest.raises(CheckpointError, match="another architecture"):
        from ihf_bids.harmonize.checkpoint import sha256sum

        load_model(other, expected_sha256=sha256sum(other / "model.pt"))
    # Not a checkpoint at all (a plain state dict).
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    from ihf_bids.harmonize.checkpoint import sha256sum

    with pytest.raises(CheckpointError, match="not an ihf-bids checkpoint"):
        load_model(plain, expected_sha256=sha256sum(plain))


def test_training_presets_load():
    from pathlib import Path

    from ihf_bids.train import load_train_preset

    presets = sorted((Path(__file__).parents[1] / "pipelines" / "training").glob("*.toml"))
    assert presets, "pipelines/training holds at least one preset"
    for path in presets:
        config = load_train_preset(path)
        assert config.steps > 0 and config.batch_size > 0
        if config.architecture is not None:  # None: the default architecture
            FlowConfig.from_dict(config.architecture)


def test_training_preset_rejects_unknown_keys(tmp_path):
    from ihf_bids.train import load_train_preset

    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 3\nlearnig_rate = 0.1\n")
    with pytest.raises(ValueError, match="unknown training settings"):
        load_train_preset(bad)
