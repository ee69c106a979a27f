"""CPU eval forward time of detlearn's dino_4scale_r50 against the official model (same weights, same input), in
one process, alternating the two so that machine noise hits both alike; both use the PyTorch deformable-attention
path (the official one: its own `ms_deform_attn_core_pytorch`). Prints the median of each and their ratio.

    PYTHONPATH=. python tools/dino_cpu_speed.py OFFICIAL_DINO_DIR [--short 512] [--rounds 5]
Run with a Python that has the official repository's requirements (its imports) and detlearn on the path.
"""
import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from detlearn.models.dino import DINO, dino_4scale_r50, dino_official_to_detlearn


def load_fixture_tools():
    """tools/make_dino_fixtures.py as a module (it knows how to build the official model on CPU)."""
    spec = importlib.util.spec_from_file_location('make_dino_fixtures', Path(__file__).with_name('make_dino_fixtures.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def main(official: Path, short: int, rounds: int) -> None:
    fx = load_fixture_tools()
    fx.patch_official(official, None, 256)
    torch.manual_seed(0)
    theirs, _, _ = fx.build_official(official, {})
    ours = DINO(dino_4scale_r50(91)).eval()
    ours.load_state_dict(dino_official_to_detlearn(theirs.state_dict()))
    images, mask = fx.pad_batch([fx.load_photo('chelsea.jpg', short, 1333)])
    from util.misc import NestedTensor
    runs = {'official': lambda: theirs(NestedTensor(images, mask)), 'detlearn': lambda: ours(images, mask)}
    for fn in runs.values():
        fn()  # warm-up
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f'input {tuple(images.shape)}, threads {torch.get_num_threads()}, rounds {rounds}, torch {torch.__version__}')
    for k, v in times.items():
        print(f'{k}: median {med[k]:.2f} s  runs {[round(t, 2) for t in v]}')
    print(f'ratio detlearn / official (medians): {med["detlearn"] / med["official"]:.3f}')


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('official', type=Path)
    p.add_argument('--short', type=int, default=512, help='shorter image side (official eval: 800)')
    p.add_argument('--rounds', type=int, default=5)
    a = p.parse_args()
    main(a.official.resolve(), a.short, a.rounds)
