"""scripts/gpu_check.py --device cpu --quick: every section runs on the CPU, so the GPU
acceptance script cannot rot between GPU sessions; a failing section is recorded as failed."""

import importlib.util
import json

import pytest

from conftest import ROOT
from helpers import ulps


@pytest.fixture
def gpu_check(shapes_cache, monkeypatch):
    spec = importlib.util.spec_from_file_location("peftseg_gpu_check_script", ROOT / "scripts" / "gpu_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    monkeypatch.setenv("COLUMNS", "200")
    return script


def test_gpu_check_quick_on_cpu(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--json", str(out), "--out", str(tmp_path / "runs")])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert code == 0, (result.get("failed_sections"), printed)
    assert result["failed_sections"] == []
    for name in ("train_eval", "vitdet_b", "maskdino", "ckpt_memory", "vit_attention", "compile", "msda", "nccl"):
        assert result[name]["status"] == "ok", name
    rows = result["train_eval"]["rows"]
    assert set(rows) == {"vitdet_tiny/fp32", "vitdet_tiny/amp_bf16"}
    assert all(r["mask_AP"] >= 0 and r["step_time_s"] > 0 for r in rows.values())
    vit = result["vitdet_b"]
    assert list(vit["methods"]) == ["stock", "full", "peer"] and vit["baseline"] == "stock"
    ckpt = result["ckpt_memory"]["methods"]
    assert list(ckpt) == ["stock", "heads+ckpt-amp"] and ckpt["stock"]["goal_met"] is None
    assert ckpt["heads+ckpt-amp"]["checkpoint_parts"] == ["neck", "heads"]
    assert ckpt["heads+ckpt-amp"]["precision"] == "amp_bf16"
    assert all(0 < m["peak_memory_ratio"] < 1 and isinstance(m["goal_met"], bool)
               for k, m in ckpt.items() if k != "stock")
    attn = result["vit_attention"]
    assert set(attn["rows"]) == {"detectron2", "chunked", "sdpa"} and attn["efficient"] == "chunked"
    assert all(0 < r["max_rel_diff"]["grads"] <= 1e-3 for k, r in attn["rows"].items() if k != "detectron2")
    comp = result["compile"]
    assert list(comp["methods"]) == ["lora", "lora+compile"] and comp["baseline"] == "lora"
    eager, compiled = comp["methods"]["lora"], comp["methods"]["lora+compile"]
    assert (eager["compiled_blocks"], compiled["compiled_blocks"]) == (0, 4)  # vitdet_tiny's blocks
    assert compiled["compile"] and compiled["compile_backend"] == "eager" and eager["compile_backend"] is None
    assert compiled["step_time_s"] > 0 and compiled["first_step_s"] > 0
    # the interpreter: each output sums 4 corners x 3 levels x 2 points of N(0,1) values with convex
    # weights in another order (<= 24 roundings; 32), so |output| < 5 for the script's few hundred draws
    assert result["msda"]["max_abs_diff"]["output"] <= ulps(5.0, 32) and result["msda"]["correct"]
    assert result["nccl"]["backend"] == "gloo"
    assert "deformable attention" in printed and "all sections ok" in printed


def test_a_failing_section_is_recorded_as_failed(gpu_check, tmp_path, monkeypatch):
    def broken(args):
        raise RuntimeError("NCCL error: unhandled system error")

    monkeypatch.setattr(gpu_check, "process_group", broken)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "nccl", "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["failed_sections"] == ["nccl"]
    assert result["nccl"]["status"] == "failed" and "unhandled system error" in result["nccl"]["error"]
