import matplotlib.image as mpimg
import numpy as np
from matplotlib.figure import Figure

from subseg.core import figures, overlay
from subseg.core.labels import STRUCTURES


def _phantom():
    image = np.zeros((30, 40, 20), np.float32)
    image[5:25, 5:35, 3:17] = 100.0
    classes = np.zeros(image.shape, np.uint8)
    classes[10:14, 15:20, 8:12] = 5
    return image, classes


def test_overlay_draws_structures_in_colour(tmp_path):
    image, classes = _phantom()
    plain = mpimg.imread(overlay.save_overlay(image, None, (1, 1, 2), tmp_path / "plain.png"))
    drawn = mpimg.imread(overlay.save_overlay(image, classes, (1, 1, 2), tmp_path / "seg.png"))
    assert plain.shape == drawn.shape

    def colourful(rgba):
        rgb = rgba[..., :3]
        return int(((rgb.max(-1) - rgb.min(-1)) > 0.2).sum())

    assert colourful(plain) == 0  # grey only
    assert colourful(drawn) > 50
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_slices_go_through_the_structures():
    image, classes = _phantom()
    centre = overlay.structure_centre(classes, image)
    assert centre == (12, 17, 10)  # centroid (11.5, 17, 9.5) of the block, rounded
    cuts = overlay.slice_planes(image, classes, centre)
    assert [axis for _, _, axis in cuts] == [2, 1, 0]
    assert all(cls.any() for _, cls, _ in cuts)
    axial, _, _ = cuts[0]
    assert axial.shape == (40, 30)  # rows anterior, columns right


def _legend_entries(legend):
    labels = [text.get_text() for text in legend.get_texts()]
    colours = [tuple(handle.get_facecolor()) for handle in legend.legend_handles]
    return labels, colours


def _palette_colour(cls):
    # The palette entry of a class, opaque: what the legend promises the class is drawn in.
    return (*overlay._palette().colors[cls][:3], 1.0)


def test_overlay_legend_names_each_drawn_structure_in_its_palette_colour():
    image, classes = _phantom()
    classes[16:20, 15:20, 8:12] = 6  # the left putamen beside the right one (class 5)
    fig = overlay.overlay_figure(image, classes, (1, 1, 2), title="phantom")

    (legend,) = fig.legends
    labels, colours = _legend_entries(legend)
    assert labels == ["R putamen", "L putamen"]
    assert colours == [_palette_colour(5), _palette_colour(6)]
    assert colours[0] != colours[1]  # right and left of a pair stay distinguishable
    # ... and those are the colours the slices are actually drawn with.
    drawn = fig.axes[0].images[1]
    for cls, colour in zip((5, 6), colours, strict=True):
        assert tuple(drawn.cmap(drawn.norm(cls))[:3]) == colour[:3]

    # No class map, no key (the plain overlay stays grey); an empty one says it is empty.
    assert not overlay.overlay_figure(image, None, (1, 1, 2)).legends
    (empty,) = overlay.overlay_figure(image, np.zeros_like(classes), (1, 1, 2)).legends
    assert not empty.get_texts() and "no structures" in empty.get_title().get_text()


def test_add_legend_lists_all_structures_below_the_slices(tmp_path):
    image, classes = _phantom()
    fig = Figure(figsize=(10, 6.6))
    for row_axes in fig.subplots(2, 3, squeeze=False):
        overlay.draw_row(row_axes, image, classes, (1, 1, 2), "row")
    legend = overlay.add_legend(fig)
    figures.save_figure(fig, tmp_path / "rows.png")

    labels, colours = _legend_entries(legend)
    assert labels[:2] == ["R thalamus", "L thalamus"]
    assert len(labels) == len(STRUCTURES) == 14
    assert colours == [_palette_colour(c) for c in range(1, 15)]
    # Laid out in its own band: inside the figure and below every slice, hiding no anatomy.
    to_figure = fig.transFigure.inverted()
    key = legend.get_window_extent().transformed(to_figure)
    assert key.x0 >= 0 and key.x1 <= 1 and key.y0 >= 0
    assert all(key.y1 <= ax.get_window_extent().transformed(to_figure).y0 for ax in fig.axes)
