"""Data layer: image loading, COCO dataset, collate, converters and the dataset doctor.

Every bad input gets a test asserting what the message says. Datasets are built by hand in tmp_path,
with boxes and sizes chosen so the right answers can be worked out on paper.
"""
import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from detlearn.data.coco import (CocoDetection, collate_detection, load_coco_json, load_image, pil_to_rgb,
                                read_image_size)
from detlearn.data.convert import voc_to_coco, yolo_to_coco
from detlearn.data.doctor import DatasetError, check_dataset, drop_bad_annotations, main_check, main_convert
from detlearn.utils import DetlearnError, resource_dir


# ---------------------------------------------------------------- helpers

def save_rgb(path, h, w, value=0):
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


@pytest.fixture
def good(tmp_path):
    """A healthy dataset: a.jpg 40x30 with two boxes (one crowd), b.jpg 20x20 without objects; ids 3 and 7."""
    save_rgb(tmp_path / 'a.jpg', 30, 40)
    save_rgb(tmp_path / 'b.jpg', 20, 20)
    data = {'images': [{'id': 1, 'file_name': 'a.jpg', 'width': 40, 'height': 30},
                       {'id': 2, 'file_name': 'b.jpg', 'width': 20, 'height': 20}],
            'annotations': [{'id': 1, 'image_id': 1, 'category_id': 7, 'bbox': [5, 6, 10, 12], 'iscrowd': 0},
                            {'id': 2, 'image_id': 1, 'category_id': 3, 'bbox': [0, 0, 40, 30], 'iscrowd': 1}],
            'categories': [{'id': 7, 'name': 'dog'}, {'id': 3, 'name': 'car'}]}
    return tmp_path, data


def write(tmp_path, data, name='ann.json'):
    (tmp_path / name).write_text(json.dumps(data))
    return tmp_path / name


def kinds(report, severity=None):
    return {p.kind for p in report.problems if severity is None or p.severity == severity}


# ---------------------------------------------------------------- load_image

def test_exif_orientation_applied(tmp_path):
    stored = np.zeros((2, 4, 3), np.uint8)
    stored[:, :2] = (255, 0, 0)  # left half red in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: the left half goes to the top
    Image.fromarray(stored).save(tmp_path / 'r.jpg', exif=exif, quality=100)
    im = load_image(tmp_path / 'r.jpg')
    assert im.shape == (4, 2, 3)
    assert im[:2, :, 0].min() > 200 and im[2:, :, 0].max() < 50
    assert read_image_size(tmp_path / 'r.jpg') == (4, 2)


@pytest.mark.parametrize('orientation,expected_hw', [(1, (2, 4)), (3, (2, 4)), (8, (4, 2))])
def test_exif_other_orientations(tmp_path, orientation, expected_hw):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(tmp_path / 'o.png', exif=exif)
    assert load_image(tmp_path / 'o.png').shape[:2] == expected_hw
    assert read_image_size(tmp_path / 'o.png') == expected_hw


def test_16bit_png_scaled_to_8bit(tmp_path):
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(tmp_path / 'd.png')
    im = load_image(tmp_path / 'd.png')
    assert im.dtype == np.uint8 and im.shape == (1, 3, 3)
    assert im[0, :, 0].tolist() == [0, 100, 255] and (im[..., 0] == im[..., 2]).all()


def test_grayscale_to_rgb(tmp_path):
    Image.fromarray(np.array([[0, 77, 255]], np.uint8)).save(tmp_path / 'g.png')
    assert load_image(tmp_path / 'g.png')[0].tolist() == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]


def test_rgba_drops_alpha(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 128]]], np.uint8)
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
    im = load_image(tmp_path / 'a.png')
    assert im.shape == (1, 2, 3) and im[0].tolist() == [[10, 20, 30], [40, 50, 60]]
    assert pil_to_rgb(Image.fromarray(rgba, 'RGBA'))[0].tolist() == [[10, 20, 30], [40, 50, 60]]


def test_palette_to_rgb(tmp_path):
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), 'P')
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / 'p.png')
    assert load_image(tmp_path / 'p.png')[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_load_image_missing_and_truncated(tmp_path):
    with pytest.raises(DetlearnError, match='not found'):
        load_image(tmp_path / 'nope.jpg')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / 'n.jpg')
    (tmp_path / 'cut.jpg').write_bytes((tmp_path / 'n.jpg').read_bytes()[:700])
    with pytest.raises(DetlearnError, match=r'cut\.jpg.*truncated'):
        load_image(tmp_path / 'cut.jpg')
    (tmp_path / 'text.jpg').write_text('not an image')
    with pytest.raises(DetlearnError, match=r'Cannot decode image .*text\.jpg'):
        load_image(tmp_path / 'text.jpg')


# ---------------------------------------------------------------- json and dataset

def test_malformed_json_names_file(tmp_path):
    (tmp_path / 'broken.json').write_text('{"images": [')
    with pytest.raises(DetlearnError, match=r'broken\.json is not valid JSON'):
        load_coco_json(tmp_path / 'broken.json')
    with pytest.raises(DetlearnError, match=r'broken\.json is not valid JSON'):
        check_dataset(tmp_path / 'broken.json', tmp_path)


def test_missing_keys_named(tmp_path):
    (tmp_path / 'k.json').write_text(json.dumps({'images': [], 'annotations': []}))
    with pytest.raises(DetlearnError, match=r"k\.json: missing the 'categories' list"):
        load_coco_json(tmp_path / 'k.json')
    (tmp_path / 'k2.json').write_text(json.dumps({'images': [], 'categories': [{'id': 1, 'name': 'a'}],
                                                  'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1}]}))
    with pytest.raises(DetlearnError, match=r"annotations\[0\] lacks key\(s\) \['bbox'\]"):
        load_coco_json(tmp_path / 'k2.json')


def test_dataset_targets_and_remap(good):
    tmp_path, data = good
    ds = CocoDetection(write(tmp_path, data), tmp_path)
    assert ds.class_names == ['car', 'dog'] and ds.cat_ids == [3, 7] and ds.cat_id_to_label == {3: 0, 7: 1}
    image, target = ds[0]
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8
    # xywh [5, 6, 10, 12] -> xyxy [5, 6, 15, 18]; the crowd box is left out
    assert target['boxes'].tolist() == [[5, 6, 15, 18]] and target['boxes'].dtype == np.float32
    assert target['labels'].tolist() == [1] and target['labels'].dtype == np.int64
    assert target['image_id'] == 1 and target['orig_size'] == (30, 40) and target['size'] == (30, 40)
    # label -> category id round trip, as used when writing COCO results
    assert [ds.cat_ids[ds.cat_id_to_label[c]] for c in (3, 7)] == [3, 7]


def test_dataset_image_without_objects(good):
    tmp_path, data = good
    ds = CocoDetection(write(tmp_path, data), tmp_path)
    image, target = ds[1]
    assert image.shape == (20, 20, 3)
    assert target['boxes'].shape == (0, 4) and target['labels'].shape == (0,)


def test_dataset_refuses_broken_and_drop_bad(good):
    tmp_path, data = good
    data['annotations'].append({'id': 3, 'image_id': 1, 'category_id': 7, 'bbox': [5, 5, 0, 4]})
    ann = write(tmp_path, data)
    with pytest.raises(DatasetError, match='empty_box'):
        CocoDetection(ann, tmp_path)
    with pytest.warns(UserWarning, match='dropped 1 annotations'):
        ds = CocoDetection(ann, tmp_path, drop_bad=True)
    assert ds[0][1]['boxes'].tolist() == [[5, 6, 15, 18]]
    ds = CocoDetection(ann, tmp_path, check=False)  # no check: the empty box is dropped when the target is built
    assert ds[0][1]['boxes'].tolist() == [[5, 6, 15, 18]]


def test_photos_sample():
    photos = resource_dir('data_samples') / 'photos'
    ds = CocoDetection(photos / 'annotations.json', photos / 'images')
    assert len(ds) == 5 and len(ds.class_names) == 80
    assert ds.cat_ids[ds.class_names.index('cat')] == 17 and ds.cat_ids[ds.class_names.index('cup')] == 47
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.ndim == 3 and image.shape[2] == 3 and image.shape[:2] == target['size']
        assert max(image.shape[:2]) <= 512


# ---------------------------------------------------------------- collate

def test_collate_pads_bottom_right_with_mask():
    a, b = torch.ones(3, 5, 7), torch.full((3, 8, 4), 2.0)
    images, masks, targets = collate_detection([(a, {'i': 0}), (b, {'i': 1})])
    assert images.shape == (2, 3, 8, 7) and masks.shape == (2, 8, 7) and masks.dtype == torch.bool
    assert targets == [{'i': 0}, {'i': 1}]
    assert torch.equal(images[0, :, :5, :], a) and images[0, :, 5:].eq(0).all()
    assert torch.equal(images[1, :, :, :4], b) and images[1, :, :, 4:].eq(0).all()
    assert (~masks[0, :5]).all() and masks[0, 5:].all()
    assert (~masks[1, :, :4]).all() and masks[1, :, 4:].all()


def test_collate_size_divisor():
    images, masks, _ = collate_detection([(torch.ones(3, 33, 20), {})], size_divisor=32)
    assert images.shape == (1, 3, 64, 32) and masks[0].sum() == 64 * 32 - 33 * 20


def test_collate_refuses_numpy():
    with pytest.raises(DetlearnError, match=r'Add ToTensor\(\)'):
        collate_detection([(np.zeros((5, 7, 3), np.uint8), {})])


# ---------------------------------------------------------------- doctor: one test per bad input

def test_doctor_clean_dataset_no_objects_is_info(good):
    tmp_path, data = good
    report = check_dataset(write(tmp_path, data), tmp_path)
    assert report.ok and not report.errors and not report.warnings
    assert [(p.kind, p.image_id, p.file_name) for p in report.infos] == [('no_objects', 2, 'b.jpg')]
    assert 'No problems' not in report.format() and 'no_objects' in report.format()
    report.raise_if_errors()  # nothing to raise


def only_error(report, kind):
    rows = [p for p in report.errors if p.kind == kind]
    assert len(rows) == 1, report.format()
    assert kinds(report, 'error') == {kind}, report.format()
    return rows[0]


def test_doctor_missing_file(good):
    tmp_path, data = good
    (tmp_path / 'b.jpg').unlink()
    p = only_error(check_dataset(data, tmp_path), 'missing_file')
    assert p.file_name == 'b.jpg' and p.image_id == 2 and 'does not exist' in p.message


def test_doctor_truncated_file(good):
    tmp_path, data = good
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / 'n.jpg')
    (tmp_path / 'a.jpg').write_bytes((tmp_path / 'n.jpg').read_bytes()[:700])
    p = only_error(check_dataset(data, tmp_path), 'unreadable_file')
    assert p.file_name == 'a.jpg' and p.image_id == 1 and 'truncated' in p.message
    assert check_dataset(data, tmp_path, decode=False).ok  # the header alone is intact


def test_doctor_wrong_size(good):
    tmp_path, data = good
    data['images'][0]['height'] = 31
    p = only_error(check_dataset(data, tmp_path), 'size_mismatch')
    assert p.image_id == 1 and 'recorded 40x31' in p.message and 'file is 40x30 after EXIF orientation' in p.message


def test_doctor_wrong_size_exif(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / 'r.jpg', exif=exif)  # stored 40x30, shown 30x40
    data = {'images': [{'id': 1, 'file_name': 'r.jpg', 'width': 40, 'height': 30}], 'annotations': [],
            'categories': [{'id': 1, 'name': 'a'}]}
    p = only_error(check_dataset(data, tmp_path), 'size_mismatch')
    assert 'file is 30x40 after EXIF orientation' in p.message
    data['images'][0].update(width=30, height=40)
    assert check_dataset(data, tmp_path).ok


def test_doctor_zero_and_negative_area(good):
    tmp_path, data = good
    data['annotations'] += [{'id': 3, 'image_id': 1, 'category_id': 7, 'bbox': [5, 5, 0, 4]},
                            {'id': 4, 'image_id': 1, 'category_id': 7, 'bbox': [5, 5, 3, -2]}]
    report = check_dataset(data, tmp_path)
    assert kinds(report, 'error') == {'empty_box'}
    assert sorted(p.ann_id for p in report.errors) == [3, 4]
    assert 'zero or negative area' in report.errors[0].message


def test_doctor_box_outside(good):
    tmp_path, data = good
    data['annotations'] += [{'id': 3, 'image_id': 1, 'category_id': 7, 'bbox': [30, 5, 20, 10]},   # x1 = 50 > 40
                            {'id': 4, 'image_id': 1, 'category_id': 7, 'bbox': [-0.5, 0, 40.9, 30]}]  # within 1 px
    p = only_error(check_dataset(data, tmp_path), 'box_outside')
    assert p.ann_id == 3 and '[30, 5, 50, 15]' in p.message and '40x30 image' in p.message


def test_doctor_bad_bbox(good):
    tmp_path, data = good
    data['annotations'].append({'id': 3, 'image_id': 1, 'category_id': 7, 'bbox': [1, 2, 3]})
    p = only_error(check_dataset(data, tmp_path), 'bad_bbox')
    assert p.ann_id == 3 and 'not 4 finite numbers' in p.message


def test_doctor_undeclared_category(good):
    tmp_path, data = good
    data['annotations'].append({'id': 3, 'image_id': 1, 'category_id': 99, 'bbox': [1, 1, 2, 2]})
    p = only_error(check_dataset(data, tmp_path), 'unknown_category')
    assert p.ann_id == 3 and p.file_name == 'a.jpg' and 'category_id 99 is not declared' in p.message


def test_doctor_category_id_zero_is_warning(good):
    tmp_path, data = good
    data['categories'].append({'id': 0, 'name': 'zero'})
    report = check_dataset(data, tmp_path)
    assert report.ok and [p.kind for p in report.warnings] == ['category_id_zero']
    assert "'zero' has id 0" in report.warnings[0].message and 'background' in report.format()


@pytest.mark.parametrize('section,kind', [('images', 'duplicate_image_id'), ('annotations', 'duplicate_annotation_id'),
                                          ('categories', 'duplicate_category_id')])
def test_doctor_duplicate_ids(good, section, kind):
    tmp_path, data = good
    data[section].append(copy.deepcopy(data[section][0]))
    report = check_dataset(data, tmp_path)
    assert kind in kinds(report, 'error')
    assert any(p.kind == kind and f'is used by 2 {section}' in p.message for p in report.errors)


def test_doctor_unknown_image_id(good):
    tmp_path, data = good
    data['annotations'].append({'id': 3, 'image_id': 42, 'category_id': 7, 'bbox': [1, 1, 2, 2]})
    p = only_error(check_dataset(data, tmp_path), 'unknown_image')
    assert p.image_id == 42 and p.ann_id == 3 and "image_id 42 is not in 'images'" in p.message


def test_report_format_and_raise(good):
    tmp_path, data = good
    data['annotations'] += [{'id': 3 + i, 'image_id': 1, 'category_id': 7, 'bbox': [5, 5, 0, 4]} for i in range(7)]
    report = check_dataset(data, tmp_path)
    text = report.format(max_rows=3)
    assert '7 errors' in text and 'empty_box' in text and '... and 4 more' in text and 'how to fix' in text
    assert 'a.jpg  image 1  ann 3' in text
    with pytest.raises(DatasetError) as e:
        report.raise_if_errors()
    assert str(e.value) == report.format() and isinstance(e.value, DetlearnError)


def test_drop_bad_annotations(good):
    tmp_path, data = good
    (tmp_path / 'c.jpg').write_text('junk')
    data['images'].append({'id': 3, 'file_name': 'c.jpg', 'width': 5, 'height': 5})
    data['annotations'] += [{'id': 3, 'image_id': 1, 'category_id': 7, 'bbox': [5, 5, 0, 4]},
                            {'id': 4, 'image_id': 3, 'category_id': 7, 'bbox': [1, 1, 2, 2]}]
    report = check_dataset(data, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        clean, n = drop_bad_annotations(data, report)
    assert n == 2 and 'dropped 2 annotations and 1 images' in str(caught[0].message)
    assert [a['id'] for a in clean['annotations']] == [1, 2] and [i['id'] for i in clean['images']] == [1, 2]
    assert len(data['annotations']) == 4  # the input is not modified
    assert check_dataset(clean, tmp_path).ok


def test_main_check_exit_codes(good, capsys):
    tmp_path, data = good
    assert main_check(write(tmp_path, data), tmp_path) == 0
    data['annotations'][0]['category_id'] = 5
    assert main_check(write(tmp_path, data, 'bad.json'), tmp_path) == 3  # the data (DataError.exit_code)
    assert 'unknown_category' in capsys.readouterr().out
    (tmp_path / 'junk.json').write_text('nope')
    assert main_check(tmp_path / 'junk.json', tmp_path) == 3
    err = capsys.readouterr().err
    assert 'junk.json is not valid JSON' in err and 'Traceback' not in err


# ---------------------------------------------------------------- converters

def test_yolo_to_coco_hand_computed(tmp_path):
    (tmp_path / 'img').mkdir(); (tmp_path / 'lbl').mkdir()
    save_rgb(tmp_path / 'img' / 'a.png', 100, 200)
    save_rgb(tmp_path / 'img' / 'b.png', 10, 10)  # no label file: background image
    (tmp_path / 'lbl' / 'a.txt').write_text('1 0.5 0.5 0.2 0.4\n\n0 0.25 0.75 0.5 0.5\n')
    (tmp_path / 'names.txt').write_text('cat\ndog\n')
    d = yolo_to_coco(tmp_path / 'img', tmp_path / 'lbl', tmp_path / 'names.txt', tmp_path / 'out.json')
    assert [a['bbox'] for a in d['annotations']] == [[80, 30, 40, 40], [0, 50, 100, 50]]
    assert [a['category_id'] for a in d['annotations']] == [2, 1] and [a['area'] for a in d['annotations']] == [1600, 5000]
    assert d['categories'] == [{'id': 1, 'name': 'cat'}, {'id': 2, 'name': 'dog'}]
    assert [(i['file_name'], i['width'], i['height']) for i in d['images']] == [('a.png', 200, 100), ('b.png', 10, 10)]
    assert json.loads((tmp_path / 'out.json').read_text()) == d
    assert check_dataset(tmp_path / 'out.json', tmp_path / 'img').ok


@pytest.mark.parametrize('line,message', [('2 0.5 0.5 0.1 0.1', r'a\.txt:1: class 2 is outside 0\.\.1'),
                                          ('0 50 50 10 10', 'normalised'),
                                          ('0 0.1 0.1 0.2 0.1 0.3 0.3', 'segmentation'),
                                          ('0 0.1 x 0.2 0.1', 'not numbers')])
def test_yolo_bad_lines(tmp_path, line, message):
    (tmp_path / 'img').mkdir(); (tmp_path / 'lbl').mkdir()
    save_rgb(tmp_path / 'img' / 'a.png', 10, 10)
    (tmp_path / 'lbl' / 'a.txt').write_text(line + '\n')
    with pytest.raises(DetlearnError, match=message):
        yolo_to_coco(tmp_path / 'img', tmp_path / 'lbl', ['cat', 'dog'])


VOC = """<annotation><filename>a.png</filename><size><width>200</width><height>100</height><depth>3</depth></size>
<object><name>dog</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>200</xmax><ymax>100</ymax></bndbox></object>
<object><name>cat</name><difficult>1</difficult><bndbox><xmin>11</xmin><ymin>31</ymin><xmax>20</xmax><ymax>40</ymax></bndbox></object>
</annotation>"""


def test_voc_to_coco_hand_computed(tmp_path):
    (tmp_path / 'xml').mkdir(); (tmp_path / 'img').mkdir()
    save_rgb(tmp_path / 'img' / 'a.png', 100, 200)
    (tmp_path / 'xml' / 'a.xml').write_text(VOC)
    d = voc_to_coco(tmp_path / 'xml', tmp_path / 'img', tmp_path / 'v.json')
    # 1-based inclusive pixels 1..200 x 1..100 are the whole image; 11..20 x 31..40 is 10x10 at (10, 30)
    assert [a['bbox'] for a in d['annotations']] == [[0, 0, 200, 100], [10, 30, 10, 10]]
    assert [a['iscrowd'] for a in d['annotations']] == [0, 1]  # difficult -> crowd by default
    assert [c['name'] for c in d['categories']] == ['cat', 'dog'] and d['annotations'][0]['category_id'] == 2
    assert [a['iscrowd'] for a in voc_to_coco(tmp_path / 'xml', tmp_path / 'img', difficult='keep')['annotations']] == [0, 0]
    assert len(voc_to_coco(tmp_path / 'xml', tmp_path / 'img', difficult='drop')['annotations']) == 1
    ds = CocoDetection(tmp_path / 'v.json', tmp_path / 'img')
    assert ds[0][1]['boxes'].tolist() == [[0, 0, 200, 100]]  # the difficult (crowd) box is not a training target


def test_voc_errors(tmp_path):
    (tmp_path / 'xml').mkdir(); (tmp_path / 'img').mkdir()
    save_rgb(tmp_path / 'img' / 'a.png', 100, 200)
    (tmp_path / 'xml' / 'a.xml').write_text(VOC)
    with pytest.raises(DetlearnError, match="class 'cat' is not in class_names"):
        voc_to_coco(tmp_path / 'xml', tmp_path / 'img', class_names=['dog'])
    (tmp_path / 'xml' / 'a.xml').write_text('<annotation><object>')
    with pytest.raises(DetlearnError, match=r'a\.xml is not valid XML'):
        voc_to_coco(tmp_path / 'xml', tmp_path / 'img')
    with pytest.raises(DetlearnError, match='No .xml files'):
        voc_to_coco(tmp_path / 'img', tmp_path / 'img')


def test_yolo_and_voc_samples_agree():
    root = resource_dir('data_samples') / 'convert'
    y = yolo_to_coco(root / 'yolo/images', root / 'yolo/labels', root / 'yolo/classes.txt')
    v = voc_to_coco(root / 'voc/Annotations', root / 'voc/JPEGImages', class_names=root / 'yolo/classes.txt')
    assert y['images'] == v['images'] and y['categories'] == v['categories']
    assert len(y['annotations']) == len(v['annotations']) == 4
    for a, b in zip(y['annotations'], v['annotations']):
        assert a['image_id'] == b['image_id'] and a['category_id'] == b['category_id']
        assert np.abs(np.array(a['bbox']) - np.array(b['bbox'])).max() <= 1.0


def test_main_convert(tmp_path, capsys):
    root = resource_dir('data_samples') / 'convert'
    out = tmp_path / 'c.json'
    assert main_convert('voc', out, root / 'voc/JPEGImages', root / 'voc/Annotations') == 0
    assert 'wrote' in capsys.readouterr().out and out.is_file()
    assert main_convert('yolo', out, root / 'yolo/images', root / 'yolo/labels', root / 'yolo/classes.txt') == 0
    assert main_convert('kitti', out, root) == 2
    assert "unknown format 'kitti'" in capsys.readouterr().err
