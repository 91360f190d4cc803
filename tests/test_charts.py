"""charts.py: each chart draws every series it is given, in the palette's colour of its
position, where its numbers say, and nothing it is not given."""
import numpy as np
import pytest
from PIL import Image

from util import charts


def pixels_of(img: Image.Image, colour: str, box=None) -> int:
    """How many pixels of the image (or of box = (left, top, right, bottom)) have this colour."""
    a = np.asarray(img.crop(box) if box else img)
    rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return int((a == rgb).all(-1).sum())


def test_axes_map_the_range_onto_the_box():
    ax = charts.Axes(None, left=10, top=20, right=110, bottom=220, lo=-1.0, hi=3.0, x_lo=2.0, x_hi=4.0)
    assert (ax.px(2.0), ax.px(3.0), ax.px(4.0)) == (10, 60, 110)
    assert (ax.py(-1.0), ax.py(1.0), ax.py(3.0)) == (220, 120, 20)
    assert charts.colour(0) == charts.colour(len(charts.PALETTE)) == charts.PALETTE[0]
    assert charts.plain("M²IM − MIM") == "M2IM - MIM"


def test_loss_curve_draws_each_loss_but_the_totals(tmp_path):
    history = [{"epoch": e, "mode": "mim", "loss": 9.0 / e, "rgb": 1.0 / e, "depth": 0.5, "semseg": 2.0 / e}
               for e in (1, 2, 3)]
    charts.loss_curve(history, str(tmp_path / "a.png"))
    img = Image.open(tmp_path / "a.png").convert("RGB")
    assert img.size == (760, 360)
    assert all(pixels_of(img, charts.colour(i)) > 100 for i in range(3))     # rgb, depth, semseg
    assert pixels_of(img, charts.colour(3)) == 0                             # not "loss"
    # a fine-tuning log has only its loss: that is drawn; no history, no picture
    charts.loss_curve([{"epoch": e, "mode": "", "loss": 1.0 / e} for e in (1, 2)], str(tmp_path / "b.png"))
    assert pixels_of(Image.open(tmp_path / "b.png").convert("RGB"), charts.colour(0)) > 100
    charts.loss_curve([], str(tmp_path / "c.png"))
    assert not (tmp_path / "c.png").exists()


def test_bar_chart_bars_are_as_tall_as_their_means(tmp_path):
    bars = {"+ M²IM": [(50.0, 0.0), (20.0, 0.0)], "kd": [(10.0, 0.0), (4.0, 0.0)]}
    charts.bar_chart(["rgb + depth", "rgb only"], bars, str(tmp_path / "bars.png"), "title ± std", "mIoU")
    img = Image.open(tmp_path / "bars.png").convert("RGB")
    assert img.size == (1000, 420)
    plot = (0, 0, 1000 - 260, 420)                                           # left of the legend
    first, second = (pixels_of(img, charts.colour(i), plot) for i in range(2))
    assert first / second == pytest.approx((50 + 20) / (10 + 4), rel=0.05)    # same widths: heights' ratio
    assert pixels_of(img, charts.colour(2)) == 0


def test_line_chart_colours_a_series_alike_in_every_panel(tmp_path):
    panels = {f"{st} only: mIoU difference": {"M²IM − MIM": [(0.0, 1.0, 0.5), (0.5, -1.0, 0.2), (1.0, 0.0, 0.1)],
                                              "MaskMentor − M²IM": [(0.0, -2.0, 1.0), (1.0, 2.0, 1.0)]}
              for st in ("rgb", "depth")}
    charts.line_chart(panels, str(tmp_path / "lines.png"), ("cues 0", "cues 1"))
    img = Image.open(tmp_path / "lines.png").convert("RGB")
    for half in ((0, 0, 450, 350), (450, 0, 900, 350)):                      # each panel, above the legend
        assert all(pixels_of(img, charts.colour(i), half) > 50 for i in range(2))


def test_dot_chart_leaves_out_what_is_missing(tmp_path):
    panels = {"adapting": {"M²IM − MIM": [(0.5, 0.2), (-0.5, 0.3), (0.0, 0.1)]},
              "from scratch": {"M²IM − MIM": [(1.0, 0.5), None, None]}, "near-frozen": {}}
    charts.dot_chart(panels, ["rgb only", "depth only", "rgb + depth"], str(tmp_path / "dots.png"))
    img = Image.open(tmp_path / "dots.png").convert("RGB")
    assert img.size == (1100, 400)
    first, second = (40, 40, 380, 400), (380, 40, 720, 400)                 # the panels, below the legend
    assert all(pixels_of(img, charts.colour(i), first) > 10 for i in range(3))
    assert pixels_of(img, charts.colour(0), second) > 10
    assert pixels_of(img, charts.colour(1), second) == pixels_of(img, charts.colour(2), second) == 0


def test_row_chart_draws_the_bars_each_row_has_as_long_as_their_values(tmp_path):
    bars = {"rgb + depth": [60.0, None, 30.0], "rgb only": [20.0, None, None], "mixed": [None, 40.0, None]}
    charts.row_chart(["clean", "random missing 50%", "depth holes 10%"], bars, str(tmp_path / "rows.png"),
                     "title", "mIoU")
    img = Image.open(tmp_path / "rows.png").convert("RGB")
    assert img.size[0] == 900
    # four bars of one thickness: their areas go as their values; nothing for the Nones
    legend_box = (0, 0, 900, 60)
    area = [pixels_of(img, charts.colour(i)) - pixels_of(img, charts.colour(i), legend_box) for i in range(3)]
    assert area[0] / area[1] == pytest.approx((60 + 30) / 20, rel=0.05)
    assert area[2] / area[1] == pytest.approx(40 / 20, rel=0.05)
    assert pixels_of(img, charts.colour(3)) == 0
