"""Write tests/data/dino/official_shapes.json: every official state-dict name and shape, and the parameter counts,
of the DINO presets, taken from the project's reference files (reference/dino_*.json, which were measured by
building the official IDEA-Research/DINO model at commit faa8520 on CPU).

    python tools/dino_reference_shapes.py REFERENCE_DIR tests/data/dino/official_shapes.json
"""
import json
import sys
from pathlib import Path

PRESETS = ('dino_4scale_r50', 'dino_5scale_r50', 'dino_4scale_swinl')

if __name__ == '__main__':
    ref_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    data = {}
    for name in PRESETS:
        ref = json.loads((ref_dir / f'{name}.json').read_text())
        data[name] = {'official_commit': ref['official_commit'], 'num_params': ref['num_params'],
                      'num_params_trainable': ref['num_params_trainable'],
                      'aliases': [a for a, _ in ref['state_dict_aliases']],
                      'state_dict': {k: shape for k, shape, _ in ref['state_dict']}}
    out.write_text(json.dumps(data, separators=(',', ':')))
