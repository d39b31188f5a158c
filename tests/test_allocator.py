"""The command line's allocator settings (:mod:`dirio.apps.allocator`): freed large blocks are reused
without new page faults, and a user's own allocator environment is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dirio.apps import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="the allocator settings are glibc's (Linux)")

# Allocates, fills and frees a 64 MiB tensor 30 times; prints whether the settings were applied and
# the minor page faults of the last 10 rounds (a fresh mapping per block faults in all its 16384
# pages; from the heap, the first rounds grow it, as PyTorch's 64-byte-aligned blocks do not fit
# exactly into the space a freed one leaves, and then the blocks are reused).
_SCRIPT = """
import resource, sys, torch
from dirio.apps.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
for round in range(30):
    if round == 20:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(16 << 20)
    block.fill_(1.0)
    del block
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _faults(mode: str, **environment) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in (*allocator.ENVIRONMENT_SETTINGS, allocator.OPT_OUT[0])}
    env.update(environment)
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_freed_blocks_are_reused_without_new_page_faults():
    applied, tuned = _faults("tuned")
    _, default = _faults("default")
    assert applied == "True"
    assert default > 10 * 16384 * 0.8  # glibc's default: every block is a fresh, zeroed mapping
    assert tuned < default / 10  # reused: no new pages


def test_an_allocator_set_in_the_environment_is_left_alone():
    applied, faults = _faults("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
    assert faults > 10 * 16384 * 0.8


def test_dirio_allocator_system_keeps_glibcs_defaults():
    applied, faults = _faults("tuned", DIRIO_ALLOCATOR="system")
    assert applied == "False"
    assert faults > 10 * 16384 * 0.8


def test_the_register_command_keeps_freed_memory_for_dense_methods_and_the_cpu_network_budget(monkeypatch):
    from dirio.apps import cli
    from dirio.config.settings import make_settings

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(True) or True)
    cli.keep_freed_memory_for(make_settings("brain-mri"))
    assert calls == [True]
    for method in ("nio", "network-io", "network+dense"):
        cli.keep_freed_memory_for(make_settings(None, method=method))
    assert calls == [True]
    for method in ("nio", "network-io"):
        cli.keep_freed_memory_for(make_settings(None, method=method, network_budget="cpu"))
    assert calls == [True, True, True]
