"""CPU inference speed of detlearn's D-FINE vs the official model (same weights, same process, interleaved runs).

    python tools/bench_dfine_cpu.py OFFICIAL_DFINE_DIR [--variant s] [--rounds 7] [--threads 1]

Run with a Python environment that can import both detlearn (this checkout on PYTHONPATH) and the official
Peterande/D-FINE code (commit 4a1f73a8bcfac736a88abde9596d87f116d780a7). Builds the official preset with random
weights, loads them into detlearn's preset through the official-weights mapping, checks that the outputs agree,
then times one 640x640 image, alternating official / detlearn in every round, in eval mode and after deploy().
Prints the median milliseconds per forward of each.
"""
import argparse, platform, statistics, sys, time
from pathlib import Path

import torch


def timed(model, x) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        model(x)
    return (time.perf_counter() - t) * 1000


def main():
    p = argparse.ArgumentParser()
    p.add_argument('official', type=Path)
    p.add_argument('--variant', default='s')
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    sys.path.insert(0, str(a.official.resolve()))
    torch.set_num_threads(a.threads)
    from src.core import YAMLConfig
    from detlearn.models.dfine import DFINE, dfine_config
    from detlearn.models.dfine_family import dfine_official_to_detlearn
    torch.manual_seed(0)
    official = YAMLConfig(str(a.official / f'configs/dfine/dfine_hgnetv2_{a.variant}_coco.yml'),
                          HGNetv2={'pretrained': False}).model.eval()
    ours = DFINE(dfine_config(a.variant)).eval()
    ours.load_state_dict(dfine_official_to_detlearn(official.state_dict()))
    x = torch.rand(1, 3, 640, 640)
    with torch.no_grad():  # random heads give exactly tied query scores, so compare the sorted scores
        sorted_scores = lambda out: out['pred_logits'].sigmoid().flatten().sort().values
        diff = (sorted_scores(ours(x)) - sorted_scores(official(x))).abs().max().item()
    print(f'D-FINE-{a.variant.upper()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, '
          f'{a.threads} thread(s), max |sorted score difference| {diff:.1e}')
    for mode in ('eval', 'deploy'):
        if mode == 'deploy':
            official.deploy()
            ours.deploy()
        times = {'official': [], 'detlearn': []}
        timed(official, x), timed(ours, x)  # warm-up
        for _ in range(a.rounds):
            times['official'].append(timed(official, x))
            times['detlearn'].append(timed(ours, x))
        print(mode, {k: f'{statistics.median(v):.0f} ms' for k, v in times.items()})


if __name__ == '__main__':
    main()
