"""Elastic multi-node training on loopback: two torchrun agents (`--nnodes 2 --nproc_per_node 1`, c10d
rendezvous on 127.0.0.1, gloo, `--max-restarts 2`). One worker is SIGKILLed mid-epoch; torchrun restarts the
group, the same command resumes from the last step checkpoint (`-r auto` semantics), and the job ends with the
weights of an uninterrupted 2-node run, every epoch logged once. Every process started here is ended by its PID."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


# Opt-in: on this 2-core machine the restarted gloo group sometimes fails to connect ('connectFullMesh failed ...
# Connection refused') or hangs, on either node, independently of detlearn's resume code (which the test checks
# when it gets there). Run it with DETLEARN_ELASTIC=1 until that transport race is understood.
pytestmark = pytest.mark.skipif(os.environ.get('DETLEARN_ELASTIC') != '1',
                                reason='two-node torchrun test is opt-in (DETLEARN_ELASTIC=1): gloo restart race')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (children first found through /proc), deepest last."""
    children = {}
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
        if entry.name.isdigit():
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child); todo.append(child)
    return found


def running_with(text: str) -> list[int]:
    """PIDs whose command line mentions `text` (this job's folder): workers orphaned by an agent that exited."""
    pids = []
    for entry in Path('/proc').iterdir():
        try:
            if entry.name.isdigit() and text in (entry / 'cmdline').read_bytes().decode(errors='replace'):
                pids.append(int(entry.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def two_nodes(out: Path, kill_step: int, timeout: float = 600) -> list[str]:
    # the timeout only ends a hang: a run takes about a minute alone, but over 4 minutes on 2 busy cores
    """Start two torchrun agents for one job; wait for both; return their outputs."""
    out.mkdir(parents=True)
    env = os.environ | {'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(HERE)}
    for k in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'): env.pop(k, None)
    port = free_port()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
           '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', out.name,
           '--max-restarts', '2', '--monitor-interval', '0.5', '--local-addr', '127.0.0.1',
           str(HERE / 'elastic_worker.py'), str(out), str(kill_step)]
    logs = [open(out / f'agent{i}.log', 'w+') for i in range(2)]
    agents = [subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
              for log in logs]
    try:
        deadline = time.monotonic() + timeout
        for a in agents:
            a.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for a in agents:  # end every agent still running and every process below it (workers may change group)
            alive = [a.pid] if a.poll() is None else []  # never signal a PID already reaped (it may be reused)
            for pid in [*descendants(a.pid), *alive, *running_with(str(out))]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            a.wait()
    texts = []
    for log in logs:
        log.seek(0); texts.append(log.read()); log.close()
    for a, text in zip(agents, texts):
        assert a.returncode == 0, text[-4000:]
    return texts


def test_killed_node_resumes_to_the_uninterrupted_weights(tmp_path):
    two_nodes(tmp_path / 'straight', kill_step=0)
    two_nodes(tmp_path / 'killed', kill_step=7)  # 4 steps per epoch: in epoch 2, after step 6's checkpoint
    straight, killed = torch.load(tmp_path / 'straight' / 'final.pt'), torch.load(tmp_path / 'killed' / 'final.pt')
    assert (tmp_path / 'killed' / 'killed_once').exists()  # the kill really happened...
    assert killed['world'] == 2 and not (tmp_path / 'straight' / 'resumed_from.txt').exists()
    assert straight['step'] == killed['step'] == 12
    # torchrun restarted the group and the same command resumed: from step 6, 2 batches into epoch 2
    assert (tmp_path / 'killed' / 'resumed_from.txt').read_text() == '6 2'
    for name, p in straight['params'].items():
        assert torch.equal(p, killed['params'][name]), name
        assert torch.equal(straight['ema'][name], killed['ema'][name]), f'EMA {name}'
    rows = list(csv.DictReader(open(tmp_path / 'killed' / 'run' / 'metrics.csv')))
    assert [r['epoch'] for r in rows] == ['1', '2', '3']  # every epoch logged once
    want = list(csv.DictReader(open(tmp_path / 'straight' / 'run' / 'metrics.csv')))
    assert [r['loss'] for r in rows] == [r['loss'] for r in want]
