"""Every DINO preset has the official state-dict names and shapes (minus the decoder aliases the mapping drops)
and the official parameter counts. Expected values: tests/data/dino/official_shapes.json, written by
tools/dino_reference_shapes.py from measurements of the official model (IDEA-Research/DINO @ faa8520).
Models are built on the meta device: shapes only, no memory, fast."""
import json
from pathlib import Path

import pytest
import torch

from detlearn.models.dino import DINO, DINO_PRESETS, dino_official_to_detlearn

REFERENCE = json.loads((Path(__file__).parent / 'data' / 'dino' / 'official_shapes.json').read_text())


@pytest.mark.parametrize('preset', sorted(p for p in DINO_PRESETS if p in REFERENCE))  # dino_tiny: no official
def test_preset_matches_official(preset):
    ref = REFERENCE[preset]
    with torch.device('meta'):
        model = DINO(DINO_PRESETS[preset](91))
    expected = {k: v for k, v in dino_official_to_detlearn(ref['state_dict']).items()}
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [], 'missing official tensors'
    assert sorted(set(ours) - set(expected)) == [], 'tensors the official model does not have'
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == ref['num_params']
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref['num_params_trainable']


def test_mapping_drops_exactly_the_decoder_aliases():
    ref = REFERENCE['dino_4scale_r50']
    dropped = set(ref['state_dict']) - set(dino_official_to_detlearn(ref['state_dict']))
    assert len(dropped) == 48
    assert all(k.startswith(('transformer.decoder.class_embed.', 'transformer.decoder.bbox_embed.')) for k in dropped)
    # each dropped tensor is another name of a kept one: class_embed.i / bbox_embed.i have the same shapes
    for k in dropped:
        assert ref['state_dict'][k] == ref['state_dict'][k[len('transformer.decoder.'):]]
    assert dropped <= set(ref['aliases']) | {k for k in dropped if '_embed.0.' in k}
