"""The bundled shapes split is what the generator makes, and its boxes agree with the rendered pixels."""
import json

import numpy as np
import pytest

from detlearn.data.samples import (ShapesConfig, draw_clutter, make_background, make_shapes_image,
                                   place_shapes, render_scene, sample_dataset)
from detlearn.utils import DetlearnError


@pytest.mark.parametrize('split,seed', [('train', 0), ('val', 1)])
def test_bundled_split_matches_generator(split, seed):
    """Guards against drift: change the generator, and the bundled data must be regenerated too."""
    ann_file, images_dir = sample_dataset('shapes', split)
    coco = json.loads(ann_file.read_text())
    assert [c['id'] for c in coco['categories']] == [1, 3, 5, 7]
    by_image = {}
    for a in coco['annotations']: by_image.setdefault(a['image_id'], []).append(a)
    for info in coco['images'][:40]:
        assert (images_dir / info['file_name']).is_file()
        _, anns = make_shapes_image(seed, info['id'] - 1, info['width'])
        got = [{k: a[k] for k in ('category_id', 'bbox', 'area', 'iscrowd')} for a in by_image.get(info['id'], [])]
        assert got == anns, info['file_name']


def _scene(seed, index, size, cfg):
    """Replay make_shapes_image's random stream up to the placed shapes."""
    rng = np.random.default_rng([seed, index])
    background = make_background(rng, (size, size), cfg)
    draw_clutter(rng, background, int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1)))
    specs, masks = place_shapes(rng, background, cfg)
    return background, specs, masks


def test_occluded_boxes_are_amodal():
    """A partly hidden shape's box encloses the whole shape: render it alone and compare with the changed pixels."""
    cfg = ShapesConfig(objects_per_image=(5, 8), max_occlusion=0.4)
    checked = 0
    for index in range(10):
        background, specs, masks = _scene(3, index, 128, cfg)
        _, anns = make_shapes_image(3, index, 128, cfg)
        plain = render_scene(background, [], [])
        everything = render_scene(background, specs, masks)
        for i, ann in enumerate(anns):
            later = [j for j in range(i + 1, len(specs)) if (masks[i] & masks[j]).any()]
            if not later: continue
            alone = render_scene(background, specs[i:i + 1], masks[i:i + 1])
            ys, xs = np.nonzero((alone != plain).any(-1))
            x, y, w, h = ann['bbox']
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x, y, x + w, y + h]
            # area counts only the visible pixels: those that change when shape i is taken out of the scene
            without = render_scene(background, specs[:i] + specs[i + 1:], masks[:i] + masks[i + 1:])
            assert ann['area'] == int((everything != without).any(-1).sum()) < len(xs)
            checked += 1
    assert checked >= 5


def test_sample_dataset_errors():
    with pytest.raises(DetlearnError, match='available: shapes, photos'): sample_dataset('coco')
    with pytest.raises(DetlearnError, match="no split 'test'"): sample_dataset('shapes', 'test')
    ann_file, images_dir = sample_dataset('photos')
    images = json.loads(ann_file.read_text())['images']
    assert images and all((images_dir / i['file_name']).is_file() for i in images)
