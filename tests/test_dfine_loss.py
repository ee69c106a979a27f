"""detlearn's D-FINE criterion against the official D-FINE code.

The fixture tests/data/detr/dfine_loss.pt holds random D-FINE-shaped training outputs (3 decoder
layers with edge distributions and GO-LSD teachers, first-layer head, encoder proposals, denoising
layers), targets (one image without objects), and what the official HungarianMatcher and
DFINECriterion (Peterande/D-FINE, the commit stored in the file) made of them.
Re-make it with `tools/make_dfine_loss_fixtures.py OFFICIAL_DFINE_DIR tests/data/detr`.
"""
from pathlib import Path

import pytest
import torch

from detlearn.assign.hungarian import HungarianMatcher
from detlearn.models.dfine.loss import DFineCriterion, DFineLossConfig, union_of_matchings
from detlearn.testing import TOLERANCES, assert_scaled_close

pytestmark = pytest.mark.cpu_path  # run again on the other CPU path by tools/test.sh

FIXTURE = Path(__file__).parent / 'data' / 'detr' / 'dfine_loss.pt'


@pytest.fixture(scope='module')
def official():
    return torch.load(FIXTURE, weights_only=True)


def _sets(outputs):
    return {'final': outputs, 'aux_0': outputs['aux_outputs'][0], 'aux_1': outputs['aux_outputs'][1],
            'pre': outputs['pre_outputs'], 'enc_0': outputs['enc_aux_outputs'][0]}


def test_fixture_records_commit(official):
    assert official['commit'].startswith('4a1f73a')


def test_matchings_and_union_equal_official(official):
    matcher = HungarianMatcher()
    ours = {}
    for name, out in _sets(official['outputs']).items():
        ours[name] = matcher(out['pred_logits'], out['pred_boxes'], official['targets'])
        for (q, o), (q_ref, o_ref) in zip(ours[name], official['indices'][name]):
            assert torch.equal(q, q_ref.long()) and torch.equal(o, o_ref.long()), name
    union = union_of_matchings([ours[n] for n in ('final', 'aux_0', 'aux_1', 'pre', 'enc_0')])
    for (q, o), (q_ref, o_ref) in zip(union, official['indices']['go']):
        assert dict(zip(q.tolist(), o.tolist())) == dict(zip(q_ref.tolist(), o_ref.tolist()))


def test_every_loss_term_equals_official(official):
    ours = DFineCriterion(DFineLossConfig(num_classes=80))(official['outputs'], official['targets'])
    ref = official['losses']
    assert set(ours) == set(ref)
    for name, value in ref.items():
        assert_scaled_close(ours[name], value, TOLERANCES['loss'], f'dfine {name}')


def _cast(obj, dtype):
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cast(v, dtype) for v in obj]
    return obj.to(dtype) if torch.is_tensor(obj) and obj.is_floating_point() else obj


def test_no_nan_with_fp16_outputs(official):
    losses = DFineCriterion(DFineLossConfig(num_classes=80))(_cast(official['outputs'], torch.float16),
                                                             official['targets'])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses['loss'], official['losses']['loss'], rtol=1e-2, atol=0)
