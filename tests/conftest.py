import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs pytest-xdist workers, one per core: one torch thread each (tiny tensors gain little from
    # a second intra-op thread, a second process doubles the throughput), and the scripts the tests start
    # inherit it, so that their floating-point results equal the in-process ones bit for bit
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)

# the site key of the keyed unit digests (common/splits.py) is made on first use under XDG_CONFIG_HOME: the tests
# use a key of their own, never the developer's. The first pytest process makes the folder (and removes it at
# exit); the xdist workers and the scripts the tests start inherit it, so that they all share one key.
if not os.environ.get("MEDGEN_KEY_FILE") and "medgen-test-config-" not in os.environ.get("XDG_CONFIG_HOME", ""):
    import atexit
    import shutil
    import tempfile
    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="medgen-test-config-")
    atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], True)

from medgen.Generation.TrainGen.core.phantom import ensure_demo_data  # noqa: E402

# `make test` hands whole files to two workers (--dist loadfile --no-loadscope-reorder), in collection order: the
# files that take longest go first, so that the workers finish together instead of one waiting on a long file
# picked up last. Worker seconds per file on 2 cores (`make test` with --junitxml, 2026-12-08: 48 s down to
# 6 s), heaviest first; a file not listed runs after these, in name order.
SLOWEST_FIRST = ["training", "utility", "distributed", "evidence", "labels", "cluster", "generate", "inpaint",
                 "recipes", "package", "speed", "volumes", "eval_robust", "eval", "seed_cli", "eval_intervals",
                 "segment_images", "hostile"]


def pytest_collection_modifyitems(items):
    rank = {f"test_{name}.py": k for k, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))    # stable: the order within a file stays


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo dataset (8 subjects of 32x32x24 in train/val, 2 in test, and lesion folders), built once per
    test session."""
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", n_subjects=8, shape=(32, 32, 24), n_test=2)


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300, isolated: bool = False):
    """Run one of the public scripts as a user would: `python <path> ...` from the repository root, returning
    its exit code, stdout and stderr. By default the script runs in this process (runpy, as `__main__`: the same
    flag parsing, run_main and exit codes; a fresh interpreter would spend ~4 s importing torch and MONAI on
    every call). isolated=True, or MEDGEN_TEST_SUBPROCESS=1 for the whole suite, starts a real subprocess."""
    import os
    import subprocess
    if isolated or os.environ.get("MEDGEN_TEST_SUBPROCESS"):
        return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=timeout)
    return _run_in_process(script, list(args), env or {}, timeout)


class ScriptTimeout(BaseException):
    """An in-process script ran past run_script's timeout (a BaseException, so the script cannot catch it)."""


def _alarm(seconds: int | None, message: str):
    """Raise ScriptTimeout in the main thread after `seconds` (the in-process twin of subprocess's timeout)."""
    import contextlib
    import signal
    import threading
    if not seconds or threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def armed():
        def fire(signum, frame):
            raise ScriptTimeout(message)
        previous = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return armed()


def _run_in_process(script: str, args: list, env: dict, timeout: int | None = None):
    import contextlib
    import io
    import os
    import runpy
    import subprocess
    import traceback
    import warnings

    from medgen.Generation.TrainGen.core import plugins
    from medgen.Generation.TrainGen.core.modes import MODES
    from medgen.Generation.TrainGen.core.strategies import STRATEGIES
    out, err = io.StringIO(), io.StringIO()
    saved = (sys.argv, list(sys.path), dict(os.environ), os.getcwd(), dict(MODES), dict(STRATEGIES),
             dict(plugins._loaded))
    code = 0
    try:
        os.environ.update(env)
        os.chdir(ROOT)
        sys.argv = [script, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(), \
                _alarm(timeout, f"{script} ran past its {timeout} s timeout"):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as stop:
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except ScriptTimeout:
                raise
            except BaseException:  # noqa: BLE001 - what the interpreter would print, and its exit code
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        os.chdir(saved[3])
        for registry, before in ((MODES, saved[4]), (STRATEGIES, saved[5]), (plugins._loaded, saved[6])):
            # a plugin registers into MODES / STRATEGIES once per process: a fresh "process" loads it again
            registry.clear()
            registry.update(before)
    return subprocess.CompletedProcess([sys.executable, script, *args], code, out.getvalue(), err.getvalue())


import contextlib  # noqa: E402


@contextlib.contextmanager
def background(cmd: list[str], **kwargs):
    """A process in its own process group, killed with everything it started when the block ends, however it
    ends (a failed assertion must not leave a training running)."""
    import os
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


GLOO_ABORT = "terminate called without an active exception"


def torchrun(*args, env: dict | None = None, timeout: int = 240):
    """Two CPU processes under torchrun (gloo) on a free port (--standalone), over the loopback interface. gloo
    can abort a rank while the pair connections are set up (std::terminate from a connection thread:
    pytorch/pytorch#188266, pytorch/gloo#514); that failure, and only that one, is retried once."""
    import os
    import subprocess
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if res.returncode != 0 and GLOO_ABORT in res.stderr:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    return res


@pytest.fixture(scope="session")
def tiny_models(demo_root, tmp_path_factory) -> dict:
    """Run folders of tiny models trained for a few steps: seg and bravo (DDPM), bravo (RFlow), class (DDPM).
    Only the machinery is under test here, not sample quality."""
    from medgen.Generation.TrainGen.core.run import train
    from tests.test_training import tiny_cfg
    root = tmp_path_factory.mktemp("models")
    runs = {}
    for name, mode, strategy in [("seg", "seg", "ddpm"), ("bravo", "bravo", "ddpm"), ("bravo_rflow", "bravo", "rflow"),
                                 ("class", "class", "ddpm")]:
        cfg = tiny_cfg(demo_root, root / name, mode, strategy, optim={"max_steps": 4}, runtime={"val_interval": 100})
        assert train(cfg) == 0
        runs[name] = root / name / "run"
    return runs
