"""Compare detlearn's dino_4scale_r50 with the official model on one ~800 px photo, stage by stage (by hand, not CI).

    python tools/make_dino_fixtures.py OFFICIAL_DINO_DIR FULL_DIR --full   # official run (random weights)
    python tools/dino_full_check.py FULL_DIR                              # detlearn on the same weights and input
Prints the max abs difference of each stage and whether the top-900 selection is identical.
"""
import sys
import time
from pathlib import Path

import torch

from detlearn.models.dino import DINO, dino_4scale_r50, dino_official_to_detlearn, read_official_dino
from detlearn.models.dino.transformer import run_transformer


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def main(folder: Path) -> None:
    io = torch.load(folder / 'full_io.pt', weights_only=True)
    model = DINO(dino_4scale_r50(91)).eval()
    model.load_state_dict(dino_official_to_detlearn(read_official_dino(folder / 'full_checkpoint.pth')))
    ref, images, mask = io['outputs'], io['images'], io['mask']
    print('input', tuple(images.shape), 'torch threads', torch.get_num_threads())
    t0 = time.perf_counter()
    srcs, masks, pos = model.multiscale_features(images, mask)
    hs, refs, sel, memory = run_transformer(model.transformer, srcs, masks, pos, model.bbox_embed)
    print(f'forward {time.perf_counter() - t0:.1f} s')
    for l, f in enumerate(model.backbone[0](images, mask)):
        print(f'backbone {l}: {max_diff(f[0], ref["backbone"][l]):.2e} (max |x| {float(ref["backbone"][l].abs().max()):.1f})')
    print(f'encoder memory: {max_diff(memory, ref["memory"]):.2e}')
    same = torch.equal(sel.topk_index, ref['topk_index'])
    print('top-900 identical (order too):', same,
          '| same set:', torch.equal(sel.topk_index.sort(1)[0], ref['topk_index'].sort(1)[0]))
    out = model(images, mask)
    for key in ('pred_logits', 'pred_boxes'):
        print(f'{key}: {max_diff(out[key], ref[key]):.2e}')
        print(f'interm {key}: {max_diff(out["interm_outputs"][key], ref["interm_outputs"][key]):.2e}')


if __name__ == '__main__':
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
