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
    # 5 images on 2 ranks: each rank predicts 3 (the sampler repeats one), the merged set has each image once
    assert (r0['odd_shard'], r1['odd_shard'], single['odd_shard']) == (3, 3, 5)
    assert r0['odd_predicted'] == r1['odd_predicted'] == single['odd_predicted'] == [1, 2, 3, 4, 5]
    assert 0 < single['odd_stats']['AP'] < 1 and r0['odd_stats'] == r1['odd_stats']
    for name, value in single['odd_stats'].items():
        assert abs(r0['odd_stats'][name] - value) < 1e-6, (name, r0['odd_stats'][name], value)


def test_torchrun_checks_datasets_on_rank0_only(tmp_path):
    """`detlearn train` under torchrun: the dataset doctor scans each dataset on rank 0 only (rank 1 waits for
    its report), counted by tests/scan_worker.py; a broken dataset stops both ranks with the doctor's report."""
    import json
    from detlearn.data.samples import sample_dataset
    ann, images = sample_dataset('shapes', 'train')
    data = json.loads(Path(ann).read_text())
    keep = {im['id'] for im in data['images'][:16]}
    small = {**data, 'images': [im for im in data['images'] if im['id'] in keep],
             'annotations': [a for a in data['annotations'] if a['image_id'] in keep]}
    (tmp_path / 'train.json').write_text(json.dumps(small))
    small['images'][0] = {**small['images'][0], 'width': small['images'][0]['width'] + 1}  # a size mismatch
    (tmp_path / 'broken.json').write_text(json.dumps(small))
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                str(HERE / 'scan_worker.py')]
    train = ['train', '--recipe', 'shapes_demo', '--train-images', str(images),
             '--epochs', '1', '--batch-size', '4', '--device', 'cpu', '--no-progress', '--exist-ok']
    run(torchrun + [str(tmp_path / 'ok'), *train, '--train-ann', str(tmp_path / 'train.json'),
                    '--val-ann', str(tmp_path / 'train.json'), '--val-images', str(images), '--work-dir', str(tmp_path / 'run')], tmp_path)
    r0, r1 = (json.loads((tmp_path / 'ok' / f'scans{r}.json').read_text()) for r in (0, 1))
    assert (r0['code'], r1['code']) == (0, 0)
    assert r0['scans'] == [str(tmp_path / 'train.json')] * 2 and r1['scans'] == [], (r0, r1)  # train, then val
    run(torchrun + [str(tmp_path / 'bad'), *train, '--train-ann', str(tmp_path / 'broken.json'),
                    '--work-dir', str(tmp_path / 'run2')], tmp_path)
    b0, b1 = (json.loads((tmp_path / 'bad' / f'scans{r}.json').read_text()) for r in (0, 1))
    assert b0['code'] == b1['code'] == 3 and len(b0['scans']) == 1 and b1['scans'] == [], (b0, b1)
    assert 'size_mismatch' in b0['stderr'] and 'size_mismatch' in b1['stderr']
