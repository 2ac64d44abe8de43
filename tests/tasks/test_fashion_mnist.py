import gzip

import numpy as np
import pytest
import torch

from attnlab.tasks import create_task, get_task, list_tasks
from attnlab.tasks import fashion_mnist as fm

REAL = fm.SYSTEM_ROOT.joinpath("train-images-idx3-ubyte.gz").is_file()


def write_idx(path, array: np.ndarray, *, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_root(tmp_path):
    """A folder with small IDX files: 40 train and 20 val random 28x28 images (val ones plain, not gzipped)."""
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (40, 28, 28)), "train_labels": np.arange(40) % 10,
              "val_images": rng.integers(0, 256, (20, 28, 28)), "val_labels": (np.arange(20) * 3) % 10}
    for part, name in fm.FILES.items():
        plain = part.startswith("val")
        write_idx(tmp_path / (name if plain else f"{name}.gz"), arrays[part], compress=not plain)
    return tmp_path, arrays


def test_registered_and_listed():
    cls = get_task("fashion_mnist")
    assert cls.kind == "classify" and cls.quality == "accuracy" and cls.higher_is_better and not cls.causal
    assert "fashion_mnist" in [t.name for t in list_tasks()]


def test_read_idx_round_trip_and_bad_files(tmp_path):
    array = np.arange(2 * 3 * 5).reshape(2, 3, 5).astype(np.uint8)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "a", array, compress=False)
    assert np.array_equal(fm.read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(fm.read_idx(tmp_path / "a"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="magic"):
        fm.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match=r"shape \(10,\) \(18 bytes\) but the file has 11"):
        fm.read_idx(tmp_path / "short")


def test_pipeline_on_fake_root(fake_root):
    root, arrays = fake_root
    task = create_task("fashion_mnist", root=str(root))
    assert task.options() == {"seed": 0, "patch": 4, "train_size": None, "root": str(root)}
    assert task.seq_len == 49 and task.num_examples("train") == 40 and task.num_examples("val") == 20
    b = task.batch("train", 0, 8)
    assert b["inputs"].shape == (8, 49, 16) and b["inputs"].dtype == torch.float32
    assert b["targets"].shape == (8,) and b["targets"].dtype == torch.int64
    unit = arrays["train_images"] / 255.0
    assert task.mean == pytest.approx(unit.mean()) and task.std == pytest.approx(unit.std(ddof=1))
    val = [task.batch("val", i, 10) for i in range(2)]
    assert torch.equal(torch.cat([v["targets"] for v in val]), torch.from_numpy(arrays["val_labels"]))
    first = torch.from_numpy((arrays["val_images"][0] / 255.0 - task.mean) / task.std).float()
    assert torch.allclose(val[0]["inputs"][0, 0], first[:4, :4].reshape(16))        # top-left patch
    assert create_task("fashion_mnist", root=str(root), patch=7).batch("val", 0, 2)["inputs"].shape == (2, 16, 49)


def test_determinism_and_train_size(fake_root):
    root, arrays = fake_root
    task = create_task("fashion_mnist", root=str(root), seed=3)
    a, b = task.batch("train", 5, 16), task.batch("train", 5, 16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], task.batch("train", 6, 16)["inputs"])
    small = create_task("fashion_mnist", root=str(root), train_size=10)
    keep = np.random.default_rng(0).permutation(40)[:10]
    assert torch.equal(small.labels["train"], torch.from_numpy(arrays["train_labels"][keep]))
    assert set(small.batch("train", 0, 64)["targets"].tolist()) <= set(arrays["train_labels"][keep].tolist())


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        create_task("fashion_mnist", root=str(tmp_path))
    message = str(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert fm.ENV_VAR in message and "--task digits" in message and "train-images-idx3-ubyte" in message
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{fm.ENV_VAR}="):
        create_task("fashion_mnist")


def test_env_var_and_bad_options(fake_root, monkeypatch):
    root, _ = fake_root
    monkeypatch.setenv(fm.ENV_VAR, str(root))
    task = create_task("fashion_mnist")
    assert task.root == root and task.options()["root"] is None
    with pytest.raises(ValueError, match=r"divisor of the image side 28 \(1, 2, 4, 7, 14, 28\), got 5"):
        create_task("fashion_mnist", patch=5)
    with pytest.raises(ValueError, match="exceeds the 40"):
        create_task("fashion_mnist", train_size=41)
    with pytest.raises(TypeError, match="root"):
        create_task("fashion_mnist", root=3)
    bad = root / "bad"
    bad.mkdir()
    for file in root.iterdir():
        if file.is_file():
            (bad / file.name).write_bytes(file.read_bytes())
    write_idx(bad / "t10k-labels-idx1-ubyte", np.full(20, 12), compress=False)
    with pytest.raises(ValueError, match="val labels .* exceed 9"):
        create_task("fashion_mnist", root=str(bad))


@pytest.mark.skipif(not REAL, reason=f"Fashion-MNIST not installed in {fm.SYSTEM_ROOT}")
def test_real_data_and_mhsa_learns_it(monkeypatch):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    task = create_task("fashion_mnist", train_size=2000)
    full = fm.load_fashion_mnist(fm.SYSTEM_ROOT)
    assert full[0].shape == (60000, 28, 28) and full[2].shape == (10000, 28, 28)
    assert np.bincount(full[1]).tolist() == [6000] * 10 and np.bincount(full[3]).tolist() == [1000] * 10
    assert task.num_examples("val") == 10000
    torch.manual_seed(0)
    model = task.build_model(dim=32, num_heads=4, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = task.evaluate(model, batches=2, batch_size=256)["accuracy"]
    for i in range(100):
        loss, _ = task.loss(model, task.batch("train", i, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = task.evaluate(model, batches=2, batch_size=256)["accuracy"]
    assert start < 0.25 and end > 0.4, (start, end)    # chance is 1/10
