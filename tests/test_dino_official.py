"""detlearn's DINO against the official IDEA-Research/DINO code, stage by stage.

The fixtures in tests/data/dino were written by `tools/make_dino_fixtures.py` from the official repository at
commit faa8520 (a reduced DINO-4scale with random weights, eval mode, a padded batch of two photos). Its checkpoint
is in the official main.py layout, so loading it also tests `read_official_dino` and the name mapping.
The generator picked a seed whose top-k encoder scores are > 1e-4 apart, so the query ranking is not decided by
float noise; the test still checks it first, so a failure says which stage diverged.
"""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from detlearn.models.dino import DINO, DINOConfig, dino_num_classes, dino_official_to_detlearn, read_official_dino
from detlearn.models.dino.transformer import run_transformer
from detlearn.testing import TOLERANCES, assert_scaled_close

pytestmark = pytest.mark.cpu_path  # run again on the other CPU path by tools/test.sh

DATA = Path(__file__).parent / 'data' / 'dino'
REL = TOLERANCES['fp32_network']  # scaled to each tensor: see the chapter 'Comparing numbers across machines'


@pytest.fixture(scope='module')
def fixture():
    io = torch.load(DATA / 'reduced_io.pt', weights_only=True)
    state = dino_official_to_detlearn(read_official_dino(DATA / 'reduced_checkpoint.pth'))
    c = io['config']
    cfg = replace(DINOConfig(), num_classes=dino_num_classes(state), hidden_dim=c['hidden_dim'], nheads=c['nheads'],
                  enc_layers=c['enc_layers'], dec_layers=c['dec_layers'], dim_feedforward=c['dim_feedforward'],
                  num_queries=c['num_queries'], enc_n_points=c['enc_n_points'], dec_n_points=c['dec_n_points'],
                  num_select=c['num_select'], resnet_depths=tuple(c['resnet_depths']), resnet_width=c['resnet_width'])
    model = DINO(cfg).eval()
    model.load_state_dict(state)  # strict
    return model, io


def close(ours, theirs, what):
    assert_scaled_close(ours, theirs, REL, f'dino {what}')


def test_checkpoint_maps_onto_the_model(fixture):
    model, _ = fixture
    raw = read_official_dino(DATA / 'reduced_checkpoint.pth')
    mapped = dino_official_to_detlearn(raw)
    assert set(mapped) == set(model.state_dict())
    assert len(raw) - len(mapped) == 2 * (2 + 6)  # decoder aliases of the shared heads: 2 layers x 8 tensors


@torch.no_grad()
def test_stage_by_stage(fixture):
    model, io = fixture
    ref, images, mask = io['outputs'], io['images'], io['mask']
    feats = model.backbone[0](images, mask)
    for l, (f, m) in enumerate(feats):
        close(f, ref['backbone'][l], f'backbone level {l}')
        assert torch.equal(m, ref['backbone_masks'][l])
    srcs, masks, pos = model.multiscale_features(images, mask)
    for l, s in enumerate(srcs):
        close(s, ref['srcs'][l], f'input projection {l}')
    hs, refs, sel, memory = run_transformer(model.transformer, srcs, masks, pos, model.bbox_embed)
    close(memory, ref['memory'], 'encoder memory')
    assert torch.equal(sel.topk_index, ref['topk_index']), 'top-k encoder proposals differ (order or set)'
    close(torch.stack(hs), ref['hs'], 'decoder outputs')
    close(torch.stack(refs), ref['references'], 'decoder references')


@torch.no_grad()
def test_outputs_and_postprocess(fixture):
    model, io = fixture
    ref = io['outputs']
    out = model(io['images'], io['mask'])
    for key in ('pred_logits', 'pred_boxes'):
        close(out[key], ref[key], key)
    assert len(out['aux_outputs']) == len(ref['aux_outputs'])
    for i, (a, b) in enumerate(zip(out['aux_outputs'], ref['aux_outputs'])):
        for key in ('pred_logits', 'pred_boxes'):
            close(a[key], b[key], f'aux {i} {key}')
    for part in ('interm_outputs', 'interm_outputs_for_matching_pre'):
        for key in ('pred_logits', 'pred_boxes'):
            close(out[part][key], ref[part][key], f'{part} {key}')
    results = model.postprocess(out, io['orig_sizes'])
    for ours, theirs in zip(results, ref['postprocess']):
        assert torch.equal(ours['labels'], theirs['labels'])
        close(ours['scores'], theirs['scores'], 'scores')
        close(ours['boxes'], theirs['boxes'], 'boxes (pixels)')
