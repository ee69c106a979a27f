"""Trainer tests on a protocol-conforming toy detector (tests/toy_detector.py): exact resume, checkpoint
format, NaN guard, accumulation, frozen backbone. YOLOX end-to-end runs are in test_cli.py."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_detector import ToyBoxes, ToyDetector, toy_collate  # noqa: E402

from detlearn.train import Trainer, TrainingDiverged  # noqa: E402
from detlearn.train_utils import (LoopConfig, OptimConfig, ScheduleConfig, TrainConfig,  # noqa: E402
                                  apply_overrides, load_checkpoint)
from detlearn.utils import DetlearnError  # noqa: E402


def cfg(epochs=2, **loop):
    return TrainConfig(loop=LoopConfig(**{'epochs': epochs, 'batch_size': 4, 'num_workers': 0, 'eval_every': 100,
                                          'ema_warmup': 5, 'no_aug_epochs': 0, 'log_every': 1} | loop),
                       schedule=ScheduleConfig(warmup_epochs=1, final_flat_epochs=0),
                       optim=OptimConfig(lr=0.05, lr_per_image=False, clip_grad_norm=1.0))


def make(tmp, c, seed=0, model=None):
    torch.manual_seed(seed)
    return Trainer(model or ToyDetector(), ToyBoxes(), cfg=c, work_dir=tmp, collate_fn=toy_collate, progress=False)


def assert_same(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_resume_is_exact(tmp_path):
    """1 epoch, then a resume (in a fresh trainer with another global RNG state) to 2 == 2 epochs straight."""
    straight = make(tmp_path / 'a', cfg(2)); straight.fit()
    first = make(tmp_path / 'b', cfg(2)); first.fit(stop_after=1)
    resumed = make(tmp_path / 'b', cfg(2), seed=99)
    resumed.fit(resume=tmp_path / 'b' / 'last.pth')
    assert_same(straight.model, resumed.model)
    assert_same(straight.ema.module, resumed.ema.module)
    assert resumed.step == straight.step == 8 and resumed.epoch == 2
    assert resumed.optimizer.param_groups[0]['lr'] == straight.optimizer.param_groups[0]['lr']
    # and the interruption really mattered: one epoch alone differs
    assert not torch.equal(first.model.head.weight, straight.model.head.weight)


def test_resume_with_accumulation_and_fp32_ema(tmp_path):
    c = cfg(2, accumulate=2)
    straight = make(tmp_path / 'a', c); straight.fit()
    make(tmp_path / 'b', c).fit(stop_after=1)
    resumed = make(tmp_path / 'b', c, seed=5); resumed.fit(resume=tmp_path / 'b' / 'last.pth')
    assert_same(straight.model, resumed.model)
    assert straight.step == 4  # 4 batches per epoch / 2 accumulated = 2 optimiser steps per epoch


class NoisyToy(ToyDetector):
    """Draws from the global torch RNG in training (as dropout and DETR denoising do): resuming must restore it."""
    def forward(self, images, masks=None, targets=None):
        return super().forward(images + 0.01 * torch.randn_like(images) if self.training else images)


def noisy(seed=0):
    torch.manual_seed(seed)
    return NoisyToy()


class Killed(Exception):
    pass


def test_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    """Step checkpoints: a run killed mid-epoch resumes with `resume='auto'` and ends with the weights, EMA, lr and
    epoch log of a run never interrupted (4 steps per epoch, a checkpoint every 3)."""
    c = cfg(2, checkpoint_every_steps=3)
    straight = make(tmp_path / 'a', c, model=noisy()); straight.fit()
    killed = make(tmp_path / 'b', c, model=noisy())
    step = killed.engine.step
    def dying(*args):
        if killed.engine.step_count == 5:  # during the 2nd step of epoch 2: the last checkpoint is step 3's
            raise Killed()
        return step(*args)
    killed.engine.step = dying
    with pytest.raises(Killed): killed.fit()
    ck = load_checkpoint(tmp_path / 'b' / 'last.pth')
    assert (ck['step'], ck['epoch'], ck.get('iter', 0)) == (4, 1, 0)  # epoch 1 ended after step 4: its checkpoint
    killed2 = make(tmp_path / 'c', c, model=noisy())
    step2 = killed2.engine.step
    def dying2(*args):
        if killed2.engine.step_count == 3 and killed2.engine.pending == 0 and (tmp_path / 'c' / 'last.pth').exists():
            raise Killed()  # the 4th step of epoch 1 never happens; step 3's mid-epoch checkpoint is on disk
        return step2(*args)
    killed2.engine.step = dying2
    with pytest.raises(Killed): killed2.fit()
    ck = load_checkpoint(tmp_path / 'c' / 'last.pth')
    assert (ck['step'], ck['epoch'], ck['iter']) == (3, 0, 3) and ck['meter']['n'] == 3
    shutil.copy(tmp_path / 'c' / 'last.pth', tmp_path / 'mid.pth')
    resumed = make(tmp_path / 'c', c, seed=99, model=noisy())  # another process: another global RNG state
    resumed.fit(resume='auto')
    assert_same(straight.model, resumed.model)
    assert_same(straight.ema.module, resumed.ema.module)
    assert resumed.step == straight.step == 8
    assert resumed.optimizer.param_groups[0]['lr'] == straight.optimizer.param_groups[0]['lr']
    assert [r['epoch'] for r in resumed.history] == [1, 2]  # each epoch logged once
    assert [r['loss'] for r in resumed.history] == [r['loss'] for r in straight.history]
    # the check can fail: resumed without the generators' state at the checkpoint, the noise and the weights differ
    import detlearn.train
    monkeypatch.setattr(detlearn.train, 'set_rng_state', lambda state: None)
    careless = make(tmp_path / 'f', c, seed=99, model=noisy()); careless.fit(resume=tmp_path / 'mid.pth')
    assert not torch.equal(careless.model.head.weight, straight.model.head.weight)


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path, capsys):
    t = Trainer(ToyDetector(), ToyBoxes(), cfg=cfg(1), work_dir=tmp_path / 'new', collate_fn=toy_collate)
    t.fit(resume='auto')
    assert t.epoch == 1 and 'starting a new run' in capsys.readouterr().out


def test_checkpoint_format(tmp_path):
    t = make(tmp_path, cfg(1, save_every=1)); t.fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert {'last.pth', 'epoch_1.pth', 'metrics.csv'} <= set(names)
    assert not [n for n in names if n.endswith('.tmp')]
    ck = torch.load(tmp_path / 'last.pth', weights_only=True)  # plain tensors and primitives only
    for key in ('model', 'ema', 'optimizer', 'scheduler', 'scaler', 'epoch', 'step', 'rng', 'config',
                'class_names', 'cat_ids', 'best_metric'):
        assert key in ck, key
    assert ck['class_names'] == ['box'] and ck['cat_ids'] == [7] and ck['epoch'] == 1
    assert ck['config']['loop']['batch_size'] == 4
    assert (tmp_path / 'metrics.csv').read_text().splitlines()[0].startswith('epoch,step')


def test_training_reduces_loss(tmp_path):
    h = make(tmp_path, cfg(6)).fit()
    assert h[-1]['loss'] < 0.6 * h[0]['loss']


def test_nan_guard(tmp_path):
    class NaNDetector(ToyDetector):
        def loss(self, outputs, targets):
            return {'loss': super().loss(outputs, targets)['loss'] * float('nan')}
    t = make(tmp_path, cfg(1, max_bad_steps=2), model=NaNDetector())
    before = [p.detach().clone() for p in t.model.parameters()]
    with pytest.raises(TrainingDiverged, match='NaN/inf in 2 steps.*lower learning rate'):
        t.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    saved = load_checkpoint(tmp_path / 'diverged.pth')
    assert saved['images'].shape == (4, 3, 32, 32) and len(saved['targets']) == 4


def test_frozen_backbone(tmp_path):
    t = make(tmp_path, cfg(1, freeze_backbone=True))
    before = t.model.backbone[0].weight.detach().clone()
    t.fit()
    assert torch.equal(before, t.model.backbone[0].weight)
    assert all(not p.requires_grad for p in t.model.backbone.parameters())


def test_user_mistakes(tmp_path):
    with pytest.raises(DetlearnError, match='fewer than the batch size 64'):
        make(tmp_path, cfg(1, batch_size=64))
    with pytest.raises(DetlearnError, match="unknown setting 'loop.epoc'"):
        apply_overrides(cfg(1), ['loop.epoc=3'])
    t = make(tmp_path, cfg(1))
    with pytest.raises(DetlearnError, match='does not exist'):
        t.fit(resume=tmp_path / 'missing.pth')


def test_build_trainer_modelscope_style(tmp_path):
    """build_trainer(model=, train_dataset=, eval_dataset=, work_dir=, cfg_options=) then .train() / .evaluate(checkpoint_path=)."""
    from detlearn.recipes import build_trainer
    torch.manual_seed(0)
    t = build_trainer(model=ToyDetector(), train_dataset=ToyBoxes(), eval_dataset=ToyBoxes(n=8, noise=False),
                      work_dir=tmp_path, device='cpu', progress=False,
                      cfg_options={'loop.epochs': 2, 'loop.num_workers': 0, 'loop.batch_size': 4, 'loop.eval_every': 1,
                                   'loop.no_aug_epochs': 0, 'loop.multiscale': '', 'schedule.warmup_epochs': 0,
                                   'schedule.final_flat_epochs': 0, 'optim.name': 'adamw', 'optim.lr': 0.01,
                                   'optim.lr_per_image': False})
    history = t.train()
    assert [r['epoch'] for r in history] == [1, 2] and 'AP50' in history[-1]
    ema_stats = t.evaluate().stats
    torch.nn.init.zeros_(t.model.head.weight)  # spoil the live weights: evaluate(checkpoint_path) must reload them
    stats = t.evaluate(checkpoint_path=tmp_path / 'last.pth').stats
    assert stats == ema_stats and stats['AP50'] == history[-1]['AP50']
    ck = load_checkpoint(tmp_path / 'last.pth')
    assert ck['cat_ids'] == [7] and ck['meta']['num_classes'] == 1


def test_yolox_training_independent_of_worker_count(tmp_path):
    """Same seed, 0 or 2 data workers: the same Mosaic/HSV/flip draws per sample, so the same weights after an epoch."""
    from detlearn.data.samples import sample_dataset
    from detlearn.recipes import build_datasets, build_trainer, shapes_demo_recipe
    from detlearn.utils import usable_cpus
    if usable_cpus() < 2:
        pytest.skip('needs 2 CPUs: one compute thread and one loader process')
    recipe = shapes_demo_recipe(epochs=2, img_size=96)
    weights, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # on a CPU the trainer gives loader processes only the cores torch's threads leave
    try:
        for workers in (0, 2):
            train, _ = build_datasets(recipe, *sample_dataset('shapes', 'train'))
            t = build_trainer(recipe.model, train, None, work_dir=tmp_path / str(workers), recipe=recipe,
                              device='cpu', progress=False,
                              cfg_options={'loop.num_workers': workers, 'loop.batch_size': 16})
            assert (t.train_loader.num_workers > 0) == (workers > 0)  # really compared with loader processes
            t.fit(stop_after=1)
            weights.append(t.model.state_dict())
    finally:
        torch.set_num_threads(threads)
    differing = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not differing, differing[:5]


def test_cpu_training_leaves_the_cores_to_torch(tmp_path, monkeypatch):
    """On a CPU, loader processes get only the cores torch's threads leave free (none on a 2-core machine with 2
    threads: there they slowed the demo's epoch from 5.2 to 6.3 s); never more than asked for."""
    import detlearn.train as train_module
    t = Trainer(ToyDetector(), ToyBoxes(), cfg=cfg(epochs=1, num_workers=4), work_dir=tmp_path,
                collate_fn=toy_collate, progress=False, device='cpu')
    threads = torch.get_num_threads()
    try:
        for cpus, n_threads, expected in ((2, 2, 0), (2, 1, 1), (16, 4, 4), (8, 4, 4), (6, 4, 2)):
            monkeypatch.setattr(train_module, 'usable_cpus', lambda: cpus)
            torch.set_num_threads(n_threads)
            assert t._num_workers() == expected, (cpus, n_threads)
    finally:
        torch.set_num_threads(threads)
