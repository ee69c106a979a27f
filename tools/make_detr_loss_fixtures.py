"""Make the DETR-loss fixture: the official DINO matcher and SetCriterion run on saved random outputs.

    /work/offvenv/bin/python tools/make_detr_loss_fixtures.py OFFICIAL_DINO_DIR tests/data/detr

OFFICIAL_DINO_DIR is a checkout of https://github.com/IDEA-Research/DINO; the saved fixture was made
at commit faa8520 on CPU (torch 2.14). The official package is imported from that folder (nothing of
it is copied into detlearn). Two shims make it import and run on a CPU-only machine:
the compiled `MultiScaleDeformableAttention` extension is replaced by an empty module (the loss never
calls it), and `Tensor.cuda()` returns the tensor itself (the criterion's denoising branch calls it).

Saved (torch.save, loadable with weights_only=True) in OUT/dino_loss.pt:
  outputs   : pred_logits/pred_boxes of the final layer, `aux_outputs` (3 layers), `interm_outputs`,
              and `dn_meta` (pad_size, num_dn_group, output_known_lbs_bboxes with its own aux_outputs)
  targets   : 3 images (5, 0 and 3 objects), labels in 1..90, normalised cxcywh boxes
  indices   : the official matcher's assignments, per set (aux_0..aux_2, interm, final) and image
  losses    : every loss_ce / loss_bbox / loss_giou term of the official SetCriterion, and `loss`,
              the sum weighted as in the official build_dino (cls 1, bbox 5, giou 2; the same for
              aux and dn terms, interm_loss_coef 1)
  commit    : the official commit given by --commit (default faa8520)
"""
import argparse
import sys
import types
from pathlib import Path

import torch

B, Q, K, AUX, GROUPS = 3, 30, 91, 3, 3
NUM_OBJECTS = (5, 0, 3)


def import_official(dino_dir: Path):
    """The official HungarianMatcher and SetCriterion, imported from a DINO checkout on a CPU-only machine."""
    sys.modules.setdefault('MultiScaleDeformableAttention', types.ModuleType('MultiScaleDeformableAttention'))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the official criterion moves index tensors to CUDA
    sys.path.insert(0, str(dino_dir))
    from models.dino.dino import SetCriterion
    from models.dino.matcher import HungarianMatcher
    return HungarianMatcher, SetCriterion


def random_set(gen: torch.Generator, n: int) -> dict:
    """Random outputs of one set of n queries: logits (B, n, K), boxes (B, n, 4) normalised cxcywh."""
    logits = torch.randn(B, n, K, generator=gen) * 2 - 1
    boxes = torch.cat([torch.rand(B, n, 2, generator=gen) * 0.8 + 0.1, torch.rand(B, n, 2, generator=gen) * 0.4 + 0.02], -1)
    return {'pred_logits': logits, 'pred_boxes': boxes}


def make_inputs(seed: int = 0) -> tuple[dict, list[dict]]:
    """Random DINO-shaped outputs (final, aux, interm, dn) and targets with one image without objects."""
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for g in NUM_OBJECTS:
        centre = torch.rand(g, 2, generator=gen) * 0.7 + 0.15
        size = torch.rand(g, 2, generator=gen) * 0.3 + 0.05
        targets.append({'labels': torch.randint(1, K, (g,), generator=gen), 'boxes': torch.cat([centre, size], 1)})
    outputs = random_set(gen, Q)
    outputs['aux_outputs'] = [random_set(gen, Q) for _ in range(AUX)]
    outputs['interm_outputs'] = random_set(gen, Q)
    pad_size = 2 * max(NUM_OBJECTS) * GROUPS
    known = random_set(gen, pad_size)
    known['aux_outputs'] = [random_set(gen, pad_size) for _ in range(AUX)]
    outputs['dn_meta'] = {'pad_size': pad_size, 'num_dn_group': GROUPS, 'output_known_lbs_bboxes': known}
    return outputs, targets


def official_weights() -> dict:
    """The weight of every term, built the way the official build_dino builds its weight_dict."""
    base = {'loss_ce': 1.0, 'loss_bbox': 5.0, 'loss_giou': 2.0}
    with_dn = {**base, **{k + '_dn': v for k, v in base.items()}}
    weights = dict(with_dn)
    for i in range(AUX):
        weights.update({k + f'_{i}': v for k, v in with_dn.items()})
    weights.update({k + '_interm': v for k, v in base.items()})
    return weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('official_dino_dir', type=Path)
    parser.add_argument('out', type=Path)
    parser.add_argument('--commit', default='faa8520', help='official commit of OFFICIAL_DINO_DIR (recorded)')
    args = parser.parse_args()
    HungarianMatcher, SetCriterion = import_official(args.official_dino_dir)
    torch.set_num_threads(1)
    outputs, targets = make_inputs()
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25)
    criterion = SetCriterion(K, matcher=matcher, weight_dict=official_weights(), focal_alpha=0.25,
                             losses=['labels', 'boxes', 'cardinality'])
    criterion.train()
    losses, indices = criterion(outputs, targets, return_indices=True)
    names = ['aux_0', 'aux_1', 'aux_2', 'interm', 'final']
    weights = official_weights()
    kept = {k: v.detach().clone() for k, v in losses.items() if k.startswith(('loss_ce', 'loss_bbox', 'loss_giou'))}
    kept['loss'] = sum(losses[k] * w for k, w in weights.items())
    strip = lambda d: {k: v for k, v in d.items() if k != 'output_known_lbs_bboxes'}
    dn_meta = {**strip(outputs['dn_meta']), 'output_known_lbs_bboxes': outputs['dn_meta']['output_known_lbs_bboxes']}
    fixture = {'commit': args.commit, 'outputs': {**outputs, 'dn_meta': dn_meta}, 'targets': targets,
               'indices': {n: [(i.clone(), j.clone()) for i, j in ind] for n, ind in zip(names, indices)},
               'losses': kept}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out / 'dino_loss.pt')
    print(f'{len(kept)} loss terms, total {kept["loss"].item():.4f} -> {args.out / "dino_loss.pt"}')


if __name__ == '__main__':
    main()
