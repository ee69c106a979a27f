"""Make the D-FINE-loss fixture: the official D-FINE matcher and DFINECriterion run on saved random outputs.

    /work/offvenv/bin/python tools/make_dfine_loss_fixtures.py OFFICIAL_DFINE_DIR tests/data/detr

OFFICIAL_DFINE_DIR is a checkout of https://github.com/Peterande/D-FINE; the saved fixture was made at
commit 4a1f73a on CPU (torch 2.14). The official package is imported from that folder (nothing of it
is copied into detlearn).

The outputs have the layout of the official D-FINE decoder in training (3 decoder layers, like
D-FINE-N/S): the final layer (pred_logits, pred_boxes, pred_corners, ref_points, up, reg_scale),
`aux_outputs` (layers 0-1, with the final layer as GO-LSD teacher), `pre_outputs` (the first
layer's traditional head), `enc_aux_outputs` (encoder proposals), `dn_outputs` (3 layers, teacher =
the last dn layer), `dn_pre_outputs` and `dn_meta`. All layers share their reference points, as in
the official decoder. Targets: 3 images with 5, 0 and 3 objects, labels 0..79.

Saved in OUT/dfine_loss.pt (torch.save, loadable with weights_only=True): commit, outputs, targets,
indices (the official matcher's per set, and the GO-LSD union), losses (every term as the official
criterion returns it, i.e. already weighted: vfl 1, bbox 5, giou 2, fgl 0.15, ddf 1.5) and `loss`
(their sum).
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

B, Q, K, REG_MAX, GROUPS = 3, 30, 80, 32, 3
NUM_OBJECTS = (5, 0, 3)


def rand_layer(gen, n, ref_points, corners=True):
    """Random outputs of one decoder layer for n queries."""
    out = {'pred_logits': torch.randn(B, n, K, generator=gen) * 2 - 2,
           'pred_boxes': (ref_points + torch.randn(B, n, 4, generator=gen) * 0.05).clamp(0.02, 0.98)}
    if corners:
        out['pred_corners'] = torch.randn(B, n, 4 * (REG_MAX + 1), generator=gen) * 2
        out['ref_points'] = ref_points
    return out


def make_inputs(seed=0):
    """Random D-FINE-shaped training outputs and targets (one image without objects)."""
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for g in NUM_OBJECTS:
        centre = torch.rand(g, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(g, 2, generator=gen) * 0.3 + 0.05
        targets.append({'labels': torch.randint(0, K, (g,), generator=gen), 'boxes': torch.cat([centre, size], 1)})
    up, reg_scale = torch.tensor([0.5]), torch.tensor([4.0])
    ref = torch.cat([torch.rand(B, Q, 2, generator=gen) * 0.8 + 0.1, torch.rand(B, Q, 2, generator=gen) * 0.3 + 0.05], -1)
    layers = [rand_layer(gen, Q, ref) for _ in range(3)]
    teacher = layers[-1]
    outputs = dict(layers[-1], up=up, reg_scale=reg_scale)
    outputs['aux_outputs'] = [dict(d, teacher_corners=teacher['pred_corners'], teacher_logits=teacher['pred_logits'])
                              for d in layers[:-1]]
    outputs['pre_outputs'] = rand_layer(gen, Q, ref, corners=False)
    outputs['enc_aux_outputs'] = [rand_layer(gen, Q, ref, corners=False)]
    outputs['enc_meta'] = {'class_agnostic': False}
    max_gt = max(NUM_OBJECTS)
    num_dn = 2 * max_gt * GROUPS
    dn_ref = torch.cat([torch.rand(B, num_dn, 2, generator=gen) * 0.8 + 0.1,
                        torch.rand(B, num_dn, 2, generator=gen) * 0.3 + 0.05], -1)
    dn = [rand_layer(gen, num_dn, dn_ref) for _ in range(3)]
    outputs['dn_outputs'] = [dict(d, teacher_corners=dn[-1]['pred_corners'], teacher_logits=dn[-1]['pred_logits'])
                             for d in dn]
    outputs['dn_pre_outputs'] = rand_layer(gen, num_dn, dn_ref, corners=False)
    positive = [torch.tensor([g * 2 * max_gt + i for g in range(GROUPS) for i in range(n)], dtype=torch.int64)
                for n in NUM_OBJECTS]
    outputs['dn_meta'] = {'dn_positive_idx': positive, 'dn_num_group': GROUPS, 'dn_num_split': [num_dn, Q]}
    return outputs, targets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('official_dfine_dir', type=Path)
    parser.add_argument('out', type=Path)
    parser.add_argument('--commit', default='4a1f73a', help='official commit of OFFICIAL_DFINE_DIR (recorded)')
    args = parser.parse_args()
    sys.path.insert(0, str(args.official_dfine_dir))
    from src.zoo.dfine.dfine_criterion import DFINECriterion
    from src.zoo.dfine.matcher import HungarianMatcher
    torch.set_num_threads(1)
    outputs, targets = make_inputs()
    saved = copy.deepcopy(outputs)
    matcher = HungarianMatcher({'cost_class': 2, 'cost_bbox': 5, 'cost_giou': 2}, use_focal_loss=True, alpha=0.25, gamma=2.0)
    weights = {'loss_vfl': 1, 'loss_bbox': 5, 'loss_giou': 2, 'loss_fgl': 0.15, 'loss_ddf': 1.5}
    criterion = DFINECriterion(matcher, weights, ['vfl', 'boxes', 'local'], alpha=0.75, gamma=2.0, num_classes=K, reg_max=REG_MAX)
    criterion.train()
    match = lambda out: matcher(out, targets)['indices']
    indices = {'final': match(outputs), 'pre': match(outputs['pre_outputs']), 'enc_0': match(outputs['enc_aux_outputs'][0])}
    indices.update({f'aux_{i}': match(a) for i, a in enumerate(outputs['aux_outputs'])})
    others = [indices['aux_0'], indices['aux_1'], indices['pre'], indices['enc_0']]
    indices['go'] = criterion._get_go_indices(indices['final'], others)
    losses = criterion(outputs, targets)
    kept = {k: v.detach().clone().float() for k, v in losses.items()}
    kept['loss'] = sum(kept.values())
    fixture = {'commit': args.commit, 'outputs': saved, 'targets': targets, 'losses': kept,
               'indices': {k: [(i.clone(), j.clone()) for i, j in v] for k, v in indices.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out / 'dfine_loss.pt')
    print(f'{len(kept)} loss terms, total {kept["loss"].item():.4f} -> {args.out / "dfine_loss.pt"}')


if __name__ == '__main__':
    main()
