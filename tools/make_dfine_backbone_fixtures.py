"""Make the fixtures of tests/test_dfine_backbone.py (HGNetv2 + HybridEncoder) from the official D-FINE code.

    python tools/make_dfine_backbone_fixtures.py OFFICIAL_DFINE_DIR OUT [--reference REFERENCE_DIR]

OFFICIAL_DFINE_DIR is a copy of Peterande/D-FINE at commit 4a1f73a8bcfac736a88abde9596d87f116d780a7, run
with a Python environment that can import it (torch + the repo's requirements); OUT is tests/data/dfine.
Files written (all with the `backbone_` prefix; the D-FINE model fixtures live beside them):

* backbone_reference.json.gz: for each preset n/s/m/l/x, every `backbone.` and `encoder.` checkpoint
  tensor of the official model (name, shape, 'param' or 'buffer', in official order), the parameter counts
  (all, trainable), and the encoder's state dict after the official `model.deploy()`.
* backbone_equivalence.pt: random official weights in official names (He-normal convs, BatchNorm
  statistics calibrated on noise images; tensors of >= 2 dims stored as int8 codes + one fp32 scale to keep
  the file small, and the outputs were computed from exactly `q.float() * scale`), uint8 input images, and
  the official fp32 outputs (eval mode, one thread) of HGNetv2-B0 with D-FINE-N switches, of HGNetv2-B0
  with frozen norms (the L/X switches), of D-FINE-N's HybridEncoder (plain and after deploy()) and of a
  small 3-level HybridEncoder.

With --reference DIR (the project's reference folder with dfine_{n,s,m,l,x}.json) the recorded names,
shapes and counts are also checked against those files.
"""
import argparse, gzip, json, subprocess, sys
from pathlib import Path

import torch

OFFICIAL_COMMIT = '4a1f73a8bcfac736a88abde9596d87f116d780a7'
VARIANTS = ('n', 's', 'm', 'l', 'x')
SIZES = {'square': (128, 128), 'nonsquare': (96, 160), 'odd': (97, 130)}  # odd: backbone only (encoder: /32)
# configs/dfine/dfine_hgnetv2_n_coco.yml; eval_spatial_size unset, so the position embedding fits the input
ENC_N = dict(in_channels=[512, 1024], feat_strides=[16, 32], hidden_dim=128, use_encoder_idx=[1],
             dim_feedforward=512, expansion=0.34, depth_mult=0.5)
# a small 3-level encoder (S's expansion/depth, narrow)
ENC_3 = dict(in_channels=[256, 512, 1024], feat_strides=[8, 16, 32], hidden_dim=32, nhead=8,
             dim_feedforward=64, expansion=0.5, depth_mult=0.34)


def facts(official: Path, variant: str) -> dict:
    """Backbone/encoder state-dict entries and counts of one official preset (built as for the reference)."""
    from src.core import YAMLConfig
    torch.manual_seed(0)
    model = YAMLConfig(str(official / f'configs/dfine/dfine_hgnetv2_{variant}_coco.yml'),
                       HGNetv2={'pretrained': False}).model
    out = {}
    for part in ('backbone', 'encoder'):
        module = getattr(model, part)
        params = dict(module.named_parameters())
        out[part] = {'state_dict': [[f'{part}.{k}', list(v.shape), 'param' if k in params else 'buffer']
                                    for k, v in module.state_dict().items()],
                     'num_params': sum(p.numel() for p in params.values()),
                     'num_trainable': sum(p.numel() for p in params.values() if p.requires_grad)}
    model.deploy()
    deployed = model.encoder.state_dict()
    out['encoder']['deploy_state_dict'] = [[f'encoder.{k}', list(v.shape)] for k, v in deployed.items()]
    return out


def check_reference(found: dict, reference: Path) -> None:
    """Assert that the recorded facts equal the reference JSON of each preset."""
    for v in VARIANTS:
        ref = json.loads((reference / f'dfine_{v}.json').read_text())
        for part in ('backbone', 'encoder'):
            names = [[k, s] for k, s, _ in ref['state_dict'] if k.startswith(part + '.')]
            assert names == [[k, s] for k, s, _ in found[v][part]['state_dict']], (v, part)
            buffers = {k for k in ref['state_dict_buffers'] if k.startswith(part + '.')}
            ours = {k for k, _, kind in found[v][part]['state_dict'] if kind == 'buffer'}
            assert buffers == ours, (v, part)
            assert ref['num_params_by_top_module'][part] == found[v][part]['num_params'], (v, part)
        removed = set(ref['deploy_state_dict_changes']['removed'])
        added = [[k, s] for k, s in ref['deploy_state_dict_changes']['added'] if k.startswith('encoder.')]
        kept = [[k, s] for k, s, _ in ref['state_dict'] if k.startswith('encoder.') and k not in removed]
        deploy = found[v]['encoder']['deploy_state_dict']
        assert sorted(map(tuple, kept + added)) == sorted(map(tuple, deploy)), v
    print('facts equal the reference JSON for', VARIANTS)


def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """He-normal conv/linear weights and perturbed norm/LAB/bias values (defaults 0/1 would hide bugs)."""
    with torch.no_grad():
        for name, t in module.named_parameters():
            if t.ndim >= 2:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=generator) * (2 / fan_in) ** 0.5)
            else:
                t.add_(0.1 * torch.randn(t.shape, generator=generator))


def calibrate(module: torch.nn.Module, batches: list) -> None:
    """Set BatchNorm statistics to the true ones of `batches`, so activations keep a unit scale with depth."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    module.train()
    with torch.no_grad():
        for batch in batches:
            module(batch)
    for bn in bns:
        bn.momentum = 0.1
    module.eval()


def quantize(module: torch.nn.Module) -> None:
    """Replace every float tensor of >= 2 dims by its int8 × per-tensor-scale value (see `pack`), in place."""
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point() and t.ndim >= 2:
                q, scale = pack_tensor(t)
                t.copy_(q.float() * scale)


def pack_tensor(t: torch.Tensor) -> tuple:
    """int8 codes and fp32 scale of a tensor; the weight used everywhere is `q.float() * scale`."""
    scale = (t.abs().max() / 127).clamp_min(1e-12).float()
    return torch.round(t / scale).to(torch.int8), scale


def pack(module: torch.nn.Module, prefix: str) -> dict:
    """State dict, official names: >= 2-dim floats as {'q': int8, 'scale': fp32} (4× smaller), rest as is."""
    out = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point() and v.ndim >= 2:
            q, scale = pack_tensor(v)
            out[prefix + k] = {'q': q, 'scale': scale}
        else:
            out[prefix + k] = v.clone()
    return out


def run(module, inputs):
    """Eval-mode forward without gradients."""
    with torch.no_grad():
        return [o.clone() for o in module.eval()(inputs)]


def equivalence() -> dict:
    """Random official weights, inputs and official outputs."""
    from src.nn.backbone.hgnetv2 import HGNetv2
    from src.zoo.dfine.hybrid_encoder import HybridEncoder
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    backbone = HGNetv2('B0', use_lab=True, return_idx=[2, 3], freeze_at=-1, freeze_norm=False,
                       pretrained=False)
    encoder, encoder3 = HybridEncoder(**ENC_N), HybridEncoder(**ENC_3)
    for m in (backbone, encoder, encoder3):
        randomize(m, g)
    noise = [torch.rand(4, 3, 128, 128, generator=g) for _ in range(2)]
    calibrate(backbone, noise)
    frozen = HGNetv2('B0', use_lab=False, return_idx=[1, 2, 3], freeze_at=0, freeze_norm=False,
                     pretrained=False).eval()
    frozen.load_state_dict({k: v for k, v in backbone.state_dict().items() if '.lab.' not in k})
    with torch.no_grad():
        calibrate(encoder, [backbone(x) for x in noise])
        calibrate(encoder3, [frozen(x) for x in noise])
    for m in (backbone, encoder, encoder3):
        quantize(m)
    weights = pack(backbone, 'backbone.') | pack(encoder, 'encoder.')  # official names, as in a checkpoint
    weights_encoder3 = pack(encoder3, '')
    frozen = HGNetv2('B0', use_lab=False, return_idx=[1, 2, 3], freeze_at=0, freeze_norm=True,
                     pretrained=False)
    frozen.load_state_dict({k: v for k, v in backbone.state_dict().items() if '.lab.' not in k})
    inputs = {k: torch.randint(0, 256, (1, 3, *hw), generator=g, dtype=torch.uint8)
              for k, hw in SIZES.items()}
    outputs = {k: {} for k in ('backbone_n', 'encoder_n', 'encoder_n_deploy', 'backbone_frozen', 'encoder3')}
    for key, image in inputs.items():
        x = image.float() / 255
        outputs['backbone_n'][key] = run(backbone, x)
        if key != 'odd':
            outputs['encoder_n'][key] = run(encoder, outputs['backbone_n'][key])
    outputs['backbone_frozen']['nonsquare'] = run(frozen, inputs['nonsquare'].float() / 255)
    outputs['encoder3']['nonsquare'] = run(encoder3, outputs['backbone_frozen']['nonsquare'])
    for m in list(encoder.modules()):  # the official DFINE.deploy(), applied to the encoder alone
        if hasattr(m, 'convert_to_deploy'):
            m.convert_to_deploy()
    for key in ('square', 'nonsquare'):
        outputs['encoder_n_deploy'][key] = run(encoder, outputs['backbone_n'][key])
    return {'official_commit': OFFICIAL_COMMIT, 'encoder_n_kwargs': ENC_N, 'encoder3_kwargs': ENC_3,
            'weights': weights, 'weights_encoder3': weights_encoder3,
            'inputs': inputs, 'outputs': outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('official', type=Path)
    parser.add_argument('out', type=Path)
    parser.add_argument('--reference', type=Path)
    parser.add_argument('--facts', choices=VARIANTS, help='internal: print the facts of one preset as JSON')
    args = parser.parse_args()
    sys.path.insert(0, str(args.official.resolve()))
    torch.set_num_threads(1)
    if args.facts:
        print(json.dumps(facts(args.official.resolve(), args.facts)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    # one process per preset: the official YAMLConfig keeps state between builds (a second preset inherits
    # switches such as use_lab from the first)
    found = {v: json.loads(subprocess.run([sys.executable, __file__, str(args.official), '-', '--facts', v],
                                          check=True, capture_output=True, text=True).stdout.splitlines()[-1])
             for v in VARIANTS}
    if args.reference:
        check_reference(found, args.reference)
    (args.out / 'backbone_reference.json.gz').write_bytes(
        gzip.compress(json.dumps({'official_commit': OFFICIAL_COMMIT, **found}).encode(), mtime=0))
    torch.save(equivalence(), args.out / 'backbone_equivalence.pt')


if __name__ == '__main__':
    main()
