"""Elastic multi-node training on loopback: two torchrun agents (`--nnodes 2 --nproc_per_node 1`, c10d
rendezvous on 127.0.0.1, gloo, `--max-restarts 2`). One worker is SIGKILLed mid-epoch; torchrun restarts the
group, the same command resumes from the last step checkpoint (`-r auto` semantics), and the job ends with the
weights of an uninterrupted 2-node run, every epoch logged once. Every process started here is ended by its PID.

The restarted group has to meet again through the store that the first node's agent keeps for the whole job:
this is where a group that read the dead group's addresses failed to connect or hung before
`detlearn.distributed.round_store` (chapter 01b) gave each start of the group its own keys."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# Both jobs together: ~75 s alone on 2 cores, about twice that beside another CPU-bound test; the bound ends a
# hang with the agents' logs instead of the suite's timeout.
TEST_BUDGET_S = 480


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


def end_job(agents: list[subprocess.Popen], folder: Path):
    """SIGKILL every agent still running and every process below it or started for `folder`, by PID."""
    for a in agents:  # workers may have changed process group; an agent that exited may have left orphans
        alive = [a.pid] if a.poll() is None else []  # never signal a PID already reaped (it may be reused)
        for pid in [*descendants(a.pid), *alive, *running_with(str(folder))]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        a.wait()


def two_nodes(out: Path, kill_step: int, deadline: float) -> list[str]:
    """Start two torchrun agents for one job; wait for both until `deadline` (time.monotonic); their outputs."""
    out.mkdir(parents=True)
    # loopback only: the rendezvous, the agents' addresses and gloo's sockets (whatever the host name resolves to)
    env = os.environ | {'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(HERE), 'GLOO_SOCKET_IFNAME': 'lo'}
    for k in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE'):
        env.pop(k, None)  # the last one: test the default, where the agent's store outlives the restarted group
    port = free_port()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
           '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', out.name,
           '--max-restarts', '2', '--monitor-interval', '0.5', '--local-addr', '127.0.0.1',
           str(HERE / 'elastic_worker.py'), str(out), str(kill_step)]
    logs = [open(out / f'agent{i}.log', 'w+') for i in range(2)]
    agents = [subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
              for log in logs]
    late = False
    try:
        for a in agents:
            a.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        late = True
    finally:
        end_job(agents, out)
    texts = []
    for log in logs:
        log.seek(0); texts.append(log.read()); log.close()
    tails = '\n'.join(f'--- agent {i} (exit {a.returncode}):\n{text[-3000:]}'
                      for i, (a, text) in enumerate(zip(agents, texts)))
    assert not late, f'{out.name}: the job did not end within the test\'s {TEST_BUDGET_S} s\n{tails}'
    assert all(a.returncode == 0 for a in agents), f'{out.name}: an agent failed\n{tails}'
    return texts


def test_killed_node_resumes_to_the_uninterrupted_weights(tmp_path):
    deadline = time.monotonic() + TEST_BUDGET_S
    two_nodes(tmp_path / 'straight', kill_step=0, deadline=deadline)
    # 4 steps per epoch: the worker of node 1 dies in epoch 2, after step 6's checkpoint and step 7
    two_nodes(tmp_path / 'killed', kill_step=7, deadline=deadline)
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
