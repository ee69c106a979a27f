"""Summarise deviation logs written by detlearn.testing (DETLEARN_DEVIATION_LOG=file) into one table.

    DETLEARN_DEVIATION_LOG=/tmp/dev/avx512.jsonl pytest tests/test_dino_official.py ...
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 DETLEARN_DEVIATION_LOG=/tmp/dev/avx2.jsonl pytest ...
    python tools/deviation_report.py /tmp/dev/*.jsonl

Prints, per check (names with a trailing number folded: 'aux 3 pred_boxes' -> 'aux # pred_boxes'), the largest
deviation seen on each CPU path / thread count, the allowed rel, and the margin rel / worst.
"""
import json
import re
import sys
from collections import defaultdict


def main(paths):
    worst = defaultdict(dict)   # check -> path label -> max deviation
    rel = {}
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            what = re.sub(r'\b\d+\b', '#', r['what'])
            label = f"{r['cpu']}/{r.get('onednn_isa', 'native')}/t{r['threads']}"
            worst[what][label] = max(worst[what].get(label, 0.0), r['deviation'])
            rel[what] = r['rel']
    labels = sorted({l for d in worst.values() for l in d})
    print('| check | ' + ' | '.join(labels) + ' | allowed rel | margin |')
    print('|---' * (len(labels) + 3) + '|')
    for what in sorted(worst):
        top = max(worst[what].values())
        margin = f'{rel[what] / top:.0f}x' if top else 'exact'
        cells = ' | '.join(f'{worst[what].get(l, float("nan")):.1e}' for l in labels)
        print(f'| {what} | {cells} | {rel[what]:.0e} | {margin} |')


if __name__ == '__main__':
    main(sys.argv[1:])
