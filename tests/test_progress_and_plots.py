"""The progress helper (tqdm bars on a terminal, nothing otherwise) and the quant-report's matplotlib plots."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import pexpect
import pytest
from PIL import Image

from llama3v.errors import Llama3vError
from llama3v.evaluation.quant_plot import Point, draw_encode_vs_size, draw_size_vs_kl, require_matplotlib
from llama3v.progress import Bars, bars


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal_and_not_quiet():
    assert bars(stream=io.StringIO()) is None, "not a terminal: no output at all"
    assert bars(quiet=True, stream=_Terminal()) is None
    term = _Terminal()
    show = bars(stream=term)
    assert isinstance(show, Bars)
    show("writing a.gguf", 1, 4)
    first = show._bar
    show("writing a.gguf", 3, 4)
    assert show._bar is first and (first.n, first.total, first.desc) == (3, 4, "writing a.gguf")
    show("writing b.gguf", 2, 5)  # another task closes the first bar
    assert first.disable and (show._bar.n, show._bar.total) == (2, 5)
    show("writing b.gguf", 5, 5)  # complete: closed
    assert show._bar is None
    text = term.getvalue()  # tqdm throttles redraws; each bar is drawn when it opens, and erased when it closes
    assert "writing a.gguf:   0%" in text and "0/4" in text and "writing b.gguf:   0%" in text


def test_convert_draws_bars_on_a_terminal_and_nothing_when_piped(tiny, tmp_path):
    ckpt = tiny().ckpt
    child = pexpect.spawn(sys.executable, ["-m", "llama3v.cli", "convert", str(ckpt), "-o", str(tmp_path / "tty")],
                          encoding="utf-8", timeout=120)
    child.expect(r"writing mmproj-f16\.gguf:\s+\d+%")
    child.expect(r"writing model-f16\.gguf:\s+\d+%")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    quiet = pexpect.spawn(sys.executable, ["-m", "llama3v.cli", "convert", str(ckpt), "-o", str(tmp_path / "q"), "-q"],
                          encoding="utf-8", timeout=120)
    quiet.expect(pexpect.EOF)
    quiet.close()
    assert quiet.exitstatus == 0 and "writing" not in quiet.before and "mmproj-f16.gguf" in quiet.before
    r = subprocess.run([sys.executable, "-m", "llama3v.cli", "convert", str(ckpt), "-o", str(tmp_path / "pipe")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", "stderr is not a terminal: no progress output"


POINTS = [Point(2335.3, 0.0, "f32", "f32"), Point(1446.7, 8.5e-3, "f32", "q8_0"),
          Point(1516.4, 5.7e-3, "q8_0", "f32"), Point(627.8, 1.4e-2, "q8_0", "q8_0")]


def test_size_against_kl_plot(tmp_path):
    fig = draw_size_vs_kl(POINTS, tmp_path / "kl.png", "title")
    ax, = fig.axes
    assert ax.get_yscale() == "symlog", "a KL of 0 needs the linear part of a symlog axis"
    assert ax.get_yaxis().get_transform().linthresh == 1e-3 and ax.get_ylim()[0] == 0
    drawn = sorted(tuple(xy) for c in ax.collections for xy in c.get_offsets())
    assert drawn == sorted((p.size_mib, p.kl) for p in POINTS)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["f32", "q8_0"]
    with Image.open(tmp_path / "kl.png") as png:
        assert png.size == (960, 480) and len(png.getcolors(1 << 16)) > 5

    positive = draw_size_vs_kl(POINTS[1:], tmp_path / "kl2.png", "title")
    assert positive.axes[0].get_yscale() == "log"


def test_accuracy_panel_when_rows_carry_accuracy(tmp_path):
    points = [Point(p.size_mib, p.kl, p.label, p.group, accuracy=a) for p, a in zip(POINTS, (0.9, 0.85, 0.8, 0.5),
                                                                                  strict=True)]
    fig = draw_size_vs_kl(points, tmp_path / "kl.png", "title")
    kl, acc = fig.axes
    drawn = sorted(tuple(xy) for c in acc.collections for xy in c.get_offsets())
    assert drawn == sorted((p.size_mib, 100 * p.accuracy) for p in points)
    assert acc.get_ylim() == (0, 100) and acc.get_ylabel() == "accuracy (%)"
    with Image.open(tmp_path / "kl.png") as png:
        assert png.size == (960, 960)


def test_encode_time_against_size_plot(tmp_path):
    per = {"f32": (1117.8, 5549.0), "q8_0": (298.9, 9512.0), "q4_k": (159.9, 7525.0)}
    fig = draw_encode_vs_size(per, tmp_path / "enc.png", "title")
    ax, = fig.axes
    assert [tuple(xy) for xy in ax.collections[0].get_offsets()] == list(per.values())
    assert sorted(t.get_text() for t in ax.texts) == sorted(per)
    assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0 and math.isclose(ax.get_ylim()[1], 9512 * 1.05, rel_tol=0.1)


def test_missing_matplotlib_is_a_clean_error(monkeypatch, tmp_path):
    from llama3v.evaluation.quant_report import quant_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    with pytest.raises(Llama3vError, match=r"pip install 'llama3v\[report\]'"):
        require_matplotlib()
    with pytest.raises(Llama3vError, match="matplotlib"):
        draw_size_vs_kl(POINTS, io.BytesIO(), "title")
    with pytest.raises(Llama3vError, match="matplotlib"):  # before any measuring
        quant_report(tmp_path / "ckpt", tmp_path / "report")
    assert not (tmp_path / "report").exists()
