"""detlearn's Hungarian matcher and DINO set criterion against the official DINO code.

The fixture tests/data/detr/dino_loss.pt holds random DINO-shaped outputs (final layer, 3 aux layers,
encoder proposals, denoising outputs), targets (one image without objects), and what the official
HungarianMatcher and SetCriterion (IDEA-Research/DINO, the commit stored in the file) made of them.
Re-make it with `tools/make_detr_loss_fixtures.py OFFICIAL_DINO_DIR tests/data/detr`.
"""
from pathlib import Path

import pytest
import torch

from detlearn.assign.hungarian import HungarianMatcher
from detlearn.models.detr.denoising import DenoisingConfig, make_denoising_groups
from detlearn.models.detr.loss import DetrLossConfig, SetCriterion, denoising_indices
from detlearn.testing import TOLERANCES, assert_scaled_close

pytestmark = pytest.mark.cpu_path  # run again on the other CPU path by tools/test.sh

FIXTURE = Path(__file__).parent / 'data' / 'detr' / 'dino_loss.pt'


@pytest.fixture(scope='module')
def official():
    return torch.load(FIXTURE, weights_only=True)


def _sets(outputs):
    sets = {f'aux_{i}': aux for i, aux in enumerate(outputs['aux_outputs'])}
    sets['interm'] = outputs['interm_outputs']
    sets['final'] = outputs
    return sets


def test_fixture_records_commit(official):
    assert official['commit'].startswith('faa8520')
    assert [len(t['labels']) for t in official['targets']] == [5, 0, 3]


def test_matcher_gives_official_assignments(official):
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0)
    for name, out in _sets(official['outputs']).items():
        ours = matcher(out['pred_logits'], out['pred_boxes'], official['targets'])
        for (q, o), (q_ref, o_ref) in zip(ours, official['indices'][name]):
            assert torch.equal(q, q_ref.long()) and torch.equal(o, o_ref.long()), name


def test_every_loss_term_equals_official(official):
    ours = SetCriterion(DetrLossConfig(num_classes=91))(official['outputs'], official['targets'])
    ref = official['losses']
    assert set(ours) == set(ref)
    for name, value in ref.items():
        assert_scaled_close(ours[name], value.float(), TOLERANCES['loss'], f'detr {name}')


def test_detlearn_denoising_pairs_equal_dino_layout(official):
    """The pairs made by detlearn's denoising module are those the official criterion derives."""
    targets = official['targets']
    dn = make_denoising_groups(targets, 91, 30, DenoisingConfig(num_denoising=15))
    assert dn.meta['num_dn_group'] == 3 and dn.meta['pad_size'] == official['outputs']['dn_meta']['pad_size']
    derived = denoising_indices({k: v for k, v in dn.meta.items() if k != 'dn_indices'}, targets)
    for (q, o), (q_ref, o_ref) in zip(dn.meta['dn_indices'], derived):
        assert torch.equal(q, q_ref) and torch.equal(o, o_ref)


def test_loss_is_float32_under_half_inputs(official):
    out = official['outputs']
    half = {'pred_logits': out['pred_logits'].half(), 'pred_boxes': out['pred_boxes'].half()}
    losses = SetCriterion(DetrLossConfig(num_classes=91))(half, official['targets'])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def _take(obj, rows):
    """The batch rows `rows` of every tensor in a nested output dict (other values unchanged)."""
    if isinstance(obj, dict):
        return {k: _take(v, rows) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_take(v, rows) for v in obj]
    return obj[rows] if torch.is_tensor(obj) else obj


def _ddp_worker(rank: int, port: int, out_dir: str):
    """One of two gloo processes: the loss of its share of the fixture batch, saved to rank{rank}.pt."""
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    official = torch.load(FIXTURE, weights_only=True)
    rows = [0] if rank == 0 else [1, 2]  # 5 objects on rank 0, 0 + 3 on rank 1
    losses = SetCriterion(DetrLossConfig(num_classes=91))(_take(official['outputs'], rows),
                                                         [official['targets'][r] for r in rows])
    torch.save({k: v.detach() for k, v in losses.items()}, Path(out_dir) / f'rank{rank}.pt')
    dist.destroy_process_group()


def test_ddp_mean_of_rank_losses_equals_single_process(official, tmp_path):
    """With the normaliser averaged over processes, the mean of the ranks' losses (what DDP's gradient
    averaging optimises) is the single-process loss of the whole batch, although the ranks hold 5 and 3 objects."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    for name, value in official['losses'].items():
        assert_scaled_close((r0[name] + r1[name]) / 2, value.float(), TOLERANCES['loss'], f'detr ddp {name}')
