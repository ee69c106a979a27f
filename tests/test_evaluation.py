"""COCO evaluation: ground truth scored as predictions gives AP 1, agreement with faster_coco_eval, edge cases."""
import warnings

import numpy as np
import pytest
import torch

from detlearn.evaluation import CocoEvaluator, confusion_matrix, evaluate_coco, to_coco_results, STAT_NAMES
from detlearn.utils import DetlearnError

CAT_IDS = [2, 5, 9]  # non-contiguous on purpose: label k is category CAT_IDS[k]


def _gt() -> dict:
    """Four 200x160 images with small, medium and large boxes of three classes; image 4 has no objects."""
    anns = [(1, 2, [10, 10, 20, 15]), (1, 5, [50, 40, 60, 50]), (1, 9, [0, 0, 150, 120]),
            (2, 2, [30, 30, 40, 40]), (2, 2, [100, 20, 50, 60]), (2, 9, [5, 90, 25, 20]),
            (3, 5, [60, 60, 100, 90]), (3, 9, [10, 10, 12, 14])]
    return {'images': [{'id': i, 'width': 200, 'height': 160, 'file_name': f'{i}.jpg'} for i in (1, 2, 3, 4)],
            'categories': [{'id': c, 'name': n} for c, n in zip(CAT_IDS, ['cat', 'dog', 'bird'])],
            'annotations': [{'id': k + 1, 'image_id': i, 'category_id': c, 'bbox': b, 'area': b[2] * b[3], 'iscrowd': 0}
                            for k, (i, c, b) in enumerate(anns)]}


def _gt_predictions(gt: dict, image_ids) -> list[dict]:
    """Annotations as postprocess outputs: xyxy pixel boxes, contiguous labels, score 1."""
    preds = []
    for i in image_ids:
        anns = [a for a in gt['annotations'] if a['image_id'] == i]
        xywh = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        preds.append({'boxes': torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), 'scores': torch.ones(len(anns)),
                      'labels': torch.tensor([CAT_IDS.index(a['category_id']) for a in anns], dtype=torch.int64)})
    return preds


def _noisy_results(gt: dict) -> list[dict]:
    """A hand-written imperfect results list: shifted boxes, a wrong class, a miss, false positives."""
    return [{'image_id': 1, 'category_id': 2, 'bbox': [12, 11, 20, 15], 'score': 0.9},
            {'image_id': 1, 'category_id': 5, 'bbox': [55, 45, 60, 50], 'score': 0.4},
            {'image_id': 1, 'category_id': 9, 'bbox': [0, 0, 140, 120], 'score': 0.95},
            {'image_id': 2, 'category_id': 2, 'bbox': [30, 30, 40, 40], 'score': 0.3},
            {'image_id': 2, 'category_id': 5, 'bbox': [100, 20, 50, 60], 'score': 0.8},
            {'image_id': 2, 'category_id': 9, 'bbox': [150, 100, 30, 30], 'score': 0.7},
            {'image_id': 3, 'category_id': 5, 'bbox': [62, 58, 100, 90], 'score': 0.6},
            {'image_id': 4, 'category_id': 2, 'bbox': [10, 10, 30, 30], 'score': 0.5}]


def test_ground_truth_as_predictions_gives_ap_one():
    gt = _gt()
    ev = CocoEvaluator(gt, CAT_IDS)
    ev.update([1, 2], _gt_predictions(gt, [1, 2]))
    ev.update([3, 4], _gt_predictions(gt, [3, 4]))
    result = ev.summarize()
    for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR10', 'AR100'):
        assert result.stats[name] == pytest.approx(1.0, abs=1e-12), name
    assert [r['AP'] for r in result.per_class] == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    assert [r['num_gt'] for r in result.per_class] == [3, 2, 3]
    assert [r['category_id'] for r in result.per_class] == CAT_IDS


def test_matches_faster_coco_eval():
    from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster
    gt, results = _gt(), _noisy_results(_gt())
    ours = evaluate_coco(gt, results)
    assert 0.1 < ours.stats['AP'] < 0.9  # imperfect predictions cost AP
    fgt = FasterCOCO(gt, print_function=lambda *a: None)
    fev = COCOeval_faster(fgt, fgt.loadRes([dict(r) for r in results]), 'bbox', print_function=lambda *a: None)
    fev.evaluate(); fev.accumulate(); fev.summarize()
    np.testing.assert_allclose([ours.stats[n] for n in STAT_NAMES], fev.stats[:12], atol=1e-6)


def test_to_coco_results_maps_labels_and_boxes():
    pred = {'boxes': np.array([[10., 20., 50., 80.]]), 'scores': np.array([0.5]), 'labels': np.array([2])}
    assert to_coco_results([4], [pred], CAT_IDS) == [{'image_id': 4, 'category_id': 9, 'bbox': [10., 20., 40., 60.], 'score': 0.5}]
    with pytest.raises(DetlearnError, match=r'predicted labels \[3\] but the dataset has 3 classes'):
        to_coco_results([4], [{**pred, 'labels': np.array([3])}], CAT_IDS)


def test_empty_results_warn_and_give_zero():
    with pytest.warns(UserWarning, match='No detections'):
        result = CocoEvaluator(_gt(), CAT_IDS).summarize()
    assert result.stats['AP'] == 0.0 and result.stats['AR100'] == 0.0


def test_unknown_category_and_image_raise():
    gt = _gt()
    with pytest.raises(DetlearnError, match=r'category ids \[0\] that the ground truth does not define'):
        evaluate_coco(gt, [{'image_id': 1, 'category_id': 0, 'bbox': [0, 0, 5, 5], 'score': 0.5}])
    with pytest.raises(DetlearnError, match=r'image ids \[77\]'):
        evaluate_coco(gt, [{'image_id': 77, 'category_id': 2, 'bbox': [0, 0, 5, 5], 'score': 0.5}])


def test_merge_counts_each_image_once():
    gt = _gt()
    shards = [CocoEvaluator(gt, CAT_IDS) for _ in range(2)]
    shards[0].update([1, 3], _gt_predictions(gt, [1, 3]))
    shards[1].update([2, 4, 1], _gt_predictions(gt, [2, 4, 1]))  # image 1 repeated as sampler padding
    shards[1].merge([s.state() for s in shards])
    assert sorted(shards[1].image_ids) == [1, 2, 3, 4]
    assert len(shards[1].results) == len(gt['annotations'])
    assert shards[1].summarize().stats['AP'] == pytest.approx(1.0, abs=1e-12)


def test_confusion_matrix_hand_counted():
    # At score >= 0.5 and IoU >= 0.5: image 1 cat ok, bird ok (IoU 0.93), dog missed (its box scores 0.4);
    # image 2: dog box on the 2nd cat (confusion), 1st cat missed (score 0.3), bird false alarm + bird missed;
    # image 3: dog ok, bird missed; image 4: a false cat.
    cm = confusion_matrix(_gt(), _noisy_results(_gt()), score_threshold=0.5, iou_threshold=0.5)
    expected = np.array([[1, 1, 0, 1],
                         [0, 1, 0, 1],
                         [0, 0, 1, 2],
                         [1, 0, 1, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)



def test_synchronize_gathers_other_ranks(monkeypatch):
    """synchronize() = all_gather_object(state) + merge; torch.distributed is faked as rank 0 of 2."""
    import pickle
    import torch.distributed as dist
    gt = _gt()
    other = CocoEvaluator(gt, CAT_IDS)
    other.update([2, 4, 1], _gt_predictions(gt, [2, 4, 1]))  # rank 1, repeating image 1 as sampler padding

    def fake_all_gather_object(out, obj):
        out[:] = [pickle.loads(pickle.dumps(obj)), pickle.loads(pickle.dumps(other.state()))]  # states travel pickled
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_world_size', lambda group=None: 2)
    monkeypatch.setattr(dist, 'all_gather_object', fake_all_gather_object)
    ev = CocoEvaluator(gt, CAT_IDS)
    ev.update([1, 3], _gt_predictions(gt, [1, 3]))
    ev.synchronize()
    assert ev.image_ids == [1, 3, 2, 4]
    assert ev.summarize().stats['AP'] == pytest.approx(1.0, abs=1e-12)
