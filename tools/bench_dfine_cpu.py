"""CPU inference speed of detlearn's D-FINE vs the official model (same weights, same process, interleaved runs).

    python tools/bench_dfine_cpu.py OFFICIAL_DFINE_DIR [--variant s] [--rounds 15] [--threads 1]

Run with a Python environment that can import both detlearn (this checkout on PYTHONPATH) and the official
Peterande/D-FINE code (commit 4a1f73a8bcfac736a88abde9596d87f116d780a7). Builds the official preset with random
weights, loads them into detlearn's preset through the official-weights mapping, checks that the outputs agree,
then times one 640x640 image with four models in every round -- official and detlearn, each in eval mode and
after deploy() -- in an order that rotates from round to round (`detlearn.bench.speed.time_interleaved`), so
that a change of the machine's load hits all four alike. Prints the median milliseconds per forward of each
and the ratios.
"""
import argparse, copy, platform, sys
from pathlib import Path

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument('official', type=Path)
    p.add_argument('--variant', default='s')
    p.add_argument('--rounds', type=int, default=15)
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    sys.path.insert(0, str(a.official.resolve()))
    torch.set_num_threads(a.threads)
    from src.core import YAMLConfig
    from detlearn.models.dfine import DFINE, dfine_config
    from detlearn.models.dfine.family import dfine_official_to_detlearn
    from detlearn.bench.speed import median_times, time_interleaved
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
    official_deploy, ours_deploy = copy.deepcopy(official), copy.deepcopy(ours).deploy()
    official_deploy.deploy()
    with torch.no_grad():
        diff = (sorted_scores(ours_deploy(x)) - sorted_scores(official_deploy(x))).abs().max().item()
    print(f'deployed: max |sorted score difference| {diff:.1e}')
    models = {'official eval': official, 'detlearn eval': ours,
              'official deploy': official_deploy, 'detlearn deploy': ours_deploy}
    with torch.no_grad():
        med = median_times(time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, a.rounds))
    ms = {k: 1000 * v['wall'] for k, v in med.items()}
    print(f"median of {a.rounds} interleaved rounds: " + ', '.join(f'{k} {v:.0f} ms' for k, v in ms.items()))
    print(f"detlearn eval / official eval {ms['detlearn eval'] / ms['official eval']:.3f}; "
          f"detlearn deploy / detlearn eval {ms['detlearn deploy'] / ms['detlearn eval']:.3f}; "
          f"detlearn deploy / official deploy {ms['detlearn deploy'] / ms['official deploy']:.3f}")


if __name__ == '__main__':
    main()
