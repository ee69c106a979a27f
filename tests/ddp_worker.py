"""Run by tests/test_distributed.py, alone or under `torchrun --nproc_per_node 2`: trains the toy detector
for 2 epochs on a fixed global batch of 4 and saves this rank's parameters and evaluation stats."""
import os
import sys
from pathlib import Path

import torch

from toy_detector import ToyBoxes, ToyDetector, toy_collate
from detlearn.train import Trainer
from detlearn.train_utils import LoopConfig, OptimConfig, ScheduleConfig, TrainConfig

def main(out: Path):
    world = int(os.environ.get('WORLD_SIZE', 1))
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would also broadcast rank 0's)
    cfg = TrainConfig(loop=LoopConfig(epochs=2, batch_size=4 // world, num_workers=0, eval_every=1, ema_warmup=5,
                                      no_aug_epochs=0, best_metric='AP50'),
                      schedule=ScheduleConfig(warmup_epochs=1, final_flat_epochs=0),
                      optim=OptimConfig(lr=0.05 / 4, lr_per_image=True))
    t = Trainer(ToyDetector(), ToyBoxes(noise=False), ToyBoxes(n=10, noise=False), cfg=cfg,
                work_dir=out / 'run', device='cpu', collate_fn=toy_collate, progress=False)
    history = t.fit()
    rank = t.info.rank
    torch.save({'params': {k: v.clone() for k, v in t.model.state_dict().items()},
                'ema': {k: v.clone() for k, v in t.ema.module.state_dict().items()},
                'stats': {k: float(v) for k, v in history[-1].items() if k.startswith('AP')},
                'n_predictions': len(t.last_predictions), 'world': t.info.world_size}, out / f'rank{rank}.pt')


if __name__ == '__main__':
    main(Path(sys.argv[1]))
