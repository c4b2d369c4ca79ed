"""The layers are the folders. unetseg/client/ (the notebook side) and unetseg/contract/ (what both sides agree on)
import none of the engine's heavy modules, so that a notebook with only the SageMaker SDK imports them fast; imports
run one way: the contract imports nothing outside itself, the client nothing of the engine but its torch-free data
check (data/), and nothing of the container side.

The module lists come from the folders, so a module added there is checked from the day it is added. Each module is
imported alone in a fresh interpreter: in a shared one, a module imported earlier would hide what a later one pulls in.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import pytest

from support import ENGINE_ONLY_MODULES, REPO


def modules_in(folder: str) -> list[str]:
    found = [f"unetseg.{folder}.{m.name}" for m in pkgutil.iter_modules([str(REPO / "unetseg" / folder)])]
    assert found, f"no modules in unetseg/{folder}/"
    return sorted(found)


CLIENT, CONTRACT = modules_in("client"), modules_in("contract")
# What each layer may import of unetseg besides itself: the client runs the engine's own data check, which is free of
# torch and OpenCV until pixels are read (fit_inputs imports data.checks only when it checks local files).
MAY_IMPORT = {"client": ("unetseg.client", "unetseg.contract", "unetseg.data"), "contract": ("unetseg.contract",)}

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


def imported_by(module: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
@pytest.mark.parametrize("module", ["unetseg", *CLIENT, *CONTRACT])
def test_the_client_and_the_contract_import_nothing_of_the_engine(module):
    loaded = imported_by(module)
    heavy = sorted(name for name in loaded if name.split(".")[0] in ENGINE_ONLY_MODULES)
    assert not heavy, f"importing {module} imports {heavy[:5]}"
    layer = module.split(".")[1] if module.count(".") > 1 else None
    if layer in MAY_IMPORT:
        outside = sorted(name for name in loaded if name.startswith("unetseg.")
                         and not any(name == a or name.startswith(a + ".") for a in MAY_IMPORT[layer]))
        assert not outside, f"{module} ({layer}) imports {outside}: imports run one way (README, Development)"
