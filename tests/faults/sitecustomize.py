"""Fault injection for the failure tests, kept out of the product.

Python imports `sitecustomize` at start-up from the path; tests/conftest.py (`launch_env`) and
bench/gpu_smoke.py put this folder on PYTHONPATH of the processes they launch. When
SPARSEXPERT_FAIL_AT="rank:step[:mode]" is set, `sparsexpert.harness.Harness.tick` (where every loop says
which step or evaluation batch it is at) gets wrapped, once that module is imported, so that at the
start of that step that rank's process
    - dies abruptly (os._exit(1)) with no mode,
    - raises RuntimeError("injected failure (SPARSEXPERT_FAIL_AT)") with ":raise",
    - stops itself (SIGSTOP: alive to the kernel, silent to its peers, as a rank stuck in a collective
      whose peer died looks under NCCL) with ":hang".
Unset, nothing is imported or changed.
"""

import importlib.abc
import importlib.util
import os
import signal
import sys

FAIL_ENV = "SPARSEXPERT_FAIL_AT"


def _inject(rank: int, step: int) -> None:
    parts = os.environ[FAIL_ENV].split(":")
    if parts[:2] != [str(rank), str(step)]:
        return
    if parts[2:] == ["raise"]:
        raise RuntimeError(f"injected failure ({FAIL_ENV})")
    if parts[2:] == ["hang"]:
        print(f"sparsexpert: rank {rank} stops itself (SIGSTOP) at step {step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    os._exit(1)


def _wrap(module) -> None:
    tick = module.Harness.tick

    def tick_with_fault(self, step: int) -> None:
        tick(self, step)
        _inject(self.rank, step)

    module.Harness.tick = tick_with_fault


class _WhenImported(importlib.abc.MetaPathFinder):
    """Wraps sparsexpert.harness right after it is executed, wherever it is imported from."""

    def find_spec(self, name, path, target=None):
        if name != "sparsexpert.harness":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _wrap(module)

            spec.loader.exec_module = exec_module
        return spec


if os.environ.get(FAIL_ENV):
    sys.meta_path.insert(0, _WhenImported())
