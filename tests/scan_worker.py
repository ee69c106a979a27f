"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: `detlearn train ARGS...` with the dataset
doctor's `check_dataset` counted, then OUT/scans{rank}.json: the exit status, the files checked and stderr."""
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import detlearn.data.coco as coco
from detlearn.cli import main

scans = []
_check_dataset = coco.check_dataset


def counted_check_dataset(data, images_dir, **kwargs):
    scans.append(kwargs.get('ann_name'))
    return _check_dataset(data, images_dir, **kwargs)


if __name__ == '__main__':
    out = Path(sys.argv[1])
    coco.check_dataset = counted_check_dataset  # what CocoDetection calls
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(sys.argv[2:])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get('RANK', 0))
    (out / f'scans{rank}.json').write_text(json.dumps({'code': code, 'scans': scans, 'stderr': err.getvalue()}))
