"""The assembled D-FINE against the official code (Peterande/D-FINE @ 4a1f73a): checkpoint reading and renaming,
outputs of a small official model at 640x640, at another size and after deploy(), the FDR helpers, and every
preset's tensors and parameter counts. Fixtures: tests/data/dfine/model_* from tools/make_dfine_fixtures.py."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detlearn.backbones.hgnetv2 import HGNetv2Config, HGStageSpec
from detlearn.models.dfine import DFINE, NOT_WEIGHTS, DFINEConfig, dfine_l, dfine_m, dfine_n, dfine_s, dfine_x
from detlearn.models.dfine.decoder import DFINEDecoderConfig, flatten_levels, select_queries
from detlearn.models.dfine.encoder import HybridEncoderConfig
from detlearn.models.dfine.family import (DFINE_CLASS_SPECIFIC, DFINE_FAMILY, dfine_num_classes,
                                          dfine_official_to_detlearn, read_official_dfine)
from detlearn.models.dfine.fdr import bbox_to_distance, weighting_function
from detlearn.testing import TOLERANCES, assert_scaled_close
from detlearn.utils import DetlearnError

pytestmark = pytest.mark.cpu_path  # run again on the other CPU path by tools/test.sh

DATA = Path(__file__).parent / 'data' / 'dfine'
PRESETS = {'n': dfine_n, 's': dfine_s, 'm': dfine_m, 'l': dfine_l, 'x': dfine_x}


@pytest.fixture(scope='module')
def fx():
    return torch.load(DATA / 'model_equivalence.pt', weights_only=False)


def small_config(fx: dict) -> DFINEConfig:
    """detlearn config of the fixture's small official model."""
    arch, bb, enc, dec = fx['tiny_arch'], fx['backbone'], fx['encoder'], fx['decoder']
    tup = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    stages = tuple(HGStageSpec(*arch['stage_config'][f'stage{i}']) for i in range(1, 5))
    backbone = HGNetv2Config('tiny', tuple(arch['stem_channels']), stages, use_lab=bb['use_lab'],
                             return_idx=tuple(bb['return_idx']))
    decoder = DFINEDecoderConfig(**{k: v for k, v in tup(dec).items() if k not in ('num_classes', 'num_levels')})
    return DFINEConfig(num_classes=dec['num_classes'], backbone=backbone, encoder=HybridEncoderConfig(**tup(enc)),
                       decoder=decoder)


def load_images(indices) -> torch.Tensor:
    arrays = [np.asarray(Image.open(DATA / f'model_input_{i}.png')) for i in indices]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope='module')
def loaded(fx):
    model = DFINE(small_config(fx)).eval()
    model.load_state_dict(dfine_official_to_detlearn(read_official_dfine(DATA / 'model_checkpoint.pth')))
    return model


def selected_tokens(model, images):
    with torch.no_grad():
        memory, shapes = flatten_levels(model.decoder, model.encoder(model.backbone(images)))
        return select_queries(model.decoder, memory, shapes)[3]


def assert_matches_official(model, images, official: dict, official_index: torch.Tensor):
    """Outputs equal the official ones after matching rows by selected token (near-tied tokens may swap)."""
    index = selected_tokens(model, images)
    for b in range(len(index)):
        assert set(index[b].tolist()) == set(official_index[b].tolist())
    position = official_index.new_full((len(index), int(official_index.max()) + 1), -1)
    position.scatter_(1, official_index, torch.arange(official_index.shape[1]).expand_as(official_index))
    perm = torch.stack([position[b, index[b]] for b in range(len(index))])
    with torch.no_grad():
        out = model(images)
    for key in ('pred_logits', 'pred_boxes'):
        ref = official[key].gather(1, perm[..., None].expand_as(official[key]))
        assert_scaled_close(out[key], ref, TOLERANCES['fp32_network'], f'dfine {key}')


def test_reader_prefers_ema_and_mapping():
    official = read_official_dfine(DATA / 'model_checkpoint.pth')
    raw = torch.load(DATA / 'model_checkpoint.pth', weights_only=True)['model']
    assert official['decoder.enc_score_head.bias'].abs().sum() > 0  # the fixture zeroes it in ckpt['model'] only
    assert raw['decoder.enc_score_head.bias'].abs().sum() == 0
    state = dfine_official_to_detlearn({'module.' + k: v for k, v in official.items()})
    assert sorted(set(official) - set(state)) == sorted(NOT_WEIGHTS)
    assert state['decoder.reg_scale'].dtype == torch.float32 and official['decoder.reg_scale'].dtype == torch.int64
    assert dfine_num_classes(state) == 80


def test_reader_rejects_other_files(tmp_path):
    torch.save({'something': [1, 2]}, tmp_path / 'bad.pth')
    with pytest.raises(DetlearnError, match='bad.pth is not an official D-FINE'):
        read_official_dfine(tmp_path / 'bad.pth')
    with pytest.raises(DetlearnError, match='does not exist'):
        read_official_dfine(tmp_path / 'missing.pth')


def test_stages_match_official(fx, loaded):
    images = load_images([0, 1])
    with torch.no_grad():
        feats = loaded.encoder(loaded.backbone(images))
    for ours, ref in zip(feats, fx['stages_640']['encoder_image0']):
        assert_scaled_close(ours[:1], ref.float(), TOLERANCES['fp16_reference'], 'dfine encoder level')  # stored as fp16
    index = selected_tokens(loaded, images)
    differ = (index != fx['stages_640']['topk_index']).sum().item()
    assert differ <= 4  # at most a couple of near-tied swaps (2 in the recorded run)


def test_outputs_match_official_at_640(fx, loaded):
    assert_matches_official(loaded, load_images([0, 1]), fx['eval_640'], fx['stages_640']['topk_index'])


def test_other_input_size(fx, loaded):
    assert 'Error' in fx['official_640_model_at_other_size']  # the official 640 model cannot run it
    assert_matches_official(loaded, load_images([2]), fx['eval_other'], fx['topk_other'])


def test_deploy_matches_official_deploy(fx):
    model = DFINE(small_config(fx)).eval()
    model.load_state_dict(dfine_official_to_detlearn(read_official_dfine(DATA / 'model_checkpoint.pth')))
    model.deploy()
    assert sum(p.numel() for p in model.parameters()) == fx['num_params_deploy']
    assert_matches_official(model, load_images([0, 1]), fx['deploy_640'], fx['topk_deploy_640'])


def test_fdr_matches_official(fx):
    f = fx['fdr']
    assert_scaled_close(weighting_function(32, 0.5, 4), f['W_4'], TOLERANCES['fp32_op'], 'fdr W_4')
    assert_scaled_close(weighting_function(32, 0.5, 8), f['W_8'], TOLERANCES['fp32_op'], 'fdr W_8')
    pos, wr, wl = bbox_to_distance(f['ref'], f['gt_xyxy'], 32, 4, 0.5)
    assert_scaled_close(pos.reshape(-1), f['position'], TOLERANCES['fp32_op'], 'fdr position')
    # the weights are the fractional part of the position (up to 32 bins): their rounding is the position's
    rel_weights = TOLERANCES['fp32_op'] * f['position'].abs().max().item()
    assert_scaled_close(wr.reshape(-1), f['weight_right'], rel_weights, 'fdr weight_right')
    assert_scaled_close(wl.reshape(-1), f['weight_left'], rel_weights, 'fdr weight_left')


@pytest.mark.parametrize('variant', list(PRESETS))
def test_preset_tensors_and_counts(variant):
    facts = json.load(gzip.open(DATA / 'model_reference.json.gz', 'rt'))['presets'][variant]
    model = DFINE(PRESETS[variant]())
    official = [(k, s) for k, s, _, _ in facts['state_dict'] if k not in NOT_WEIGHTS]
    assert [(k, list(t.shape)) for k, t in model.state_dict().items()] == official
    params = {k for k, _ in model.named_parameters()}
    official_buffers = {k for k, _, _, kind in facts['state_dict'] if kind == 'buffer' and k not in NOT_WEIGHTS}
    assert {k for k in model.state_dict() if k not in params} == official_buffers
    assert sum(p.numel() for p in model.parameters()) == facts['num_params']
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == facts['num_trainable']
    model.deploy()
    assert sum(p.numel() for p in model.parameters()) == facts['num_params_deploy']
    deployed = sorted((k, s) for k, s in facts['deploy_state_dict'] if k not in NOT_WEIGHTS)
    assert sorted((k, list(t.shape)) for k, t in model.state_dict().items()) == deployed


def test_family_record():
    model = DFINE_FAMILY.build('dfine_n', 7)
    state = model.state_dict()
    for prefix in DFINE_CLASS_SPECIFIC:
        shapes = [t.shape[0] for k, t in state.items() if k.startswith(prefix) and k.endswith('weight')]
        assert shapes and all(s in (7, 8) for s in shapes), prefix  # K rows (K + 1 for the denoising embedding)
    names, ids = DFINE_FAMILY.official.label_space(80)
    assert len(names) == 80 and ids[0] == 1 and ids[-1] == 90 and names[0] == 'person'
    assert set(DFINE_FAMILY.official.weights_urls) == set(DFINE_FAMILY.presets)


def test_training_step_reduces_loss(fx):
    """Training forward with denoising + the D-FINE criterion: every term finite, a few steps lower the loss."""
    torch.manual_seed(0)
    model = DFINE(small_config(fx)).train()
    images = torch.rand(1, 3, 128, 128)
    targets = [{'boxes': torch.tensor([[10., 20., 70., 100.], [60., 30., 120., 90.]]), 'labels': torch.tensor([3, 7])}]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(12):
        losses = model.loss(model(images, targets=targets), targets)
        assert all(torch.isfinite(v) for v in losses.values())
        assert {'loss_vfl', 'loss_bbox', 'loss_giou', 'loss_fgl', 'loss_ddf_aux_0', 'loss_vfl_dn_0'} <= set(losses)
        optimizer.zero_grad()
        losses['loss'].backward()
        optimizer.step()
        history.append(losses['loss'].detach().item())
    assert sum(history[-3:]) < sum(history[:3])  # denoising noise makes single steps jumpy
