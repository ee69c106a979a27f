"""Build the DINO equivalence fixtures of tests/test_dino_official.py with the OFFICIAL DINO code.

    python tools/make_dino_fixtures.py OFFICIAL_DINO_DIR OUT_DIR            # reduced model -> OUT_DIR/reduced.pt
    python tools/make_dino_fixtures.py OFFICIAL_DINO_DIR OUT_DIR --full     # dino_4scale_r50 on one ~800 px photo
    python tools/make_dino_fixtures.py OFFICIAL_DINO_DIR OUT_DIR --swin     # a reduced official Swin -> swin_io.pt

OFFICIAL_DINO_DIR is a checkout of https://github.com/IDEA-Research/DINO at commit
faa8520fe9604c23ad65a48bc583550a44c0e3ab (the fixtures in tests/data/dino were made from it). Run it with a
Python that has the official repository's requirements (torch, torchvision, addict, yapf, pycocotools, scipy);
detlearn itself is NOT imported, so the fixture does not depend on the code it tests.

The official code runs unmodified except for three run-time substitutions, made here:
1. its compiled CUDA extension is replaced by its own pure-PyTorch `ms_deform_attn_core_pytorch`;
2. torchvision's ResNet-50 is built without downloading ImageNet weights (random init), and for the reduced
   fixture at 1/8 width with one block per stage (the official `Backbone` code path is unchanged);
3. `gen_sineembed_for_position` hard-codes 128 features per coordinate (= hidden_dim / 2 for the released
   hidden_dim 256); for the reduced hidden_dim 64 it is replaced by the same formula with hidden_dim / 2.
   The replacement is checked to equal the official function at 128 features.
Eval mode, CPU, float32, a batch of two photos of different sizes padded bottom/right (masks).
"""
import argparse
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

OFFICIAL_COMMIT = 'faa8520fe9604c23ad65a48bc583550a44c0e3ab'
REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / 'data_samples' / 'photos' / 'images'
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
REDUCED = dict(num_classes=5, hidden_dim=64, nheads=8, enc_layers=2, dec_layers=2, dim_feedforward=64,
               num_queries=30, enc_n_points=2, dec_n_points=2, num_select=20)
REDUCED_RESNET = dict(depths=(1, 1, 1, 1), width=8)


def patch_official(official: Path, resnet: dict | None, hidden_dim: int) -> None:
    """Import the official package with the three substitutions of the module docstring."""
    sys.path.insert(0, str(official))
    sys.modules['MultiScaleDeformableAttention'] = types.ModuleType('MultiScaleDeformableAttention')
    import torchvision
    from torchvision.models.resnet import Bottleneck, ResNet
    import models.dino.ops.modules.ms_deform_attn as msda_module
    from models.dino.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch

    class PyTorchMSDA:  # the official module calls MSDeformAttnFunction.apply(..., im2col_step)
        @staticmethod
        def apply(value, shapes, start, locations, weights, im2col_step):
            return ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    msda_module.MSDeformAttnFunction = PyTorchMSDA

    def resnet50(replace_stride_with_dilation=None, pretrained=False, norm_layer=None):
        net = ResNet(Bottleneck, [3, 4, 6, 3], norm_layer=norm_layer)  # random init, never downloaded
        if resnet is not None:                                       # narrower and shallower, same code path
            w = resnet['width']
            net.inplanes = w
            net.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
            net.bn1 = norm_layer(w)
            for i, depth in enumerate(resnet['depths']):
                setattr(net, f'layer{i + 1}', net._make_layer(Bottleneck, w * 2 ** i, depth, stride=1 if i == 0 else 2))
        return net
    torchvision.models.resnet50 = resnet50

    import models.dino.dino as dino_module
    import models.dino.deformable_transformer as dt
    import models.dino.utils as dino_utils
    official_build_backbone = dino_module.build_backbone

    def build_backbone(args):
        joiner = official_build_backbone(args)
        if resnet is not None:  # the official code lists ResNet-50's channels; give the reduced ones
            channels = [resnet['width'] * 4 * 2 ** i for i in args.return_interm_indices]
            joiner.num_channels = joiner[0].num_channels = channels
        return joiner
    dino_module.build_backbone = build_backbone

    def sine_embed(pos: torch.Tensor, n: int = hidden_dim // 2) -> torch.Tensor:
        dim_t = 10000 ** (2 * (torch.arange(n, dtype=torch.float32, device=pos.device) // 2) / n)
        parts = []
        for c in (1, 0, 2, 3)[:pos.shape[-1]]:                      # y, x, w, h
            p = pos[:, :, c, None] * (2 * math.pi) / dim_t
            parts.append(torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2))
        return torch.cat(parts, dim=2)
    probe = torch.rand(5, 2, 4)
    assert torch.allclose(sine_embed(probe, 128), dino_utils.gen_sineembed_for_position(probe), atol=1e-6)
    dt.gen_sineembed_for_position = sine_embed


def build_official(official: Path, overrides: dict, config: str = 'DINO_4scale.py'):
    """main.py's args (parser defaults + SLConfig merge, as main.main does) with overrides -> official model."""
    import main
    from util.slconfig import SLConfig
    args = main.get_args_parser().parse_args(['-c', str(official / 'config' / 'DINO' / config)])
    for k, v in SLConfig.fromfile(args.config_file)._cfg_dict.to_dict().items():
        setattr(args, k, v)
    args.device = 'cpu'
    args.use_ema = False
    for k, v in overrides.items():
        setattr(args, k, v)
    args.dn_labelbook_size = args.num_classes
    model, _, postprocessors = main.build_model_main(args)
    return model.eval(), postprocessors['bbox'], args


def load_photo(name: str, short: int, max_size: int) -> torch.Tensor:
    """A photo as DINO's eval transform makes it: RGB /255, resized (shorter side `short`), ImageNet-normalised."""
    img = Image.open(PHOTOS / name).convert('RGB')
    w, h = img.size
    scale = min(short / min(w, h), max_size / max(w, h))
    img = img.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def pad_batch(images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad bottom/right to the largest size; mask True on padding."""
    H, W = max(x.shape[1] for x in images), max(x.shape[2] for x in images)
    batch, mask = torch.zeros(len(images), 3, H, W), torch.ones(len(images), H, W, dtype=torch.bool)
    for i, x in enumerate(images):
        batch[i, :, :x.shape[1], :x.shape[2]] = x
        mask[i, :x.shape[1], :x.shape[2]] = False
    return batch, mask


def run_with_intermediates(model, postprocess, images, mask, orig_sizes) -> dict:
    """Official forward with hooks that keep every stage's output."""
    from util.misc import NestedTensor
    saved = {}

    def keep(key, pick=lambda o: o):
        def hook(module, inputs, output):  # returns None: the official output is left untouched
            saved.setdefault(key, pick(output))
        return hook
    hooks = [model.backbone.register_forward_hook(keep('backbone')),
             model.transformer.encoder.register_forward_hook(keep('memory', lambda o: o[0])),
             model.transformer.enc_out_class_embed.register_forward_hook(keep('enc_logits')),
             model.transformer.decoder.register_forward_hook(keep('decoder'))]
    for l, proj in enumerate(model.input_proj):
        hooks.append(proj.register_forward_hook(keep(f'src{l}')))
    with torch.no_grad():
        out = model(NestedTensor(images, mask))
        results = postprocess(out, orig_sizes)
    for h in hooks:
        h.remove()
    feats, _ = saved['backbone']
    scores = saved['enc_logits'].max(-1)[0]                              # (B, S) what the official top-k ranks
    return {
        'backbone': [f.tensors for f in feats], 'backbone_masks': [f.mask for f in feats],
        'srcs': [saved[f'src{l}'] for l in range(len(model.input_proj))],
        'memory': saved['memory'], 'enc_scores': scores,
        'topk_index': torch.topk(scores, model.num_queries, dim=1)[1],  # the official call, on the hooked logits
        'hs': torch.stack(saved['decoder'][0]), 'references': torch.stack(saved['decoder'][1]),
        'pred_logits': out['pred_logits'], 'pred_boxes': out['pred_boxes'],
        'aux_outputs': out['aux_outputs'], 'interm_outputs': out['interm_outputs'],
        'interm_outputs_for_matching_pre': out['interm_outputs_for_matching_pre'],
        'postprocess': results}


def min_topk_gap(scores: torch.Tensor, k: int) -> float:
    """Smallest gap between consecutive sorted scores among the top k+1 (ties would make ranks ambiguous)."""
    top = scores.topk(k + 1, dim=1)[0]
    return float((top[:, :-1] - top[:, 1:]).min())


def make_reduced(official: Path, out_dir: Path) -> None:
    """Reduced model, random weights; picks the first seed whose top-k scores are separated by > 1e-4."""
    patch_official(official, REDUCED_RESNET, REDUCED['hidden_dim'])
    images = [load_photo('chelsea.jpg', 96, 160), load_photo('coffee.jpg', 80, 112)]
    batch, mask = pad_batch(images)
    orig_sizes = torch.tensor([[300, 451], [400, 600]])             # (h, w) of "original" images for postprocess
    for seed in range(20):
        torch.manual_seed(seed)
        model, post, args = build_official(official, REDUCED)
        with torch.no_grad():
            for p in model.backbone.parameters(): p.normal_(0, 0.2)  # make the (frozen) stem non-trivial too
            for b in model.backbone.buffers(): b.uniform_(0.5, 1.5)
        inter = run_with_intermediates(model, post, batch, mask, orig_sizes)
        gap = min_topk_gap(inter['enc_scores'], model.num_queries)
        print(f'seed {seed}: smallest top-k score gap {gap:.2e}')
        if gap > 1e-4:
            break
    ckpt = {'model': model.state_dict(), 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 0, 'args': args}
    torch.save(ckpt, out_dir / 'reduced_checkpoint.pth')
    torch.save({'official_commit': OFFICIAL_COMMIT, 'config': {**REDUCED, **{f'resnet_{k}': v for k, v in REDUCED_RESNET.items()}},
                'seed': seed, 'images': batch, 'mask': mask, 'orig_sizes': orig_sizes, 'outputs': inter},
               out_dir / 'reduced_io.pt')


def make_full(official: Path, out_dir: Path) -> None:
    """dino_4scale_r50 (random weights), one photo resized to shorter side 800; kept out of the repository."""
    patch_official(official, None, 256)
    torch.manual_seed(0)
    model, post, args = build_official(official, {})
    with torch.no_grad():
        for b in model.backbone.buffers(): b.uniform_(0.5, 1.5)     # non-trivial frozen-BN statistics
    batch, mask = pad_batch([load_photo('astronaut.jpg', 800, 1333)])
    inter = run_with_intermediates(model, post, batch, mask, torch.tensor([[512, 512]]))
    torch.save({'model': model.state_dict(), 'args': args}, out_dir / 'full_checkpoint.pth')
    torch.save({'official_commit': OFFICIAL_COMMIT, 'images': batch, 'mask': mask, 'orig_sizes': torch.tensor([[512, 512]]),
                'outputs': inter}, out_dir / 'full_io.pt')


def make_swin(official: Path, out_dir: Path) -> None:
    """A reduced official SwinTransformer (window 3, odd sizes, padded batch), random weights and bias tables."""
    patch_official(official, None, 256)
    from models.dino.swin_transformer import SwinTransformer
    from util.misc import NestedTensor
    cfg = dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=3, out_indices=(1, 2, 3))
    torch.manual_seed(0)
    swin = SwinTransformer(pretrain_img_size=224, **cfg)
    swin.eval()  # the official train() returns None, so no chaining
    with torch.no_grad():
        for name, p in swin.named_parameters():
            if 'relative_position_bias_table' in name or name.endswith('bias'): p.normal_(0, 0.5)
    batch, mask = pad_batch([load_photo('rocket.jpg', 90, 120), load_photo('camera.jpg', 70, 100)])
    with torch.no_grad():
        outs = swin(NestedTensor(batch, mask))
    torch.save({'official_commit': OFFICIAL_COMMIT, 'config': cfg, 'state_dict': swin.state_dict(), 'images': batch,
                'mask': mask, 'features': [outs[i].tensors for i in range(len(outs))],
                'masks': [outs[i].mask for i in range(len(outs))]}, out_dir / 'swin_io.pt')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('official', type=Path, help='checkout of IDEA-Research/DINO at ' + OFFICIAL_COMMIT)
    parser.add_argument('out', type=Path, help='output folder (tests/data/dino for the reduced fixture)')
    parser.add_argument('--full', action='store_true', help='the full dino_4scale_r50 on one ~800 px photo')
    parser.add_argument('--swin', action='store_true', help='a reduced official Swin backbone')
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    (make_full if a.full else make_swin if a.swin else make_reduced)(a.official.resolve(), a.out)
