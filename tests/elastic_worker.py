"""Run by tests/test_elastic.py under two torchrun agents ("nodes" on loopback, one process each): trains the toy
detector for 3 epochs with a checkpoint every 2 steps and `resume='auto'`, as an elastic job's command must.
With a kill step given, the node-1 worker SIGKILLs itself there once (a marker file remembers it), so torchrun
restarts the whole group and the job has to resume by itself. Rank 0 saves the final weights."""
import os
import signal
import sys
from pathlib import Path

import torch

from toy_detector import ToyBoxes, ToyDetector, toy_collate
from detlearn.train import Trainer
from detlearn.train_utils import LoopConfig, OptimConfig, ScheduleConfig, TrainConfig


def main(out: Path, kill_step: int):
    world = int(os.environ.get('WORLD_SIZE', 1))
    torch.manual_seed(0)
    cfg = TrainConfig(loop=LoopConfig(epochs=3, batch_size=4 // world, num_workers=0, eval_every=100, ema_warmup=5,
                                      no_aug_epochs=0, checkpoint_every_steps=2),
                      schedule=ScheduleConfig(warmup_epochs=1, final_flat_epochs=0),
                      optim=OptimConfig(lr=0.05 / 4, lr_per_image=True))
    t = Trainer(ToyDetector(), ToyBoxes(), cfg=cfg, work_dir=out / 'run', device='cpu', collate_fn=toy_collate,
                progress=True)
    marker = out / 'killed_once'
    if kill_step and t.info.rank == 1 and not marker.exists():
        step = t.engine.step
        def dying(*args):
            if t.engine.step_count == kill_step and t.engine.pending == 0:
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no flush: a preempted node
            return step(*args)
        t.engine.step = dying
    last = out / 'run' / 'last.pth'
    if t.info.rank == 0 and last.exists():  # a restart: note where it resumes (step, batches into the epoch)
        ck = torch.load(last, weights_only=False)
        (out / 'resumed_from.txt').write_text(f"{ck['step']} {ck.get('iter', 0)}")
    t.fit(resume='auto')
    if t.info.rank == 0:
        torch.save({'params': t.model.state_dict(), 'ema': t.ema.module.state_dict(), 'step': t.step,
                    'world': t.info.world_size}, out / 'final.pt')


if __name__ == '__main__':
    main(Path(sys.argv[1]), int(sys.argv[2]))
