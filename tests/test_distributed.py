"""DDP on CPU (gloo): `torchrun --nproc_per_node 2` keeps replicas identical and matches one process
training on the same global batch.

The toy detector has no BatchNorm on purpose: with BatchNorm each rank normalises with its own half
batch, so a DDP run legitimately differs from a single-process run (SyncBatchNorm, `loop.sync_bn`, is
what makes them agree). Without it, the DDP gradient (the mean over ranks of per-rank means) equals the
single-process gradient of the global batch, up to float summation order: hence allclose, not equal,
across the two runs, and torch.equal across ranks (DDP all-reduces the same bytes on every rank).
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(cmd, tmp):
    env = os.environ | {'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(HERE)}
    for k in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'): env.pop(k, None)
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_ddp_matches_single_process(tmp_path):
    sys.path.insert(0, str(HERE))
    from ddp_worker import main
    from toy_detector import ToyDetector
    main(tmp_path / 'single')  # the single-process run, in this process (saves a Python start-up)
    run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         str(HERE / 'ddp_worker.py'), str(tmp_path / 'ddp')], tmp_path)
    single = torch.load(tmp_path / 'single' / 'rank0.pt')
    r0, r1 = torch.load(tmp_path / 'ddp' / 'rank0.pt'), torch.load(tmp_path / 'ddp' / 'rank1.pt')
    assert (single['world'], r0['world']) == (1, 2)
    torch.manual_seed(0)
    init = ToyDetector().state_dict()
    for name, p in r0['params'].items():
        assert torch.equal(p, r1['params'][name]), f'{name} differs across ranks'
        assert torch.equal(r0['ema'][name], r1['ema'][name]), f'EMA {name} differs across ranks'
        torch.testing.assert_close(p, single['params'][name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r0['ema'][name], single['ema'][name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, init[name]), f'{name} did not train'
    # evaluation: each rank predicted half of the 10 validation images; rank 0 scored all 10
    assert r0['n_predictions'] == r1['n_predictions'] == 10
    assert r0['stats'] == r1['stats'] and r0['stats']['AP50'] == single['stats']['AP50']
