"""What a command prints: no third-party warning nobody can act on, every other warning still."""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

import pytest

from helpers import cli_in_process, make_run

# (category, message, module it is attributed to): each as the library issues it
THIRD_PARTY = [
    (UserWarning, "torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument. "
     "(Triggered internally at /pytorch/aten/src/ATen/native/TensorShape.cpp:4221.)", "torch.functional"),
    (FutureWarning, "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.",
     "torch.jit._script"),
    (FutureWarning, "`torch.cuda.amp.autocast(args...)` is deprecated. Please use `torch.amp.autocast('cuda', "
     "args...)` instead.", "detectron2.engine.train_loop"),
    (DeprecationWarning, "The 'warn' method is deprecated, use 'warning' instead",
     "detectron2.evaluation.coco_evaluation"),
    (DeprecationWarning, "__array__ implementation doesn't accept a copy keyword, so passing copy=False failed.",
     "pycocotools.mask"),
    (UserWarning, "pkg_resources is deprecated as an API. See https://setuptools.pypa.io/en/latest/pkg_resources.html.",
     "detectron2.model_zoo.model_zoo"),
]


def _show_on_stderr(message, category, filename, lineno, file=None, line=None):
    """Python's own way of showing a warning (pytest records them instead)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@pytest.fixture
def every_warning_shown(monkeypatch):
    """Every warning printed each time it is issued, unless a filter says otherwise."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", _show_on_stderr)
        yield


def test_a_command_prints_no_known_third_party_warning_but_still_shows_others(
        tmp_path, shapes_cache, monkeypatch, every_warning_shown):
    import peftseg.checkpoint.load as load

    run = make_run(tmp_path / "run", "method=lora", noise_seed=1)
    real_load_model = load.load_model

    def load_model_among_warnings(*args, **kwargs):
        for category, message, module in THIRD_PARTY:
            warnings.warn_explicit(message, category, f"/site-packages/{module.replace('.', '/')}.py", 1, module=module)
        importlib.reload(importlib.import_module("timm.models.layers"))  # timm warns on every import of it
        warnings.warn("a warning of the user's own code", UserWarning)
        # the words of a known warning, from another module, are not the known warning
        warnings.warn_explicit("`torch.jit.script` is deprecated in my_tools too", FutureWarning, "my_tools.py", 7,
                               module="my_tools")
        return real_load_model(*args, **kwargs)

    monkeypatch.setattr(load, "load_model", load_model_among_warnings)
    # TorchScript export also loads the file with torch.jit.load, which warns on every call
    proc = cli_in_process("export", f"checkpoint={run}", "format=torchscript", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout + proc.stderr
    others = shown.replace("`torch.jit.script` is deprecated in my_tools", "")
    for words in ("torch.meshgrid: in an upcoming release", "`torch.jit.", "`torch.cuda.amp.",
                  "'warn' method is deprecated", "__array__ implementation", "pkg_resources is deprecated",
                  "Importing from timm.models.layers"):
        assert words not in others, words
    assert "UserWarning: a warning of the user's own code" in proc.stderr
    assert "FutureWarning: `torch.jit.script` is deprecated in my_tools too" in proc.stderr
    # a log record torch prints through its own handler, dropped by its logger
    record = logging.LogRecord("torch.fx._symbolic_trace", logging.WARNING, __file__, 1,
                               "is_fx_tracing will return true for both fx.symbolic_trace and torch.export. Please "
                               "use is_fx_tracing_symbolic_tracing()", None, None)
    assert not logging.getLogger("torch.fx._symbolic_trace").filter(record)


def test_importing_peftseg_sets_no_warning_filter():
    before = list(warnings.filters)
    for name in ("peftseg.cli", "peftseg.known_warnings", "peftseg.cli.predict", "peftseg.cli.export"):
        importlib.import_module(name)
    assert warnings.filters == before
