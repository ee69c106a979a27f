"""`detlearn` in a subprocess on the shapes sample: train, resume, eval --json, predict (original category ids),
data check on a broken dataset, and one-line errors. Tiny sizes: the whole file takes well under 2 minutes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / 'data_samples' / 'shapes'


def detlearn(*args, cwd, ok=True):
    env = os.environ | {'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'detlearn.cli', *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    if ok: assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """One tiny training run (1 epoch of 2 planned, 64 px) shared by the tests below."""
    d = tmp_path_factory.mktemp('cli')
    r = detlearn('train', '--recipe', 'shapes_demo', '--train-ann', SHAPES / 'train.json', '--train-images', SHAPES / 'train',
                 '--val-ann', SHAPES / 'val.json', '--val-images', SHAPES / 'val', '--epochs', 2, '--img-size', 64,
                 '--batch-size', 16, '--workers', 0, '--work-dir', 'run', '--no-progress', 'loop.eval_every=1', cwd=d)
    return d, r


def test_train_writes_checkpoints_and_table(run):
    d, r = run
    assert {'last.pth', 'best.pth', 'metrics.csv'} <= {p.name for p in (d / 'run').iterdir()}
    assert 'circle' in r.stdout and 'AP50' in r.stdout  # the per-class table
    ck = torch.load(d / 'run' / 'last.pth', weights_only=True)
    assert ck['epoch'] == 2 and ck['cat_ids'] == [1, 3, 5, 7] and ck['meta']['img_size'] == 64


def test_resume_continues(run):
    d, _ = run
    shutil.copytree(d / 'run', d / 'run2')
    r = detlearn('train', '--recipe', 'shapes_demo', '--train-ann', SHAPES / 'train.json', '--train-images', SHAPES / 'train',
                 '--epochs', 3, '--img-size', 64, '--batch-size', 16, '--workers', 0, '--work-dir', 'run2',
                 '--no-progress', '-r', 'run2/last.pth', cwd=d)
    ck = torch.load(d / 'run2' / 'last.pth', weights_only=True)
    assert ck['epoch'] == 3 and len(ck['history']) == 3 and ck['step'] == 3 * 15  # 240 images / 16


def test_eval_json(run):
    d, _ = run
    detlearn('eval', '--checkpoint', 'run/last.pth', '--ann', SHAPES / 'val.json', '--images', SHAPES / 'val',
             '--json', 'eval.json', cwd=d)
    stats = json.loads((d / 'eval.json').read_text())
    assert {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100'} <= set(stats)
    assert [row['category_id'] for row in stats['per_class']] == [1, 3, 5, 7]


def test_predict_uses_original_category_ids(run):
    """Force the model to see 'triangle' (label 2, COCO id 5) everywhere: predictions must say 5."""
    d, _ = run
    ck = torch.load(d / 'run' / 'last.pth', weights_only=True)
    w = ck['ema']['module']
    for level in range(3):  # zero weights: the logits are exactly the biases
        w[f'head.obj_preds.{level}.weight'].zero_(); w[f'head.cls_preds.{level}.weight'].zero_()
        w[f'head.obj_preds.{level}.bias'].fill_(5.0)
        w[f'head.cls_preds.{level}.bias'].copy_(torch.tensor([-5.0, -5.0, 5.0, -5.0]))
    torch.save(ck, d / 'forced.pth')
    images = d / 'imgs'; images.mkdir()
    for name in ('000001.jpg', '000002.jpg'): shutil.copy(SHAPES / 'val' / name, images / name)
    detlearn('predict', '--checkpoint', 'forced.pth', images, '--out', 'pred', cwd=d)
    results = json.loads((d / 'pred' / 'predictions.json').read_text())
    assert results and {r['category_id'] for r in results} == {5}
    assert {r['image_id'] for r in results} == {1, 2} and {r['file_name'] for r in results} == {'000001.jpg', '000002.jpg'}
    assert (d / 'pred' / '000001.png').is_file() and (d / 'pred' / '000002.png').is_file()


def test_data_check_broken_dataset(tmp_path):
    data = json.loads((SHAPES / 'val.json').read_text())
    data['annotations'][0]['bbox'] = [10, 10, -5, 3]           # negative width
    data['annotations'][1]['category_id'] = 99                  # unknown category
    (tmp_path / 'bad.json').write_text(json.dumps(data))
    r = detlearn('data', 'check', tmp_path / 'bad.json', '--images', SHAPES / 'val', cwd=tmp_path, ok=False)
    assert r.returncode == 3 and 'Traceback' not in r.stdout + r.stderr
    assert 'error' in (r.stdout + r.stderr).lower()


def test_user_mistakes_are_one_line(tmp_path):
    r = detlearn('train', '--model', 'yolox_nano', '--train-ann', tmp_path / 'missing.json', '--train-images', tmp_path,
                 cwd=tmp_path, ok=False)
    assert r.returncode == 3 and 'Traceback' not in r.stderr  # the data
    assert r.stderr.strip().count('\n') == 0 and 'missing.json does not exist' in r.stderr
    r = detlearn('eval', '--checkpoint', tmp_path / 'nope.pth', '--ann', SHAPES / 'val.json', '--images', SHAPES / 'val',
                 cwd=tmp_path, ok=False)
    assert r.returncode == 4 and 'does not exist' in r.stderr and 'Traceback' not in r.stderr  # a model file
    r = detlearn('train', '--model', 'yolox_nano', '--train-ann', SHAPES / 'val.json', '--train-images', SHAPES / 'val',
                 '--img-size', 64, 'loop.epoch=1', cwd=tmp_path, ok=False)
    assert r.returncode == 2 and "unknown setting 'loop.epoch'" in r.stderr  # usage


@pytest.mark.parametrize('source', ['official', 'detlearn'])
def test_finetune_onto_other_classes(tmp_path, source):
    """Weights for 80 COCO classes onto the 4 shapes classes: only the class tensors start afresh, and they are named."""
    from detlearn.models import create
    torch.manual_seed(0)
    coco = create('yolox_nano', num_classes=80)
    state = coco.state_dict()
    if source == 'official':  # the official file layout (NOTES.md): weights under 'model', plus training state
        torch.save({'start_epoch': 300, 'model': dict(state), 'optimizer': {}, 'best_ap': 25.8}, tmp_path / 'w.pth')
    else:  # a detlearn checkpoint of another dataset
        torch.save({'model': state, 'class_names': [f'c{i}' for i in range(80)], 'cat_ids': list(range(1, 81))}, tmp_path / 'w.pth')
    r = detlearn('train', '--model', 'yolox_nano', '--train-ann', SHAPES / 'train.json', '--train-images', SHAPES / 'train',
                 '--epochs', 1, '--img-size', 64, '--batch-size', 16, '--workers', 0, '--work-dir', 'ft', '--no-progress',
                 '-t', 'w.pth', cwd=tmp_path)
    cls_names = sorted(k for k in state if 'cls_preds' in k)
    assert 're-initialised 6 tensors' in r.stdout and all(name in r.stdout for name in cls_names), r.stdout[-2000:]
    ck = torch.load(tmp_path / 'ft' / 'last.pth', weights_only=True)
    assert ck['cat_ids'] == [1, 3, 5, 7] and ck['class_names'][0] == 'circle'  # the new dataset's mapping travels
    assert ck['model']['head.cls_preds.0.weight'].shape[0] == 4
    # everything else began from the given weights: one short epoch moves a conv by a few % of its scale,
    # while a fresh initialisation would differ by about the scale itself
    key = 'backbone.backbone.dark3.1.conv1.conv.weight'
    assert (ck['model'][key] - state[key]).abs().mean() < 0.25 * state[key].abs().mean()


def test_training_refuses_a_broken_dataset_unless_told_to_drop(tmp_path):
    data = json.loads((SHAPES / 'train.json').read_text())
    bad_id = data['annotations'][0]['id']
    data['annotations'][0]['bbox'] = [10, 10, -5, 3]  # negative width
    (tmp_path / 'bad.json').write_text(json.dumps(data))
    args = ('train', '--model', 'yolox_nano', '--train-ann', tmp_path / 'bad.json', '--train-images', SHAPES / 'train',
            '--epochs', 1, '--img-size', 64, '--batch-size', 16, '--workers', 0, '--work-dir', 'run', '--no-progress')
    r = detlearn(*args, cwd=tmp_path, ok=False)
    assert r.returncode == 3 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert 'bad.json' in r.stderr and str(bad_id) in r.stderr  # the doctor's report names the file and the annotation
    r = detlearn(*args, '--drop-bad-annotations', cwd=tmp_path)
    assert 'dropped 1 annotations' in r.stderr and (tmp_path / 'run' / 'last.pth').exists()


def test_predict_skips_corrupt_images_and_says_so(run, tmp_path):
    d, _ = run
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for name in sorted(p.name for p in (SHAPES / 'val').iterdir())[:2]:
        shutil.copy(SHAPES / 'val' / name, folder / name)
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
    r = detlearn('predict', '--checkpoint', d / 'run' / 'last.pth', folder, '--out', tmp_path / 'out', cwd=d, ok=False)
    assert r.returncode == 3, r.stderr[-2000:]  # the data (the readable images are done)
    assert 'broken.jpg' in r.stderr and 'skipped' in r.stderr  # reported with its reason, listed at the end
    results = json.loads((tmp_path / 'out' / 'predictions.json').read_text())
    assert {x['file_name'] for x in results} <= {p.name for p in folder.iterdir()} - {'broken.jpg'}
    assert len(list((tmp_path / 'out').glob('*.png'))) == 2  # the readable images were all processed


def test_eval_and_predict_accept_official_weights(tmp_path):
    """`--model PRESET --weights official.pth` works for eval and predict, as it does for the pipeline."""
    from detlearn.models import create
    torch.manual_seed(0)
    torch.save({'start_epoch': 300, 'model': create('yolox_nano', num_classes=80).state_dict(), 'optimizer': {}},
               tmp_path / 'yolox_nano.pth')
    photos = ROOT / 'data_samples' / 'photos'
    r = detlearn('eval', '--model', 'yolox_nano', '--weights', 'yolox_nano.pth', '--ann', photos / 'annotations.json',
                 '--images', photos / 'images', '--img-size', 128, '--json', 'ap.json', cwd=tmp_path)
    assert 'person' in r.stdout and json.loads((tmp_path / 'ap.json').read_text())['AP'] >= 0
    r = detlearn('predict', '--model', 'yolox_nano', '--weights', 'yolox_nano.pth', photos / 'images',
                 '--out', 'pred', '--img-size', 128, cwd=tmp_path)
    assert (tmp_path / 'pred' / 'predictions.json').is_file()
    r = detlearn('predict', '--model', 'yolox_nano', photos / 'images', '--out', 'pred', cwd=tmp_path, ok=False)
    assert r.returncode == 2 and 'needs --weights' in r.stderr


def test_sizes_a_detr_cannot_take_are_refused_before_training(tmp_path):
    # D-FINE-N reads strides 16 and 32: 224 px gives 245 encoder tokens for its 300 queries; 256 is the smallest side
    common = ('train', '--model', 'dfine_n', '--train-ann', SHAPES / 'val.json', '--train-images', SHAPES / 'val',
              '--epochs', 1, '--work-dir', tmp_path / 'w')
    r = detlearn(*common, '--img-size', 224, cwd=tmp_path, ok=False)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and r.stderr.strip().count('\n') == 0
    assert 'training size (--img-size) 224 is too small' in r.stderr and 'use 256 or more' in r.stderr
    assert not (tmp_path / 'w' / 'last.pth').exists()  # refused before the first step
    r = detlearn(*common, '--img-size', 256, '--test-size', 192, cwd=tmp_path, ok=False)
    assert r.returncode == 2 and 'test size (--test-size) 192 is too small' in r.stderr


def test_export_without_onnx_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['onnx'] = sys.modules['onnxruntime'] = None; "  # as if not installed
            "from detlearn.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, '-c', code, 'export', '--model', 'yolox_nano', '--weights', 'w.pth',
                        '--out', 'x.onnx'], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 5 and r.stdout == '', r.stderr  # missing software
    assert r.stderr.splitlines() == ['detlearn: error: ONNX export needs onnx and onnxruntime: '
                                     'pip install "detlearn[export] @ git+https://github.com/detlearn/detlearn"']


def test_version_and_python_m_detlearn(tmp_path):
    import detlearn
    for cmd in (['-m', 'detlearn', '--version'], ['-m', 'detlearn.cli', '--version']):
        r = subprocess.run([sys.executable, *cmd], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout == f'detlearn {detlearn.__version__}\n', r.stderr
    r = subprocess.run([sys.executable, '-m', 'detlearn', 'train'], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith('detlearn: error:'), r.stderr


def test_package_front_door():
    import detlearn
    from importlib.metadata import version
    assert detlearn.__doc__ and detlearn.__doc__.startswith('What `import detlearn` gives you')
    assert sorted(detlearn.__all__) == ['build_trainer', 'create', 'pipeline']
    assert detlearn.__version__ == version('detlearn')


def test_second_train_into_a_run_is_refused(run):
    d, _ = run
    r = detlearn('train', '--recipe', 'shapes_demo', '--train-ann', SHAPES / 'train.json', '--train-images',
                 SHAPES / 'train', '--epochs', 1, '--img-size', 64, '--work-dir', 'run', cwd=d, ok=False)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        'detlearn: error: run already holds a training run: give another --work-dir, --exist-ok to overwrite it, '
        'or -r run/last.pth to resume it'], r.stderr


def _imported_after(args: list, tmp_path) -> list:
    """Which heavy modules `detlearn ARGS` (its help or version) imported."""
    code = ("import sys\nfrom detlearn.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'numpy', 'cv2', 'pycocotools') if m in sys.modules])")
    r = subprocess.run([sys.executable, '-c', code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return json.loads(r.stdout.splitlines()[-1].replace("'", '"'))


def test_help_answers_without_importing_torch(tmp_path):
    """`detlearn --help` (and a built-in command's help) parses without torch: it answers at once."""
    for args in (['--help'], ['--version'], ['train', '--help'], ['eval', '--help'], ['data', 'check', '--help']):
        assert _imported_after(args, tmp_path) == [], args
    assert 'torch' in _imported_after(['bench', '--help'], tmp_path)  # the check can fail: bench's chapter needs torch


def test_every_option_has_help_and_every_command_examples():
    import argparse
    import shlex
    from detlearn.cli import EXAMPLES, EXTERNAL_COMMANDS, build_parser, command_parsers
    from detlearn.models import list_models
    from detlearn.recipes import list_recipes
    recipes, models = set(list_recipes()), set(list_models())
    parser = build_parser()
    paths = {' '.join(path): p for path, p in command_parsers(parser)}
    for name, p in paths.items():
        if not name:
            continue
        assert EXAMPLES.get(name), f'detlearn {name} has no examples'
        assert p.format_help().rstrip().endswith(EXAMPLES[name][-1]), name  # the help ends with them
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert a.help, f'detlearn {name} {a.option_strings or a.dest} has no help'
            if a.option_strings and a.default not in (None, False):
                assert 'default' in p._get_formatter()._get_help_string(a), (name, a.option_strings)
    assert set(EXAMPLES) <= set(paths), set(EXAMPLES) - set(paths)
    for name, lines in EXAMPLES.items():
        for line in lines:
            words = shlex.split(line)
            assert words[0] == 'detlearn' and ' '.join(words[1:]).startswith(name), line
            args = parser.parse_args(words[1:])  # each example is a valid command line (argparse exits on a bad one)
            for option, known in (('recipe', recipes), ('model', models)):
                value = getattr(args, option, None)
                assert value is None or value in known, f'{line}: no {option} {value!r}'
    light = build_parser(load=[])  # what `detlearn --help` lists for commands it does not load
    for name, (*_, text) in EXTERNAL_COMMANDS.items():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        light_sub = next(a for a in light._actions if isinstance(a, argparse._SubParsersAction))
        full = next(c.help for c in sub._choices_actions if c.dest == name)
        assert full == text == next(c.help for c in light_sub._choices_actions if c.dest == name), name


def test_exit_status_table_is_in_the_help():
    from detlearn.utils import EXIT_CODES
    r = subprocess.run([sys.executable, '-m', 'detlearn', '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for code, text in EXIT_CODES.items():
        assert f'{code:<4} {text}' in r.stdout, code


def test_a_check_that_fails_has_its_own_status(tmp_path):
    """An export whose check finds a difference: status 6, one line, the file kept."""
    from detlearn.models import create
    pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    model = create('yolox_nano')
    torch.save(model.state_dict(), tmp_path / 'w.pth')
    r = detlearn('export', '--model', 'yolox_nano', '--weights', tmp_path / 'w.pth', '--img-size', 64, '--out',
                 tmp_path / 'm.onnx', '--rel', '1e-12', cwd=tmp_path, ok=False)
    assert r.returncode == 6 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().count('\n') == 0 and '(kept, for inspection)' in r.stderr
    assert (tmp_path / 'm.onnx').is_file()


def _stderr_on_a_terminal(args: list, cwd) -> str:
    """What `detlearn ARGS` writes to stderr when stderr is a terminal (a pseudo-terminal here)."""
    import fcntl, pty, struct, termios
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))  # 24 x 100, as a terminal has
    env = os.environ | {'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'detlearn', *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                       stderr=follower, timeout=300)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert r.returncode == 0, r.stdout
    return b''.join(chunks).decode(errors='replace')


def test_progress_bars_on_a_terminal_only(tmp_path):
    check = ['data', 'check', SHAPES / 'val.json', '--images', SHAPES / 'val']
    assert 'check images' in _stderr_on_a_terminal(check, tmp_path)  # a bar on a terminal
    assert 'check images' not in _stderr_on_a_terminal([*check, '--no-progress'], tmp_path)
    r = detlearn(*check, cwd=tmp_path)  # stderr a pipe, as in a log file: no bar
    assert 'check images' not in r.stderr and '%|' not in r.stderr
