"""The family seam: a new family registered in ONE place (detlearn.models.FAMILIES) works everywhere —
create -> train 1 epoch -> resume -> eval -> predict -> pipeline, the CLI, the hub — without touching any other module."""
import json

import numpy as np
import pytest
import torch

import detlearn.models as dm
from detlearn import cli, hub
from detlearn.data.samples import sample_dataset
from detlearn.pipeline import pipeline
from detlearn.recipes import build_trainer, get_recipe
from toy_detector import TOY_FAMILY, ToyFamilyDetector

pytestmark = pytest.mark.xdist_group('seam')


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(dm.FAMILIES, 'toy', TOY_FAMILY)  # the one line a new family needs
    return TOY_FAMILY


def test_toy_family_end_to_end(toy_family, tmp_path):
    train_ann, train_images = sample_dataset('shapes', 'train')
    val_ann, val_images = sample_dataset('shapes', 'val')
    model = dm.create('toy_tiny', num_classes=4)
    assert isinstance(model, ToyFamilyDetector) and dm.family_of(model) is toy_family
    assert get_recipe('toy_tiny_2e_shapes').model == 'toy_tiny'

    def trainer():
        return build_trainer('toy_tiny', (train_ann, train_images), (val_ann, val_images), work_dir=tmp_path / 'run',
                             progress=False)
    first = trainer()
    first.fit(stop_after=1)
    assert first.model.epochs_seen == [0]  # the family's per-epoch switch ran
    resumed = trainer()
    history = resumed.fit(resume=tmp_path / 'run' / 'last.pth')
    assert [r['epoch'] for r in history] == [1, 2] and resumed.model.epochs_seen == [1]
    straight = build_trainer('toy_tiny', (train_ann, train_images), (val_ann, val_images),
                             work_dir=tmp_path / 'straight', progress=False)
    straight.fit()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k  # resume is exact for a new family too

    ckpt = tmp_path / 'run' / 'last.pth'
    assert cli.main(['eval', '--checkpoint', str(ckpt), '--ann', str(val_ann), '--images', str(val_images),
                     '--json', str(tmp_path / 'ap.json')]) == 0
    assert 'AP' in json.loads((tmp_path / 'ap.json').read_text())
    assert cli.main(['predict', '--checkpoint', str(ckpt), str(val_images), '--out', str(tmp_path / 'pred')]) == 0
    results = json.loads((tmp_path / 'pred' / 'predictions.json').read_text())
    assert results and {r['category_id'] for r in results} <= {1, 3, 5, 7}  # the dataset's own ids

    image = np.full((40, 50, 3), 128, np.uint8)
    out = pipeline('object-detection', model=ckpt, score_threshold=0.0)(image)
    assert len(out['boxes']) == 1 and out['labels'][0] in ('circle', 'square', 'triangle', 'star')


def test_toy_family_official_weights(toy_family, tmp_path):
    torch.manual_seed(0)
    source = dm.create('toy_tiny', num_classes=3)
    torch.save({'toy_weights': {f'net.{k}': v for k, v in source.state_dict().items()}}, tmp_path / 'toy.pth')
    loaded = hub.load_official('toy_tiny', tmp_path / 'toy.pth')
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    five = dm.create('toy_tiny', num_classes=5)
    skipped = hub.load_official_state_dict(five, torch.load(tmp_path / 'toy.pth')['toy_weights'])
    assert sorted(skipped) == ['cls.bias', 'cls.weight']
    detect = pipeline('object-detection', model='toy_tiny', weights=tmp_path / 'toy.pth', score_threshold=0.0)
    assert detect.class_names == ['toy0', 'toy1', 'toy2']  # the family's official label space


def test_unknown_family_is_a_clear_error():
    with pytest.raises(Exception, match="unknown model 'toy_tiny'"):
        dm.create('toy_tiny')  # not registered outside the fixture
