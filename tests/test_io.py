"""attnlab._io: atomic writes of text and figures (a reader sees the old file or the new one)."""
import pytest

from attnlab._io import atomic_write, save_figure, write_text

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def test_save_figure_writes_png_and_leaves_no_temp(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "a.png", dpi=50)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_a_failing_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"old")

    class Broken:
        def savefig(self, *args, **kwargs):
            with open(args[0], "wb") as f:
                f.write(b"half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(Broken(), target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.png"]
    write_text(tmp_path / "t.txt", "new")
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "t.txt", lambda tmp: (tmp.write_text("half"), 1 / 0))
    assert (tmp_path / "t.txt").read_text() == "new"
