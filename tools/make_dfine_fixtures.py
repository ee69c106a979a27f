"""Make the fixtures of tests/test_dfine_official.py (the assembled D-FINE model) from the official D-FINE code.

    python tools/make_dfine_fixtures.py OFFICIAL_DFINE_DIR OUT [--reference REFERENCE_DIR]

OFFICIAL_DFINE_DIR is a copy of Peterande/D-FINE at commit 4a1f73a8bcfac736a88abde9596d87f116d780a7, run with a
Python environment that can import it (torch + the repo's requirements); OUT is tests/data/dfine. Files written
(all with the `model_` prefix; the backbone/encoder fixtures `backbone_*` live beside them):

* model_reference.json.gz: for each preset n/s/m/l/x, every checkpoint tensor of the official model (name, shape,
  dtype, 'param' or 'buffer', in official order), the parameter counts and the state dict after `model.deploy()`.
* model_checkpoint.pth: a small D-FINE (an HGNetv2 with the official B0 block structure but narrow stages, a
  3-level HybridEncoder and decoder of width 32, points (3, 6, 3)) with random weights (every float perturbed so
  that no zero-initialised head hides a bug), saved in the official checkpoint layout (`ema.module` = the weights
  used, `model` = the same with one tensor zeroed, so a reader taking the wrong key fails the test).
* model_equivalence.pt: the small model's official eval outputs (pred_logits, pred_boxes) for two 640x640 images,
  the stage outputs (encoder maps of image 0 as fp16, top-300 query indices), the outputs after the official
  `deploy()`, the outputs at 352x480 from an official model built for that size (the 640 one raises), the top-300
  indices of those two runs too (rows of near-tied tokens can swap: the test matches rows by them), official
  W(n) and bbox2distance (FGL targets) values, and the arguments used.
* model_input_{0,1}.png (640x640) and model_input_2.png (352x480): the input images, resized from data_samples
  photos with PIL bilinear; the test reads the PNGs, so inputs are exact.

With --reference DIR (the project's reference folder with dfine_{n,s,m,l,x}.json) the recorded names, shapes and
counts are also checked against those files.
"""
import argparse, datetime, gzip, json, sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

OFFICIAL_COMMIT = '4a1f73a8bcfac736a88abde9596d87f116d780a7'
VARIANTS = ('n', 's', 'm', 'l', 'x')
TINY_ARCH = {'stem_channels': [3, 8, 8], 'stage_config': {  # official B0 layout, narrow
    'stage1': [8, 8, 16, 1, False, False, 3, 2], 'stage2': [16, 8, 32, 1, True, False, 3, 2],
    'stage3': [32, 16, 64, 2, True, True, 5, 2], 'stage4': [64, 16, 128, 1, True, True, 5, 2]},
    'url': ''}  # never downloaded: pretrained=False
BACKBONE = dict(name='Tiny', use_lab=True, return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False, pretrained=False)
ENCODER = dict(in_channels=[32, 64, 128], feat_strides=[8, 16, 32], hidden_dim=32, nhead=8, dim_feedforward=64,
               use_encoder_idx=[2], expansion=0.5, depth_mult=0.34)
DECODER = dict(num_classes=80, feat_channels=[32, 32, 32], feat_strides=[8, 16, 32], hidden_dim=32, num_levels=3,
               num_points=[3, 6, 3], nhead=8, num_layers=3, dim_feedforward=64, num_queries=300, reg_max=32,
               reg_scale=4, eval_idx=-1)
PHOTOS = [('astronaut.jpg', (640, 640)), ('chelsea.jpg', (640, 640)), ('rocket.jpg', (352, 480))]  # (h, w)


def facts(official: Path, variant: str) -> dict:
    """Facts of one preset, computed in a fresh process (YAMLConfig keeps global state between builds)."""
    import subprocess
    run = subprocess.run([sys.executable, __file__, str(official), '-', '--facts', variant], check=True,
                         capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def facts_here(official: Path, variant: str) -> dict:
    """Checkpoint entries, counts and deploy entries of one official preset (built like the reference JSONs)."""
    from src.core import YAMLConfig
    torch.manual_seed(0)
    model = YAMLConfig(str(official / f'configs/dfine/dfine_hgnetv2_{variant}_coco.yml'),
                       HGNetv2={'pretrained': False}).model
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    out = {'state_dict': [[k, list(v.shape), str(v.dtype).replace('torch.', ''), 'param' if k in params else 'buffer']
                          for k, v in model.state_dict().items()],
           'num_params': sum(p.numel() for p in model.parameters()),
           'num_trainable': sum(p.numel() for p in model.parameters() if p.requires_grad)}
    model.deploy()
    out['deploy_state_dict'] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    out['num_params_deploy'] = sum(p.numel() for p in model.parameters())
    return out


def check_reference(found: dict, reference: Path) -> None:
    """Assert that the recorded facts equal the reference JSON of each preset."""
    for v in VARIANTS:
        ref = json.loads((reference / f'dfine_{v}.json').read_text())
        assert [e[:3] for e in found[v]['state_dict']] == [list(e) for e in ref['state_dict']], v
        assert found[v]['num_params'] == ref['num_params'], v
        assert found[v]['num_params_deploy'] == ref['deploy_state_dict_changes']['num_params_deploy'], v
    print('facts equal the reference JSONs for', VARIANTS)


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Perturb every float weight/statistic (zero-initialised heads and unit norms would hide bugs)."""
    skip = ('anchors', 'num_points_scale', '.up', 'reg_scale')
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or name.endswith(skip):
                continue
            noise = torch.randn(t.shape, generator=generator)
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=generator) + 0.5)
            elif t.ndim >= 2:
                t.add_(noise / (t[0].numel() ** 0.5))
            else:
                t.add_(0.2 * noise)


def build(official: Path, eval_hw: tuple) -> torch.nn.Module:
    """The small official D-FINE for inputs of size eval_hw."""
    from src.nn.backbone.hgnetv2 import HGNetv2
    from src.zoo.dfine.dfine import DFINE
    from src.zoo.dfine.dfine_decoder import DFINETransformer
    from src.zoo.dfine.hybrid_encoder import HybridEncoder
    HGNetv2.arch_configs['Tiny'] = TINY_ARCH
    torch.manual_seed(0)
    return DFINE(HGNetv2(**BACKBONE), HybridEncoder(**ENCODER),
                 DFINETransformer(eval_spatial_size=list(eval_hw), **DECODER)).eval()


def images(repo: Path, out: Path) -> list:
    """Resize the photos, write the PNGs, return (1, 3, H, W) float tensors in [0, 1]."""
    tensors = []
    for i, (name, (h, w)) in enumerate(PHOTOS):
        img = Image.open(repo / 'data_samples/photos/images' / name).convert('RGB').resize((w, h), Image.BILINEAR)
        img.save(out / f'model_input_{i}.png')
        tensors.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255)
    return tensors


def stage_outputs(model, x) -> dict:
    """Encoder maps of image 0 (fp16) and the official top-300 indices of query selection."""
    dec = model.decoder
    feats = model.encoder(model.backbone(x))
    memory, _ = dec._get_encoder_input(feats)
    logits = dec.enc_score_head(dec.enc_output(dec.valid_mask.to(memory.dtype) * memory))
    topk = torch.topk(logits.max(-1).values, dec.num_queries, dim=-1).indices
    score_gaps = logits.max(-1).values.sort(-1, descending=True).values[:, :dec.num_queries + 1].diff(dim=-1).abs()
    return {'encoder_image0': [f[:1].half() for f in feats], 'topk_index': topk, 'topk_min_gap': score_gaps.min()}


def fdr_values(generator) -> dict:
    """Official W(n) and bbox2distance on random boxes."""
    from src.zoo.dfine.dfine_utils import bbox2distance, weighting_function
    up = torch.tensor([0.5])
    ref = torch.rand(50, 4, generator=generator) * 0.4 + 0.3
    cxcy, wh = torch.rand(50, 2, generator=generator), torch.rand(50, 2, generator=generator) * 0.6 + 0.02
    gt = torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1)
    pos, wr, wl = bbox2distance(ref, gt, 32, torch.tensor([4]), up)
    return {'W_4': weighting_function(32, up, torch.tensor([4])), 'W_8': weighting_function(32, up, torch.tensor([8])),
            'ref': ref, 'gt_xyxy': gt, 'position': pos, 'weight_right': wr, 'weight_left': wl}


def equivalence(official: Path, repo: Path, out: Path) -> dict:
    """Weights, checkpoint and official outputs of the small model."""
    g = torch.Generator().manual_seed(0)
    model = build(official, (640, 640))
    randomize(model, g)
    x640 = torch.cat(images(repo, out)[:2])
    x_other = images(repo, out)[2]
    res = {'official_commit': OFFICIAL_COMMIT, 'tiny_arch': TINY_ARCH, 'backbone': BACKBONE, 'encoder': ENCODER,
           'decoder': DECODER, 'photos': PHOTOS, 'fdr': fdr_values(g)}
    with torch.no_grad():
        res['eval_640'] = {k: v.clone() for k, v in model(x640).items()}
        res['stages_640'] = stage_outputs(model, x640)
        try:
            model(x_other)
            res['official_640_model_at_other_size'] = 'ran'
        except Exception as e:  # the stored 640x640 anchors do not fit
            res['official_640_model_at_other_size'] = f'{type(e).__name__}: {e}'[:300]
        other = build(official, PHOTOS[2][1])
        other.load_state_dict({k: v for k, v in model.state_dict().items()  # all but the size-specific anchors
                               if k not in ('decoder.anchors', 'decoder.valid_mask')}, strict=False)
        res['eval_other'] = {k: v.clone() for k, v in other(x_other).items()}
        res['topk_other'] = stage_outputs(other, x_other)['topk_index']
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.deploy()
        res['deploy_640'] = {k: v.clone() for k, v in model(x640).items()}
        res['topk_deploy_640'] = stage_outputs(model, x640)['topk_index']
        res['num_params_deploy'] = sum(p.numel() for p in model.parameters())
    res['num_params'] = sum(p.numel() for p in build(official, (640, 640)).parameters())
    raw = dict(state)
    raw['decoder.enc_score_head.bias'] = torch.zeros_like(raw['decoder.enc_score_head.bias'])
    ckpt = {'date': datetime.datetime.now().isoformat(), 'last_epoch': 0, 'model': raw, 'criterion': {},
            'postprocessor': {}, 'ema': {'module': state, 'updates': 1}}
    torch.save(ckpt, out / 'model_checkpoint.pth')
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('official', type=Path)
    p.add_argument('out', type=Path)
    p.add_argument('--reference', type=Path)
    p.add_argument('--keep-facts', action='store_true', help='keep an existing model_reference.json.gz')
    p.add_argument('--facts', help=argparse.SUPPRESS)  # internal: print one preset's facts as JSON
    a = p.parse_args()
    sys.path.insert(0, str(a.official.resolve()))
    torch.set_num_threads(1)
    if a.facts:
        print(json.dumps(facts_here(a.official, a.facts)))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parent.parent
    if not a.keep_facts:
        found = {v: facts(a.official, v) for v in VARIANTS}
        if a.reference:
            check_reference(found, a.reference)
        with gzip.open(a.out / 'model_reference.json.gz', 'wt') as f:
            json.dump({'official_commit': OFFICIAL_COMMIT, 'presets': found}, f)
    torch.save(equivalence(a.official, repo, a.out), a.out / 'model_equivalence.pt')
    print('wrote', sorted(p.name for p in a.out.glob('model_*')))


if __name__ == '__main__':
    main()
