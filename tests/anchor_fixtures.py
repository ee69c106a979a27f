"""Helpers shared by the SimOTA and YOLOX-loss tests: a logit and YOLOX's anchor grid written out independently."""
import math

import torch


def logit(p): return math.log(p / (1 - p))


def make_anchors(size, strides=(8, 16, 32)):
    """(grids (N, 2) col,row, strides (N,)) of a square input, levels flattened row-major as YOLOX does."""
    grids, strs = [], []
    for s in strides:
        rows, cols = torch.meshgrid(torch.arange(size // s), torch.arange(size // s), indexing='ij')
        grids.append(torch.stack([cols, rows], -1).reshape(-1, 2).float())
        strs.append(torch.full((len(grids[-1]),), float(s)))
    return torch.cat(grids), torch.cat(strs)
