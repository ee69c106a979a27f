"""A tiny DETR-like detector that keeps detlearn's protocol, for the ONNX export tests (no DINO/D-FINE needed).

Like DINO and D-FINE it returns `pred_logits` (B, Q, K) and `pred_boxes` (B, Q, 4) normalised cxcywh, and
its queries read a two-level feature pyramid through multi-scale deformable attention (`ms_deform_attn`),
so exporting it exercises the PyTorch reference path of that op. `postprocess` is written as a plain
per-image loop over every (query, class) pair: an independent reference for the exporter's top-k.
"""
import torch
from torch import nn

from detlearn.ops.msda import compute_level_start_index, ms_deform_attn

HEADS, CHANNELS, LEVELS, POINTS = 2, 4, 2, 2


class FakeDETR(nn.Module):
    def __init__(self, num_classes: int = 3, num_queries: int = 6, num_top_queries: int = 300):
        super().__init__()
        dim = HEADS * CHANNELS
        self.num_top_queries = num_top_queries
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.down = nn.Conv2d(dim, dim, 2, stride=2)
        self.queries = nn.Parameter(torch.randn(num_queries, dim))
        self.offsets = nn.Linear(dim, HEADS * LEVELS * POINTS * 2)
        self.weights = nn.Linear(dim, HEADS * LEVELS * POINTS)
        self.class_head = nn.Linear(dim, num_classes)
        self.box_head = nn.Linear(dim, 4)

    def forward(self, images, masks=None, targets=None):
        f1 = self.stem(images)
        f2 = self.down(f1)
        shapes = [tuple(f.shape[-2:]) for f in (f1, f2)]
        value = torch.cat([f.flatten(2) for f in (f1, f2)], 2).transpose(1, 2)  # (B, S, HEADS*CHANNELS)
        B, Q = images.shape[0], self.queries.shape[0]
        value = value.reshape(B, -1, HEADS, CHANNELS)
        q = self.queries[None].expand(B, -1, -1)  # (B, Q, D)
        locs = (0.5 + 0.3 * torch.tanh(self.offsets(q))).view(B, Q, HEADS, LEVELS, POINTS, 2)
        attn = self.weights(q).view(B, Q, HEADS, LEVELS * POINTS).softmax(-1).view(B, Q, HEADS, LEVELS, POINTS)
        spatial = torch.tensor(shapes, dtype=torch.int64)
        x = ms_deform_attn(value, spatial, compute_level_start_index(shapes), locs, attn) + q  # (B, Q, D)
        return {'pred_logits': self.class_head(x), 'pred_boxes': self.box_head(x).sigmoid()}

    def loss(self, outputs, targets):
        total = outputs['pred_logits'].sigmoid().mean() + outputs['pred_boxes'].mean()
        return {'loss': total, 'loss_dummy': total}

    def postprocess(self, outputs, sizes):
        """Per image: score every (query, class) pair, keep the best `num_top_queries`; boxes in original pixels."""
        results = []
        for logits, boxes, (h, w) in zip(outputs['pred_logits'], outputs['pred_boxes'], sizes.tolist()):
            probs = logits.sigmoid()
            pairs = sorted(((float(probs[q, k]), q, k) for q in range(probs.shape[0]) for k in range(probs.shape[1])),
                           key=lambda t: -t[0])[:self.num_top_queries]
            cx, cy, bw, bh = boxes[[q for _, q, _ in pairs]].unbind(-1)
            xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
            results.append({'scores': torch.tensor([s for s, _, _ in pairs]), 'boxes': xyxy,
                            'labels': torch.tensor([k for _, _, k in pairs], dtype=torch.int64)})
        return results
