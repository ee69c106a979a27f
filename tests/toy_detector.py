"""A 40-line detector and dataset that keep detlearn's protocol, for trainer tests (no YOLOX needed).

The detector predicts one box per image (sigmoid of a linear head on pooled conv features, normalised
xyxy); each image holds one bright square. It has no BatchNorm, so a DDP run and a single-process run
on the same global batch compute the same gradients (up to float summation order).
"""
import torch
from torch import nn


class ToyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(8 * 16, 4)

    def forward(self, images, masks=None, targets=None):
        return {'boxes': self.head(self.backbone(images).flatten(1)).sigmoid(), 'hw': images.shape[-2:]}

    def loss(self, outputs, targets):
        h, w = outputs['hw']
        gt = torch.stack([t['boxes'][0] for t in targets]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        l1 = (outputs['boxes'] - gt).abs().mean()
        return {'loss': l1, 'loss_l1': l1}

    def postprocess(self, outputs, sizes):
        out = []
        for b, s in zip(outputs['boxes'], sizes):
            scale = s.flip(0).repeat(2).float()  # (w, h, w, h) of the original image
            out.append({'boxes': (b * scale)[None], 'scores': torch.ones(1), 'labels': torch.zeros(1, dtype=torch.long)})
        return out


class ToyBoxes(torch.utils.data.Dataset):
    class_names, cat_ids = ['box'], [7]

    def __init__(self, n=16, size=32, noise=True):
        g = torch.Generator().manual_seed(0)
        self.items, self.noise, self.size = [], noise, size
        for i in range(n):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            im = torch.zeros(3, size, size); im[:, y0:y0 + size // 2, x0:x0 + size // 2] = 1
            box = torch.tensor([[x0, y0, x0 + size // 2, y0 + size // 2]], dtype=torch.float32)
            self.items.append((im, {'boxes': box, 'labels': torch.zeros(1, dtype=torch.long), 'image_id': i + 1,
                                    'orig_size': torch.tensor([size, size]), 'size': torch.tensor([size, size])}))

    def __len__(self): return len(self.items)

    def __getitem__(self, i):
        im, t = self.items[i]
        return (im + 0.05 * torch.rand_like(im) if self.noise else im), t  # random "augmentation"

    @property
    def coco(self):
        """The ground truth as a pycocotools COCO object (xywh boxes, category id 7)."""
        from pycocotools.coco import COCO
        anns = [{'id': t['image_id'], 'image_id': t['image_id'], 'category_id': 7, 'iscrowd': 0,
                 'bbox': [*t['boxes'][0, :2].tolist(), *(t['boxes'][0, 2:] - t['boxes'][0, :2]).tolist()],
                 'area': float((self.size // 2) ** 2)} for _, t in self.items]
        coco = COCO()
        coco.dataset = {'images': [{'id': t['image_id'], 'width': self.size, 'height': self.size} for _, t in self.items],
                        'annotations': anns, 'categories': [{'id': 7, 'name': 'box'}]}
        coco.createIndex()
        return coco


def toy_collate(batch):
    return torch.stack([b[0] for b in batch]), None, [b[1] for b in batch]
