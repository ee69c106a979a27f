"""Run by tests/test_distributed.py, alone or under `torchrun --nproc_per_node 2`: trains the toy detector
for 2 epochs on a fixed global batch of 4 and saves this rank's parameters and evaluation stats, then evaluates
a detector with known outputs on 5 images, which the trainer's DistributedSampler shares out as 3 + 3 (one image
repeated)."""
import os
import sys
from pathlib import Path

import torch

from toy_detector import ToyBoxes, ToyDetector, toy_collate
from detlearn.train import Trainer, evaluate_distributed
from detlearn.train_utils import LoopConfig, OptimConfig, ScheduleConfig, TrainConfig

class ShiftedSquare(torch.nn.Module):
    """Finds each image's bright square exactly, then shifts its box by 0-6 px (by where the square is) and scores it
    by its row: each image's prediction is its own, and the AP is neither 0 nor 1 (a repeated detection would cost AP)."""
    def forward(self, images, masks=None):
        return {'images': images}

    def postprocess(self, outputs, sizes):
        out = []
        for im in outputs['images']:
            ys, xs = torch.nonzero(im[0] > 0.5, as_tuple=True)
            x0, y0 = int(xs.min()), int(ys.min())
            box = torch.tensor([[x0, y0, int(xs.max()) + 1, int(ys.max()) + 1]], dtype=torch.float32) + x0 % 7
            out.append({'boxes': box, 'scores': torch.tensor([0.5 + (y0 % 5) / 10]),
                        'labels': torch.zeros(1, dtype=torch.long)})
        return out


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
    odd = ToyBoxes(n=5, noise=False)
    loader = t._loader(odd, train=False)  # the trainer's own evaluation loader: a DistributedSampler, no drop_last
    odd_result, odd_preds = evaluate_distributed(ShiftedSquare(), odd, loader, t.info.device)
    torch.save({'params': {k: v.clone() for k, v in t.model.state_dict().items()},
                'ema': {k: v.clone() for k, v in t.ema.module.state_dict().items()},
                'stats': {k: float(v) for k, v in history[-1].items() if k.startswith('AP')},
                'n_predictions': len(t.last_predictions), 'world': t.info.world_size,
                'odd_stats': dict(odd_result.stats), 'odd_predicted': sorted(odd_preds), 'odd_shard': len(loader.sampler)},
               out / f'rank{rank}.pt')


if __name__ == '__main__':
    main(Path(sys.argv[1]))
