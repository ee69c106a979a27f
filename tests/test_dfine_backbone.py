"""D-FINE's HGNetv2 backbone and HybridEncoder against the official code (Peterande/D-FINE @ 4a1f73a).

Fixtures (tests/data/dfine/backbone_*, made by tools/make_dfine_backbone_fixtures.py):
* backbone_equivalence.pt: random official weights in official names, inputs and the official outputs of
  HGNetv2-B0 (D-FINE-N switches, and frozen norms as in L/X), of D-FINE-N's encoder (plain and deployed)
  and of a small 3-level encoder;
* backbone_reference.json.gz: every preset's official `backbone.` / `encoder.` tensors (name, shape, kind,
  order), parameter counts and the encoder's deploy state dict.
"""
import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from detlearn.backbones.hgnetv2 import DFINE_VARIANTS, HGNetv2, dfine_hgnetv2_config, hgnetv2_config
from detlearn.models.dfine.encoder import HybridEncoder, HybridEncoderConfig, hybrid_encoder_config
from detlearn.testing import TOLERANCES, assert_scaled_close

pytestmark = pytest.mark.cpu_path  # run again on the other CPU path by tools/test.sh

DATA = Path(__file__).parent / 'data/dfine'
REFERENCE = json.loads(gzip.decompress((DATA / 'backbone_reference.json.gz').read_bytes()))
FIXTURE = torch.load(DATA / 'backbone_equivalence.pt', weights_only=True)
OUT = FIXTURE['outputs']


def unpack(weights: dict) -> dict:
    """Stored weights -> tensors: int8 codes × scale for >= 2-dim floats (what the official run used)."""
    return {k: v['q'].float() * v['scale'] if isinstance(v, dict) else v for k, v in weights.items()}


def strip(prefix: str, state: dict) -> dict:
    """The entries under `prefix`, without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def assert_same(actual: list, expected: list, kind: str = 'fp32_deep_chain') -> None:
    """Same number of maps, same shapes, values within TOLERANCES[kind] of each map's largest value."""
    assert len(actual) == len(expected)
    for level, (a, e) in enumerate(zip(actual, expected)):
        assert_scaled_close(a, e, TOLERANCES[kind], f'dfine backbone/encoder map {level}')


def image(key: str) -> torch.Tensor:
    """The fixture's input image as D-FINE sees it: float RGB in [0, 1]."""
    return FIXTURE['inputs'][key].float() / 255


@pytest.fixture(scope='module')
def weights() -> dict:
    return unpack(FIXTURE['weights'])


@pytest.fixture(scope='module')
def backbone_n(weights) -> HGNetv2:
    net = HGNetv2(dfine_hgnetv2_config('n'))
    net.load_state_dict(strip('backbone.', weights))  # strict: official names = ours
    return net.eval()


def encoder_n(weights) -> HybridEncoder:
    enc = HybridEncoder(hybrid_encoder_config('n'))
    enc.load_state_dict(strip('encoder.', weights))
    return enc.eval()


@pytest.mark.parametrize('key', ['square', 'nonsquare', 'odd'])
def test_backbone_matches_official(backbone_n, key):
    with torch.no_grad():
        assert_same(backbone_n(image(key)), OUT['backbone_n'][key])


def test_frozen_backbone_matches_official(weights):
    """L/X switches (FrozenBatchNorm2d, frozen stem, no LAB) on B0; num_batches_tracked entries are dropped."""
    net = HGNetv2(replace(hgnetv2_config('B0'), freeze_norm=True, freeze_stem=True))
    net.load_state_dict({k: v for k, v in strip('backbone.', weights).items() if '.lab.' not in k})
    with torch.no_grad():
        assert_same(net.eval()(image('nonsquare')), OUT['backbone_frozen']['nonsquare'])


@pytest.mark.parametrize('key', ['square', 'nonsquare'])
def test_encoder_matches_official(weights, backbone_n, key):
    enc = encoder_n(weights)
    with torch.no_grad():
        assert_same(enc(OUT['backbone_n'][key]), OUT['encoder_n'][key])
        assert_same(enc(backbone_n(image(key))), OUT['encoder_n'][key])  # the whole chain, ours only


@pytest.mark.parametrize('key', ['square', 'nonsquare'])
def test_deployed_encoder_matches_official(weights, key):
    enc = encoder_n(weights).deploy()
    assert any(k.endswith('conv_bn_fused.weight') for k in enc.state_dict())
    with torch.no_grad():
        assert_same(enc(OUT['backbone_n'][key]), OUT['encoder_n_deploy'][key])


def test_three_level_encoder_matches_official():
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in FIXTURE['encoder3_kwargs'].items()}
    enc = HybridEncoder(HybridEncoderConfig(**kwargs))
    enc.load_state_dict(unpack(FIXTURE['weights_encoder3']))
    with torch.no_grad():
        assert_same(enc.eval()(OUT['backbone_frozen']['nonsquare']), OUT['encoder3']['nonsquare'])


def entries(module: torch.nn.Module, prefix: str) -> list:
    """[name, shape, 'param' | 'buffer'] of every state-dict entry, in order."""
    params = dict(module.named_parameters())
    kind = lambda k: 'param' if k in params else 'buffer'
    return [[prefix + k, list(v.shape), kind(k)] for k, v in module.state_dict().items()]


@pytest.mark.parametrize('variant', DFINE_VARIANTS)
def test_preset_tensors_match_official(variant):
    ref = REFERENCE[variant]
    with torch.device('meta'):
        backbone = HGNetv2(dfine_hgnetv2_config(f'dfine_{variant}'))
        encoder = HybridEncoder(hybrid_encoder_config(f'dfine_{variant}'))
    assert entries(backbone, 'backbone.') == ref['backbone']['state_dict']
    assert entries(encoder, 'encoder.') == ref['encoder']['state_dict']
    for module, part in ((backbone, 'backbone'), (encoder, 'encoder')):
        params = list(module.parameters())
        assert sum(p.numel() for p in params) == ref[part]['num_params']
        assert sum(p.numel() for p in params if p.requires_grad) == ref[part]['num_trainable']
    deployed = [[f'encoder.{k}', list(v.shape)] for k, v in encoder.deploy().state_dict().items()]
    assert deployed == ref['encoder']['deploy_state_dict']
