import matplotlib.image as mpimg
import numpy as np

from subseg import overlay


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
