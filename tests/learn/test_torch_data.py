"""The torch Dataset over contract-4 files: layout, laziness, DataLoader workers, image
subsets and batching, subject-disjoint splits, and augmentations that keep the ground
truth consistent (K, landmarks, depth, lights)."""

import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.nn.functional import grid_sample
from torch.utils.data import DataLoader

from faceps.core.errors import ConfigError, DatasetError
from faceps.datasets.build import build_dataset
from faceps.datasets.schema import read_sample
from faceps.datasets.torch_data import (
    AugmentConfig,
    FaceDataset,
    ImageCountBatchSampler,
    collate_samples,
    crop_scale,
    load_split,
    random_crop_scale,
    scale_intensity,
    split_subjects,
    write_split,
)
from faceps.learn.proxynet import project_landmarks, vertices_from_params
from faceps.model import load_model
from tests.tolerances import assert_close

N, SIZE, SHARD = 6, 64, 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchdata") / "data.h5"
    return build_dataset(out, N, size=SIZE, seed=0, shard_size=SHARD)


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


def test_layout_dtypes_and_values(built):
    ds = FaceDataset(built.path)
    assert len(ds) == N and ds.n_lights == 3
    s = ds[2]
    L, H, W = 3, SIZE, SIZE
    shapes = {"images": (L, 3, H, W), "lights": (L, 11), "normals": (3, H, W),
              "proxy_normals": (3, H, W), "mask": (H, W), "proxy_mask": (H, W),
              "face_mask": (H, W), "albedo": (3, H, W), "depth": (H, W), "K": (3, 3),
              "landmarks": (68, 2), "landmark_mask": (68,)}
    for key, shape in shapes.items():
        assert tuple(s[key].shape) == shape, key
        assert s[key].dtype == torch.float32, key
        assert torch.isfinite(s[key]).all(), f"{key} holds NaN"
    assert s["light_index"].tolist() == [0, 1, 2]
    assert {k: tuple(v.shape) for k, v in s["params"].items()} == {
        "id": (ds.k_id,), "exp": (ds.k_exp,), "albedo": (ds.k_alb,), "pose": (6,)}
    assert s["subject"] == "synthetic-s0-0000002" and s["source"] == "synthetic"
    assert s["index"] == 2

    raw = read_sample(built.path, 2)
    assert_close(s["images"], raw["images"].astype(np.float32).transpose(0, 3, 1, 2),
                 name="images")
    assert_close(s["lights"], raw["lights"], name="lights")
    mask = raw["mask"] > 0
    assert torch.equal(s["mask"] > 0, torch.from_numpy(mask))
    n = raw["normals"].astype(np.float32)
    n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    assert_close(s["normals"].permute(1, 2, 0)[mask], n[mask], atol=1e-6, name="normals")
    assert float(s["normals"][:, ~torch.from_numpy(mask)].abs().max()) == 0.0
    assert_close(s["depth"][mask], raw["depth"][mask], name="depth")
    assert_close(s["K"], raw["K"], name="K")
    # unit normals where known
    norms = s["normals"].norm(dim=0)[s["mask"] > 0]
    assert_close(norms, torch.ones_like(norms), atol=1e-5, name="|n|")


def test_shard_and_index_read_the_same(built):
    shard = FaceDataset(built.shards[1])
    index = FaceDataset(built.path, indices=[4, 5])
    assert len(shard) == N - SHARD
    for i in range(len(shard)):
        a, b = shard[i], index[i]
        assert a["subject"] == b["subject"]
        assert torch.equal(a["images"], b["images"])


def test_lazy_reads_one_row(built, monkeypatch):
    ds = FaceDataset(built.path)
    assert not ds.is_open, "the constructor must not keep the file open"
    seen = []
    original = h5py.Dataset.__getitem__

    def spy(self, args, *rest, **kw):
        seen.append((self.name, args))
        return original(self, args, *rest, **kw)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    ds[3]
    assert ds.is_open
    assert seen, "nothing was read"
    rows = {args for _, args in seen}
    assert rows == {3}, f"reads other than row 3: {sorted(seen)[:5]}"
    # no array held by the dataset object (beyond the row list)
    big = [k for k, v in vars(ds).items() if isinstance(v, np.ndarray | torch.Tensor)
           and k != "indices"]
    assert big == []


def test_pickle_drops_the_handle(built):
    ds = FaceDataset(built.path, n_images=2)
    first = ds.sample(1, rng=3)
    assert ds.is_open
    copy = pickle.loads(pickle.dumps(ds))
    assert not copy.is_open
    again = copy.sample(1, rng=3)
    assert torch.equal(first["images"], again["images"])


def test_dataloader_with_two_workers(built):
    ds = FaceDataset(built.path)
    ds[0]  # the parent's handle must not be reused by the forked workers
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_samples)
    batches = list(loader)
    assert len(batches) == 3
    b = batches[1]
    assert b["images"].shape == (2, 3, 3, SIZE, SIZE)
    assert b["image_mask"].all() and b["index"].tolist() == [2, 3]
    assert b["params"]["pose"].shape == (2, 6)
    assert b["subject"] == ["synthetic-s0-0000002", "synthetic-s0-0000003"]
    assert torch.equal(b["images"][0], ds[2]["images"])


def test_image_subsets_keep_lights_aligned(built):
    ds = FaceDataset(built.path, n_images=(1, 3), fields=("images",))
    raw = read_sample(built.path, 4)
    counts = set()
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = ds.sample(4, rng=rng)
        idx = s["light_index"].numpy()
        counts.add(idx.size)
        assert np.all(np.diff(idx) > 0)
        assert_close(s["lights"], raw["lights"][idx], name="lights")
        assert_close(s["images"], raw["images"][idx].astype(np.float32).transpose(0, 3, 1, 2),
                     name="images")
    assert counts == {1, 2, 3}
    assert set(ds[(4, 2)]) == {"images", "lights", "light_index", "subject", "source", "index"}
    assert ds[(4, 2)]["images"].shape[0] == 2


def test_collate_pads_variable_counts(built):
    ds = FaceDataset(built.path, fields=("images", "mask"))
    batch = collate_samples([ds.sample(0, k=1, rng=1), ds.sample(1, k=3), ds.sample(2, k=2)])
    assert batch["images"].shape == (3, 3, 3, SIZE, SIZE)
    assert batch["image_mask"].tolist() == [[True, False, False], [True, True, True],
                                            [True, True, False]]
    assert float(batch["images"][0, 1:].abs().max()) == 0.0
    assert batch["lights"][0, 1:, 10].tolist() == [0.0, 0.0]
    assert batch["lights"][1, :, 10].tolist() == [1.0, 1.0, 1.0]
    assert batch["light_index"][2, 2].item() == -1
    assert batch["mask"].shape == (3, SIZE, SIZE)


def test_count_batch_sampler_gives_one_count_per_batch(built):
    ds = FaceDataset(built.path, fields=("images",))
    sampler = ImageCountBatchSampler(len(ds), 2, counts=(1, 2, 3),
                                     generator=torch.Generator().manual_seed(0))
    assert len(sampler) == 3
    seen = []
    for _ in range(4):
        for b in DataLoader(ds, batch_sampler=sampler, collate_fn=collate_samples):
            assert b["image_mask"].all()
            seen.append(b["images"].shape[1])
    assert set(seen) == {1, 2, 3}


def test_split_subjects_is_disjoint_and_deterministic():
    subjects = [f"s{i % 17:02d}" for i in range(100)]
    a = split_subjects(subjects, (0.7, 0.15, 0.15), seed=3)
    b = split_subjects(subjects, (0.7, 0.15, 0.15), seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    groups = [{subjects[i] for i in part} for part in a]
    assert [len(g) for g in groups] == [12, 3, 2]  # 17 subjects: 11.9, 2.55, 2.55
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    # the assignment depends on the set of subjects, not on the sample order
    perm = np.random.default_rng(0).permutation(100)
    c = split_subjects([subjects[i] for i in perm], (0.7, 0.15, 0.15), seed=3)
    assert [{subjects[perm[i]] for i in part} for part in c] == groups
    other = split_subjects(subjects, (0.7, 0.15, 0.15), seed=4)
    assert [{subjects[i] for i in part} for part in other] != groups
    with pytest.raises(ConfigError):
        split_subjects(subjects, (0.5, 0.2))
    with pytest.raises(ConfigError):
        split_subjects(subjects, (1.2, -0.2))


def test_write_split_round_trip(built, tmp_path):
    result = write_split(built.path, tmp_path / "splits", seed=1)
    assert set(result.files) == {"train", "val", "test"}
    assert result.samples == {"train": 4, "val": 1, "test": 1}
    doc = json.loads(result.files["val"].read_text())
    assert doc["format"] == "faceps.split/1" and doc["split"] == "val"
    assert doc["dataset"] == Path(os.path.relpath(built.path.resolve(),
                                                  (tmp_path / "splits").resolve())).as_posix()
    parts = {name: load_split(p) for name, p in result.files.items()}
    rows = np.concatenate([s.indices for s in parts.values()])
    assert sorted(rows.tolist()) == list(range(N))
    assert parts["train"].dataset == built.path.resolve()
    ds = FaceDataset.from_split(result.files["test"])
    assert len(ds) == 1 and ds[0]["subject"] in parts["test"].subjects
    again = write_split(built.path, tmp_path / "again", seed=1)
    assert all(np.array_equal(load_split(again.files[k]).indices, parts[k].indices)
               for k in parts)
    with pytest.raises(DatasetError):
        load_split(tmp_path / "missing.json")


def test_crop_by_two_samples_pixel_centres_exactly(built):
    """p' = 2 p - 32: even output pixels are input pixel centres, so the data there are
    copies, and old 3D points projected with the new K land on exactly those pixels."""
    s = FaceDataset(built.path).sample(0)
    c = crop_scale(s, 2.0, (-32.0, -32.0))
    assert c["K"][0, 0] == pytest.approx(2 * float(s["K"][0, 0]))
    v, u = np.meshgrid(np.arange(16, 48), np.arange(16, 48), indexing="ij")
    vo, uo = 2 * v - 32, 2 * u - 32
    assert_close(c["images"][:, :, vo, uo], s["images"][:, :, v, u], atol=1e-6, name="images")
    known = (s["mask"][v, u] > 0) & (c["mask"][vo, uo] > 0)
    assert known.sum() > 200
    assert_close(c["depth"][vo, uo][known], s["depth"][v, u][known], name="depth")
    assert_close(c["normals"][:, vo, uo][:, known], s["normals"][:, v, u][:, known],
                 atol=1e-5, name="normals")
    # back-project with the old K, project with the new K
    z = s["depth"][v, u][known].double()
    pix = torch.stack([torch.from_numpy(u)[known], torch.from_numpy(v)[known],
                       torch.ones_like(z, dtype=torch.int64)], -1).double()
    X = pix @ torch.linalg.inv(s["K"].double()).T * z[:, None]
    q = X @ c["K"].double().T
    q = q[:, :2] / q[:, 2:]
    assert_close(q, torch.stack([torch.from_numpy(uo)[known], torch.from_numpy(vo)[known]],
                                -1).double(), atol=1e-3, name="projected pixels")
    # the mask only shrinks where a neighbour with weight is unknown
    assert not bool(((c["mask"][vo, uo] > 0) & (s["mask"][v, u] == 0)).any())


def test_random_crop_keeps_ground_truth_consistent(built, model):
    ds = FaceDataset(built.path)
    aug = AugmentConfig(scale_range=(0.75, 1.3), shift=0.1, out_size=(48, 40))
    rng = np.random.default_rng(7)
    for i in range(3):
        s = ds.sample(i)
        a = random_crop_scale(s, aug, rng)
        assert a["images"].shape == (3, 3, 40, 48) and a["depth"].shape == (40, 48)
        # landmarks: the model's landmark vertices projected with the new K
        params = {k: v[None] for k, v in a["params"].items()}
        uv, valid = project_landmarks(model, vertices_from_params(model, params), a["K"][None])
        assert_close(uv[0][valid], a["landmarks"][valid], atol=2e-3, name="landmarks")
        # depth: points back-projected with the new K project with the old K onto old
        # pixels of the same (interpolated) depth
        v, u = torch.nonzero(a["mask"] > 0, as_tuple=True)
        assert v.numel() > 300
        z = a["depth"][v, u].double()
        pix = torch.stack([u, v, torch.ones_like(u)], -1).double()
        X = pix @ torch.linalg.inv(a["K"].double()).T * z[:, None]
        q = X @ s["K"].double().T
        q = (q[:, :2] / q[:, 2:]).float()
        g = torch.stack([2 * q[:, 0] / (SIZE - 1) - 1, 2 * q[:, 1] / (SIZE - 1) - 1], -1)
        num = grid_sample((s["depth"] * s["mask"])[None, None], g[None, None],
                          align_corners=True)[0, 0, 0]
        den = grid_sample(s["mask"][None, None], g[None, None], align_corners=True)[0, 0, 0]
        assert bool((den > 0.999).all()), "a known output pixel maps outside the old mask"
        assert_close(num / den, z.float(), atol=1e-2, name="depth along the rays")
        norms = a["normals"].norm(dim=0)[a["mask"] > 0]
        assert_close(norms, torch.ones_like(norms), atol=1e-5, name="|n|")
        assert torch.equal(a["lights"], s["lights"])


def test_intensity_scale_keeps_the_image_light_ratio(built):
    ds = FaceDataset(built.path, fields=("images",))
    s = ds.sample(1)
    f = np.array([2.0, 3.0, 0.5])
    t = scale_intensity(s, f)
    bright = s["images"] > 1e-3
    ratio = (t["images"] / s["images"].clamp_min(1e-3))
    for c in range(3):
        assert_close(ratio[:, c][bright[:, c]], torch.full_like(ratio[:, c][bright[:, c]],
                                                                f[c]), name="image ratio")
        assert_close(t["lights"][:, 3 + c] / s["lights"][:, 3 + c],
                     torch.full((3,), f[c]), name="light ratio")
    # through the dataset: random global and per-channel factors
    aug = FaceDataset(built.path, fields=("images",),
                      augment=AugmentConfig(intensity_range=(0.5, 2.0), color_jitter=0.2))
    a = aug.sample(1, rng=5)
    light_ratio = a["lights"][:, 3:6] / s["lights"][:, 3:6]
    assert not torch.allclose(light_ratio, torch.ones(3, 3))
    for c in range(3):
        sel = (a["images"] / s["images"].clamp_min(1e-3))[:, c][bright[:, c]]
        assert_close(sel, torch.full_like(sel, float(light_ratio[0, c])), rtol=1e-4,
                     name="image/light ratio")
    assert_close(a["lights"][:, :3], s["lights"][:, :3], name="positions")


def test_noise_level_and_training_preset(built):
    ds = FaceDataset(built.path, augment=AugmentConfig(noise_std=0.05))
    clean = FaceDataset(built.path).sample(0)
    noisy = ds.sample(0, rng=2)
    diff = noisy["images"] - clean["images"]
    m = clean["mask"] > 0
    level = (clean["images"] * m).sum(dim=(1, 2, 3)) / (3 * m.sum())
    assert_close(diff.std(dim=(1, 2, 3)), 0.05 * level, rtol=0.05, name="noise std")
    assert torch.equal(noisy["normals"], clean["normals"])
    train = FaceDataset(built.path, n_images=(1, 3), augment=AugmentConfig.training())
    torch.manual_seed(0)
    batch = collate_samples([train[i] for i in range(4)])
    assert batch["images"].shape[-2:] == (SIZE, SIZE)
    assert torch.isfinite(batch["images"]).all() and torch.isfinite(batch["normals"]).all()


def test_invalid_options(built, tmp_path):
    with pytest.raises(ConfigError):
        AugmentConfig(scale_range=(2.0, 1.0))
    with pytest.raises(ConfigError):
        AugmentConfig(noise_std=-1)
    with pytest.raises(ConfigError):
        FaceDataset(built.path, n_images=0)
    with pytest.raises(ConfigError):
        FaceDataset(built.path, fields=("images", "colour"))
    with pytest.raises(DatasetError):
        FaceDataset(built.path, indices=[0, N])
    with pytest.raises(DatasetError):
        FaceDataset(tmp_path / "none.h5")
    with pytest.raises(IndexError):
        FaceDataset(built.path)[N]
