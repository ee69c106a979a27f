"""Fine-tuning D-FINE from an official-layout file (made by the official code) and its recipes."""
from pathlib import Path

import pytest
import torch

from detlearn.backbones.hgnetv2 import HGNetv2Config, HGStageSpec
from detlearn.hub import load_weights
from detlearn.models.dfine import DFINE, DFINEConfig
from detlearn.models.dfine.decoder import DFINEDecoderConfig
from detlearn.models.dfine.encoder import HybridEncoderConfig
from detlearn.models.dfine.family import dfine_official_to_detlearn
from detlearn.recipes import get_recipe, list_recipes
from detlearn.train_utils import build_optimizer

DATA = Path(__file__).parent / 'data' / 'dfine'


def tuple_fields(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


@pytest.fixture(scope='module')
def fixture():
    return torch.load(DATA / 'model_equivalence.pt', weights_only=False)


def small_model(fx: dict, num_classes: int) -> DFINE:
    """The fixture's small official architecture (see nbs/43c), with `num_classes` classes."""
    arch, bb = fx['tiny_arch'], fx['backbone']
    stages = tuple(HGStageSpec(*arch['stage_config'][f'stage{i}']) for i in range(1, 5))
    backbone = HGNetv2Config('tiny', tuple(arch['stem_channels']), stages, use_lab=bb['use_lab'],
                             return_idx=tuple(bb['return_idx']))
    dec = {k: v for k, v in fx['decoder'].items() if k not in ('num_classes', 'num_levels')}
    return DFINE(DFINEConfig(num_classes=num_classes, backbone=backbone,
                             encoder=HybridEncoderConfig(**tuple_fields(fx['encoder'])),
                             decoder=DFINEDecoderConfig(**tuple_fields(dec))))


def test_finetune_from_official_file_reinitialises_only_class_tensors(fixture):
    path = DATA / 'model_checkpoint.pth'
    official = dfine_official_to_detlearn(torch.load(path, weights_only=True)['ema']['module'])
    # brute force: the tensors whose first dimension is the class count (80) or class count + 1 (denoising)
    expected = sorted(k for k, v in official.items() if v.ndim and v.shape[0] in (80, 81))
    assert len(expected) == 2 + 2 * fixture['decoder']['num_layers'] + 1
    torch.manual_seed(0)
    model = small_model(fixture, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinit = load_weights(model, path, verbose=False)
    assert reinit == expected
    state = model.state_dict()
    for name in state:
        if name in reinit:
            assert torch.equal(state[name], before[name]), name  # left at the fresh initialisation
            assert state[name].shape[0] in (3, 4)
        else:
            assert torch.equal(state[name], official[name].to(state[name].dtype)), name


@pytest.mark.parametrize('size', ['n', 's', 'm', 'l', 'x'])
def test_finetune_recipe_optimizer_groups(fixture, size):
    recipe = get_recipe(f'dfine_{size}_finetune')
    assert recipe.model == f'dfine_{size}' and recipe.train.loop.multiscale == ()
    if size != 'n':
        return
    model = small_model(fixture, 3)
    opt = build_optimizer(model, recipe.train.optim, recipe.train.loop.batch_size)
    lrs = {id(p): g['lr'] for g in opt.param_groups for p in g['params']}
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(lrs) == len(trained)
    for name, p in trained:
        assert lrs[id(p)] == pytest.approx(2e-5 if name.startswith('backbone.') else 2e-4), name


def test_issue_recipe_names_are_aliases():
    names = list_recipes()
    for size, epochs in zip('nsmlx', (160, 132, 132, 80, 80)):
        assert f'dfine_{size}_coco' in names and f'dfine_{size}_{epochs}e_coco' in names
        assert get_recipe(f'dfine_{size}_coco') == get_recipe(f'dfine_{size}_{epochs}e_coco')
    assert 'dfine_n_shapes' in names
