"""CPU bf16 autocast against the official fp32 outputs (the D-FINE and DINO fixtures of test_dfine_official and
test_dino_official). bf16 rounds every product to 8 mantissa bits, so outputs move: how far is measured here on
the best 100 scores of each image, sorted (bf16 may reorder near-tied queries, so rows are not compared one by
one). Measured on AMD EPYC Zen 3 (AVX2, bf16 emulated) 2026-12-07: D-FINE 0.014, DINO 0.068 of the largest
score; fp32 2e-6 and 2e-7. On AMD EPYC Zen 4 (native AVX512-BF16) 2026-12-07: autocast D-FINE 0.012, DINO
0.149; only the convolutions in bf16 (`fastest_cpu_model(..., bf16=True)`) D-FINE 0.007, DINO 0.052. The bound is
TOLERANCES['bf16_scores'] (0.3, twice the largest). These changes are why inference and
`detlearn eval` stay float32 by default; `detlearn bench bf16` measures the AP change on a trained model."""
import pytest
import torch

import test_dfine_official as dfine_fx
import test_dino_official as dino_fx
from detlearn.bench.onnx import fastest_cpu_model
from detlearn.testing import TOLERANCES, scaled_deviation

pytestmark = pytest.mark.cpu_path  # run again on the other CPU path by tools/test.sh


def best_scores(logits: torch.Tensor, k: int = 100) -> torch.Tensor:
    return logits.float().sigmoid().flatten(1).topk(k).values  # (B, k), sorted


def deviations(model, inputs: tuple, official_logits: torch.Tensor) -> dict:
    ref = best_scores(official_logits)
    with torch.no_grad():
        fp32 = model(*inputs)['pred_logits']
        with torch.autocast('cpu', torch.bfloat16):
            bf16 = model(*inputs)['pred_logits']
        convs = fastest_cpu_model(model, bf16=True)(*inputs)['pred_logits']  # only the convolutions in bf16
    logits = {'fp32': fp32, 'bf16': bf16, 'bf16 convs': convs}
    return {name: scaled_deviation(best_scores(value), ref)[0] for name, value in logits.items()}


def check(dev: dict):
    assert dev['fp32'] <= TOLERANCES['fp32_network'], dev
    assert 0 < dev['bf16'] <= TOLERANCES['bf16_scores'], dev  # 0: autocast did nothing (bf16 not applied)
    assert 0 < dev['bf16 convs'] <= TOLERANCES['bf16_scores'], dev


def test_dfine_bf16_scores_near_official():
    fx = torch.load(dfine_fx.DATA / 'model_equivalence.pt', weights_only=False)
    model = dfine_fx.DFINE(dfine_fx.small_config(fx)).eval()
    model.load_state_dict(dfine_fx.dfine_official_to_detlearn(
        dfine_fx.read_official_dfine(dfine_fx.DATA / 'model_checkpoint.pth')))
    check(deviations(model, (dfine_fx.load_images([0, 1]),), fx['eval_640']['pred_logits']))


def test_dino_bf16_scores_near_official():
    model, io = dino_fx.fixture.__wrapped__()
    check(deviations(model, (io['images'], io['mask']), io['outputs']['pred_logits']))
