"""CPU timing of detlearn's D-FINE backbone + encoder against the official ones (same weights, same input).

    python tools/time_dfine_backbone.py OFFICIAL_DFINE_DIR [--variants n s] [--size 640] [--repeats 10]

OFFICIAL_DFINE_DIR is a copy of Peterande/D-FINE (commit 4a1f73a8bcfac736a88abde9596d87f116d780a7); run
with a Python environment that imports both it and detlearn (PYTHONPATH=.). One thread, eval mode, no
gradients; the two implementations alternate (interleaved, the order swapped every run), so load changes on
the machine hit both alike; medians are printed.
"""
import argparse, os, platform, statistics, sys, time
from datetime import datetime, timezone
from pathlib import Path

import torch


def official_modules(variant: str, size: int):
    """The official HGNetv2 + HybridEncoder of a preset (config file values; eval size = the input size)."""
    from src.core import YAMLConfig
    cfg = YAMLConfig(f'configs/dfine/dfine_hgnetv2_{variant}_coco.yml', HGNetv2={'pretrained': False},
                     eval_spatial_size=[size, size])
    model = cfg.model
    return model.backbone, model.encoder


def ours(variant: str, backbone_state: dict, encoder_state: dict):
    """detlearn's modules with the official weights."""
    from detlearn.backbones.hgnetv2 import HGNetv2, dfine_hgnetv2_config
    from detlearn.models.dfine.encoder import HybridEncoder, hybrid_encoder_config
    backbone, encoder = HGNetv2(dfine_hgnetv2_config(variant)), HybridEncoder(hybrid_encoder_config(variant))
    backbone.load_state_dict(backbone_state)
    encoder.load_state_dict(encoder_state)
    return backbone.eval(), encoder.eval()


def seconds(backbone, encoder, x) -> float:
    """Wall time of one backbone + encoder forward."""
    start = time.perf_counter()
    encoder(backbone(x))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('official', type=Path)
    parser.add_argument('--variants', nargs='+', default=['n', 's'])
    parser.add_argument('--size', type=int, default=640)
    parser.add_argument('--repeats', type=int, default=10)
    args = parser.parse_args()
    sys.path.insert(0, str(args.official.resolve()))
    os.chdir(args.official)  # the official configs include each other by relative paths
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f'{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, '
          f'torch {torch.__version__}, 1 thread, input 1×3×{args.size}×{args.size}, eval, no grad')
    for variant in args.variants:
        off_b, off_e = official_modules(variant, args.size)
        off_b.eval()
        off_e.eval()
        our_b, our_e = ours(variant, off_b.state_dict(), off_e.state_dict())
        x = torch.rand(1, 3, args.size, args.size)
        times = {'official': [], 'detlearn': []}
        with torch.no_grad():
            # same outputs (and a warm-up)
            torch.testing.assert_close(our_e(our_b(x)), off_e(off_b(x)), rtol=1e-4, atol=1e-4)
            runs = {'official': (off_b, off_e), 'detlearn': (our_b, our_e)}
            for i in range(args.repeats):
                for name in (('official', 'detlearn') if i % 2 == 0 else ('detlearn', 'official')):
                    times[name].append(seconds(*runs[name], x))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"dfine_{variant}: official {med['official'] * 1e3:.0f} ms, "
              f"detlearn {med['detlearn'] * 1e3:.0f} ms "
              f"(ratio {med['detlearn'] / med['official']:.3f}; medians of {args.repeats} interleaved runs)")


if __name__ == '__main__':
    main()
