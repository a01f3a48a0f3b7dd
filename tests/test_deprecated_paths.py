"""The old import paths work for one release: each is the new module itself, and says so with a warning."""

from __future__ import annotations

import json
import subprocess
import sys

ALIASES = {
    "mmloader.byo": "mmloader.recipes.custom",
    "mmloader.media": "mmloader.video.probe",
    "mmloader.windowset": "mmloader.windows.dataset",
    "mmloader.resample": "mmloader.windows.resample",
    "mmloader.collate": "mmloader.windows.collate",
    "mmloader.dataset": "mmloader.api",
    "mmloader.schema": "mmloader.store.schema",
    "mmloader.adapters.ego4d": "mmloader.recipes.ego4d.recipe",
    "mmloader.adapters.ego4d_imu": "mmloader.recipes.ego4d.imu",
    "mmloader.adapters.ego4d_narration": "mmloader.recipes.ego4d.narration",
    "mmloader.adapters.aria": "mmloader.recipes.aria.recipe",
}


def test_each_old_path_is_the_new_module_and_warns():
    # a fresh interpreter: a module's warning fires on its first import only
    code = ("import importlib, json, sys, warnings\n"
            "out = {}\n"
            "for old, new in json.loads(sys.argv[1]).items():\n"
            "    with warnings.catch_warnings(record=True) as w:\n"
            "        warnings.simplefilter('always')\n"
            "        a = importlib.import_module(old)\n"
            "    warned = any(issubclass(x.category, DeprecationWarning) for x in w)\n"
            "    out[old] = [a is importlib.import_module(new), warned]\n"
            "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", code, json.dumps(ALIASES)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert {old: ok for old, (ok, _) in result.items()} == {old: True for old in ALIASES}
    # the mmloader.adapters package warns once for all of its submodules
    assert all(warned for old, (_, warned) in result.items() if not old.startswith("mmloader.adapters."))
    assert any(warned for old, (_, warned) in result.items() if old.startswith("mmloader.adapters."))


def test_old_names_still_resolve():
    from mmloader.adapters import available, get_adapter
    from mmloader.recipes.ego4d import Ego4DAdapter

    assert {"ego4d", "aria"} <= set(available())
    assert isinstance(get_adapter("ego4d"), Ego4DAdapter)


def test_old_modules_are_attributes_of_the_package_after_a_bare_import():
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "import mmloader\n"
            "assert mmloader.byo.write_store is mmloader.write_store\n"
            "assert 'ego4d' in mmloader.adapters.available()\n"
            "assert mmloader.media.probe_video is mmloader.video.probe.probe_video\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
