"""The uea task: the .ts parser on written files (variable lengths, labels, bad input), where files are
looked for, standardisation and padding, the holdout, batches as pure functions, the models it
builds, the metrics against scikit-learn, and the real BasicMotions / JapaneseVowels files."""
import numpy as np
import pytest
import torch

from attnlab.models import LSFAN
from attnlab.tasks import create_task, get_task
from attnlab.tasks import uea
from attnlab.tasks.uea import FCNBaseline, classification_metrics, find_files, read_ts, standardise_and_pad

try:
    find_files("BasicMotions"), find_files("JapaneseVowels")
    REAL = True
except FileNotFoundError:
    REAL = False
real = pytest.mark.skipif(not REAL, reason="the aeon wheel's UEA files are not installed (pip install --no-deps aeon)")


def write_ts(path, series, labels, classes, *, header_extra=""):
    lines = ["# a comment", "@problemName Fake", "@timeStamps false", "@missing false", "@univariate false",
             f"@dimensions {series[0].shape[0]}", "@equalLength false",
             "@classLabel true " + " ".join(classes), header_extra, "@data"]
    for s, y in zip(series, labels):
        lines.append(":".join(",".join(repr(float(v)) for v in row) for row in s) + ":" + classes[y])
    path.write_text("\n".join(l for l in lines if l) + "\n")


@pytest.fixture
def fake_root(tmp_path):
    """A folder BasicMotions/ with fake 6-sensor series of lengths 90..110 (so some pad, some truncate)."""
    rng = np.random.default_rng(0)
    classes = ("Standing", "Running", "Walking", "Badminton")
    folder = tmp_path / "BasicMotions"
    folder.mkdir()
    data = {}
    for split, n in (("TRAIN", 16), ("TEST", 8)):
        series = [rng.normal(3.0, 2.0, (6, int(rng.integers(90, 111)))) for _ in range(n)]
        labels = [i % 4 for i in range(n)]
        write_ts(folder / f"BasicMotions_{split}.ts", series, labels, classes)
        data[split] = (series, labels)
    return tmp_path, data


def test_registered():
    cls = get_task("uea")
    assert cls.kind == "classify" and cls.quality == "accuracy" and cls.higher_is_better and not cls.causal


def test_read_ts_parses_dimensions_lengths_and_labels(tmp_path):
    series = [np.arange(6.0).reshape(2, 3), np.arange(10.0).reshape(2, 5) / 7]
    write_ts(tmp_path / "x.ts", series, [1, 0], ("a", "b"))
    got, labels, classes = read_ts(tmp_path / "x.ts")
    assert classes == ("a", "b") and labels.tolist() == [1, 0]
    assert [g.shape for g in got] == [(2, 3), (2, 5)]
    np.testing.assert_allclose(got[1], series[1])


@pytest.mark.parametrize("body,message", [
    ("1,2:3,4:c\n", "label 'c' is not one of"),
    ("1,2:a\n", "expected 2 dimensions, got 1"),
    ("1,2:3:a\n", "different lengths"),
    ("1,?:3,4:a\n", "missing values are not supported"),
    ("1,x:3,4:a\n", "not a number"),
])
def test_read_ts_rejects_bad_lines(tmp_path, body, message):
    (tmp_path / "bad.ts").write_text("@dimensions 2\n@classLabel true a b\n@data\n" + body)
    with pytest.raises((ValueError, NotImplementedError), match=message):
        read_ts(tmp_path / "bad.ts")
    (tmp_path / "nolabel.ts").write_text("@dimensions 1\n@data\n1,2\n")
    with pytest.raises(ValueError, match="no '@classLabel"):
        read_ts(tmp_path / "nolabel.ts")


def test_find_files_root_env_and_the_error(fake_root, tmp_path, monkeypatch):
    root, _ = fake_root
    assert find_files("BasicMotions", root)[0].name == "BasicMotions_TRAIN.ts"
    monkeypatch.setenv(uea.ENV_VAR, str(root / "BasicMotions"))        # the files' own folder works too
    assert find_files("BasicMotions")[1].name == "BasicMotions_TEST.ts"
    with pytest.raises(FileNotFoundError, match=r"has no JapaneseVowels_TRAIN.ts.*pip install --no-deps aeon"):
        find_files("JapaneseVowels", tmp_path / "empty")


def test_standardise_and_pad():
    s = [np.array([[1.0, 2.0, 3.0]]), np.array([[4.0, 5.0, 6.0, 7.0, 8.0]])]
    x, lengths = standardise_and_pad(s, np.array([2.0]), np.array([0.5]), 4)
    assert x.shape == (2, 4, 1) and lengths.tolist() == [3, 5]
    np.testing.assert_allclose(x[0, :, 0], [-2, 0, 2, 0])                 # zero-padded at the end
    np.testing.assert_allclose(x[1, :, 0], [4, 6, 8, 10])                 # truncated to the first 4


def test_task_on_written_files(fake_root):
    root, data = fake_root
    task = create_task("uea", dataset="BasicMotions", root=str(root), seed=3)
    assert task.options() == {"seed": 3, "dataset": "BasicMotions", "length": 100, "holdout": 0.0, "root": str(root)}
    x, y = task.arrays("train")
    assert x.shape == (16, 100, 6) and x.dtype == torch.float32 and y.tolist() == data["TRAIN"][1]
    # standardised per sensor with the statistics of every training time step (before padding)
    steps = np.concatenate(data["TRAIN"][0], axis=1)
    np.testing.assert_allclose(task.mean, steps.mean(1)), np.testing.assert_allclose(task.std, steps.std(1))
    first = data["TRAIN"][0][0]
    t = min(first.shape[1], 100)
    np.testing.assert_allclose(x[0, :t].numpy(), ((first[:, :t] - task.mean[:, None]) / task.std[:, None]).T, rtol=1e-5)
    assert torch.all(x[0, t:] == 0)
    assert task.truncated["train"] == sum(s.shape[1] > 100 for s in data["TRAIN"][0])
    # holdout 0: val is the archive's test split
    assert torch.equal(task.arrays("val")[0], task.arrays("test")[0]) and task.num_examples("val") == 8
    # batches: pure functions of (options, seed, split, index); val is a fixed slice
    b1, b2 = task.batch("train", 5, 7), task.batch("train", 5, 7)
    assert all(torch.equal(b1[k], b2[k]) for k in b1) and b1["inputs"].shape == (7, 100, 6)
    assert not torch.equal(b1["inputs"], task.batch("train", 6, 7)["inputs"])
    v = task.batch("val", 1, 5)
    assert torch.equal(v["targets"], task.arrays("test")[1][torch.tensor([5, 6, 7, 0, 1])])
    with pytest.raises(ValueError, match="split must be one of"):
        task.batch("test", 0, 4)


def test_holdout_is_stratified_disjoint_and_fits_the_statistics(fake_root):
    root, data = fake_root
    task = create_task("uea", dataset="BasicMotions", root=str(root), holdout=0.25)
    assert task.num_examples("train") == 12 and task.num_examples("val") == 4 and task.num_examples("test") == 8
    assert sorted(task.arrays("val")[1].tolist()) == [0, 1, 2, 3]          # one per class
    assert not torch.equal(task.arrays("val")[0], task.arrays("test")[0][:4])
    train_x = task.arrays("train")[0]
    # every training and held-out series is one of the written training series, and none is in both
    rows = []
    for s in data["TRAIN"][0]:
        t = min(s.shape[1], 100)
        ref = torch.from_numpy(((s[:, :t] - task.mean[:, None]) / task.std[:, None]).T).float()
        rows.append(ref)
    def where(x):
        return [i for i, r in enumerate(rows) if torch.allclose(x[:r.shape[0]], r, atol=1e-5)]
    train_ids = [where(x)[0] for x in train_x]
    val_ids = [where(x)[0] for x in task.arrays("val")[0]]
    assert not set(train_ids) & set(val_ids) and len(set(train_ids) | set(val_ids)) == 16
    steps = np.concatenate([data["TRAIN"][0][i] for i in sorted(train_ids)], axis=1)
    np.testing.assert_allclose(task.mean, steps.mean(1))


def test_bad_options(fake_root):
    root, _ = fake_root
    with pytest.raises(ValueError, match="dataset must be one of"):
        create_task("uea", dataset="Cricket")
    with pytest.raises(ValueError, match="holdout must be a fraction"):
        create_task("uea", dataset="BasicMotions", root=str(root), holdout=1.0)
    task = create_task("uea", dataset="BasicMotions", root=str(root))
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['act'\]"):
        task.build_model(32, 2, ["mhsa"], act="gelu")
    with pytest.raises(ValueError, match="network must be one of"):
        task.build_model(32, 2, ["mhsa"], network="lstm")


def test_models_it_builds(fake_root):
    root, _ = fake_root
    task = create_task("uea", dataset="BasicMotions", root=str(root))
    tap = task.build_model(64, 2, ["mhsa"], mlp_ratio=1.0)
    assert isinstance(tap, LSFAN) and tap.width == 6 and tap.encoder[0].linear1.out_features == 6
    sap = task.build_model(64, 2, ["mhsa", "mhsa"], pooling="sap", mlp_ratio=2.0)
    assert sap.width == 22 and len(sap.encoder) == 2 and sap.encoder[0].linear1.out_features == 44
    plain = task.build_model(64, 2, ["mhsa"], attention=False)
    assert not plain.attention
    fcn = task.build_model(16, 2, ["mhsa"], network="fcn")
    assert isinstance(fcn, FCNBaseline)
    batch = task.batch("train", 0, 4)
    for model in (tap, sap, plain, fcn):
        loss, metrics = task.loss(model, batch)
        assert loss.shape == () and 0.0 <= metrics["accuracy"] <= 1.0
    scores = task.score(fcn)
    assert set(scores) == {"accuracy", "macro_f1", "mcc"}


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    g = torch.Generator().manual_seed(0)
    for classes in (2, 4, 9):
        y = torch.randint(0, classes, (200,), generator=g)
        p = torch.where(torch.rand(200, generator=g) < 0.6, y, torch.randint(0, classes, (200,), generator=g))
        p[p == classes - 1] = 0                                            # a class never predicted
        m = classification_metrics(p, y, classes)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
        assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=list(range(classes)),
                                                       zero_division=0))
        assert m["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    assert classification_metrics(torch.zeros(5), torch.zeros(5), 3)["mcc"] == 0.0
    with pytest.raises(ValueError, match="expected predictions and targets of one shape"):
        classification_metrics(torch.zeros(3), torch.zeros(4), 2)


@real
def test_real_files_shapes_classes_and_standardisation():
    bm = create_task("uea", dataset="BasicMotions")
    assert bm.class_names == ("Standing", "Running", "Walking", "Badminton")
    for split in ("train", "test"):
        x, y = bm.arrays(split)
        assert x.shape == (40, 100, 6) and torch.bincount(y).tolist() == [10, 10, 10, 10]
    x = bm.arrays("train")[0]
    torch.testing.assert_close(x.mean((0, 1)), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 1), unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    jv = create_task("uea", dataset="JapaneseVowels")
    assert jv.arrays("train")[0].shape == (270, 29, 12) and jv.arrays("test")[0].shape == (370, 29, 12)
    assert torch.bincount(jv.arrays("train")[1]).tolist() == [30] * 9 and jv.num_classes == 9
    test = jv.batch("val", 0, 370)                                           # the whole test split, in order
    lengths = test["lengths"]
    assert int(lengths.min()) == 7 and int(lengths.max()) == 29 and jv.truncated == {"train": 0, "test": 0, "val": 0}
    # padding sits at the training mean (0 after standardisation) past each series' end
    short = int(torch.argmin(lengths))
    assert torch.all(test["inputs"][short, int(lengths[short]):] == 0)
    assert torch.all(test["inputs"][short, :int(lengths[short])].abs().sum(-1) > 0)
