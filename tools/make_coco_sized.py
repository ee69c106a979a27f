"""Write synthetic COCO-sized data for `detlearn bench annotations` and `detlearn bench eval`.

    python tools/make_coco_sized.py /tmp/coco_sized                        # train2017 and val2017 sizes
    python tools/make_coco_sized.py /tmp/coco_small --train 2000 --val 100  # the same statistics, smaller

writes DIR/annotations/instances_{train,val}2017.json (COCO's 80 category ids and names, COCO-like image sizes,
boxes per image, box sizes, crowd share and polygons), DIR/train2017/ and DIR/val2017/ (each image a symbolic link
to one small JPEG of its recorded size, in DIR/sizes/) and DIR/results_val2017.json (100 detections per validation
image). The same seed writes the same files (detlearn.bench.coco.write_coco_sized, chapter 53e).
"""
import argparse
import time

from detlearn.bench.coco import COCO_TRAIN2017, COCO_VAL2017, write_coco_sized


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out', help='the folder to write (use /tmp, not the repository: the full size is ~0.6 GB)')
    p.add_argument('--train', type=int, default=COCO_TRAIN2017[0], help='training images (boxes scale with it)')
    p.add_argument('--val', type=int, default=COCO_VAL2017[0], help='validation images (boxes scale with it)')
    p.add_argument('--per-image', type=int, default=100, help='detections per validation image in the results')
    p.add_argument('--seed', type=int, default=0, help='random seed')
    args = p.parse_args()
    boxes = lambda n, full: round(n * full[1] / full[0])  # COCO's boxes per image
    start = time.perf_counter()
    paths = write_coco_sized(args.out, (args.train, boxes(args.train, COCO_TRAIN2017)),
                             (args.val, boxes(args.val, COCO_VAL2017)), args.per_image, args.seed)
    for name, path in paths.items():
        size = f"{path.stat().st_size / 2**20:.1f} MB" if path.is_file() else 'folder'
        print(f"{name:16} {path}  ({size})")
    print(f"written in {time.perf_counter() - start:.0f} s")


if __name__ == '__main__':
    main()
