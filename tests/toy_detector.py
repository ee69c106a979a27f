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


# --- A toy *family*: everything detlearn's seam asks of a family, for tests/test_family_seam.py -------------
from dataclasses import dataclass, field  # noqa: E402

from detlearn.data.transforms import Compose, Resize, ToTensor  # noqa: E402
from detlearn.models.family import Family, OfficialFormat, Recipe  # noqa: E402
from detlearn.train_utils import LoopConfig, OptimConfig, ScheduleConfig, TrainConfig, load_checkpoint  # noqa: E402


@dataclass
class ToyConfig:
    num_classes: int = 1
    test_size: tuple = (32, 32)


class ToyFamilyDetector(nn.Module):
    """One box per image from pooled features, plus class logits: the detector protocol for any COCO dataset."""
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.box = nn.Linear(8 * 16, 4)
        self.cls = nn.Linear(8 * 16, cfg.num_classes)
        self.epochs_seen = []

    def forward(self, images, masks=None, targets=None):
        f = self.backbone(images).flatten(1)
        return {'boxes': self.box(f).sigmoid(), 'logits': self.cls(f), 'hw': images.shape[-2:]}

    def loss(self, outputs, targets):
        h, w = outputs['hw']
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        has = [i for i, t in enumerate(targets) if len(t['boxes'])]
        if not has:
            zero = outputs['boxes'].sum() * 0
            return {'loss': zero, 'loss_l1': zero, 'loss_cls': zero}
        gt = torch.stack([targets[i]['boxes'][0] for i in has]) / scale
        l1 = (outputs['boxes'][has] - gt).abs().mean()
        labels = torch.stack([targets[i]['labels'][0] for i in has])
        ce = nn.functional.cross_entropy(outputs['logits'][has], labels)
        return {'loss': l1 + ce, 'loss_l1': l1, 'loss_cls': ce}

    def postprocess(self, outputs, sizes):
        out = []
        for b, logit, s in zip(outputs['boxes'], outputs['logits'], sizes):
            prob, label = logit.softmax(-1).max(-1)
            out.append({'boxes': (b * s.flip(0).repeat(2).float())[None], 'scores': prob[None], 'labels': label[None]})
        return out


class Transformed(torch.utils.data.Dataset):
    """A raw CocoDetection with per-sample transforms (the toy family's training set)."""
    def __init__(self, raw, transforms):
        self.raw, self.transforms = raw, transforms
        self.class_names, self.cat_ids, self.coco = raw.class_names, raw.cat_ids, raw.coco

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, i):
        return self.transforms(*self.raw[i])


def toy_eval_transforms(cfg, size=None):
    size = size or cfg.test_size
    return Compose([Resize((size, size) if isinstance(size, int) else tuple(size)), ToTensor()])


def toy_start_epoch(model, dataset, epoch, cfg):
    model.epochs_seen.append(epoch)


def toy_recipe(preset: str = 'toy_tiny') -> Recipe:
    loop = LoopConfig(epochs=2, batch_size=16, num_workers=0, eval_every=1, ema_warmup=5, no_aug_epochs=0, log_every=5)
    train = TrainConfig(optim=OptimConfig(name='adamw', lr=0.01, lr_per_image=False),
                        schedule=ScheduleConfig(warmup_epochs=0, final_flat_epochs=0), loop=loop)
    return Recipe(preset, 32, train)


def read_toy_official(path):
    return load_checkpoint(path)['toy_weights']


TOY_OFFICIAL = OfficialFormat(
    read=read_toy_official, to_detlearn=lambda sd: {k.removeprefix('net.'): v for k, v in sd.items()},
    class_specific=('cls.',), num_classes=lambda sd: int(sd['cls.weight'].shape[0]),
    label_space=lambda k: ([f'toy{i}' for i in range(k)], list(range(1, k + 1))))

TOY_FAMILY = Family(
    name='toy', model_class=ToyFamilyDetector, presets={'toy_tiny': lambda k: ToyConfig(num_classes=k)},
    recipes={'toy_tiny_2e_shapes': toy_recipe}, default_recipe=toy_recipe,
    train_dataset=lambda raw, recipe: Transformed(raw, toy_eval_transforms(None, recipe.img_size)),
    eval_transforms=toy_eval_transforms, start_epoch=toy_start_epoch, official=TOY_OFFICIAL)
