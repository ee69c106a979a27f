"""detlearn's Swin backbone against the official DINO Swin implementation (IDEA-Research/DINO @ faa8520).

Fixture tests/data/dino/swin_io.pt: `python tools/make_dino_fixtures.py OFFICIAL_DINO_DIR tests/data/dino --swin`
(a reduced Swin with window 3 so that padding to window multiples, shifted-window masks and odd sizes in patch
merging all occur; a padded batch of two photos)."""
from pathlib import Path

import pytest
import torch

from detlearn.backbones.swin import SwinTransformer
from detlearn.testing import TOLERANCES, assert_scaled_close

pytestmark = pytest.mark.cpu_path  # run again on the other CPU path by tools/test.sh

def test_swin_matches_official():
    io = torch.load(Path(__file__).parent / 'data' / 'dino' / 'swin_io.pt', weights_only=True)
    c = io['config']
    swin = SwinTransformer(c['embed_dim'], tuple(c['depths']), tuple(c['num_heads']), c['window_size'],
                           tuple(c['out_indices'])).eval()
    swin.load_state_dict(io['state_dict'])  # strict: official names, relative_position_index buffers included
    with torch.no_grad():
        outs = swin(io['images'], io['mask'])
    assert len(outs) == len(io['features'])
    for level, ((f, m), f_ref, m_ref) in enumerate(zip(outs, io['features'], io['masks'])):
        assert_scaled_close(f, f_ref, TOLERANCES['fp32_network'], f'swin level {level}')
        assert torch.equal(m, m_ref)
