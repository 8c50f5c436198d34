"""Registries: one registration per method/family/dataset, everything else derived; config
validated at compose time, before any heavy import."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from helpers import CONF, preset, ulps
from peftseg.config import TrainConfig, schemas, validate
from peftseg.engine.optim import build_optimizer
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.params import added_params, count_parameters
from peftseg.registry import DATASETS, FAMILIES, GROUPS, METHODS


def test_every_yaml_has_a_registered_schema_and_every_registration_a_yaml():
    for group, registry in (("method", METHODS), ("dataset", DATASETS)):
        assert {p.stem for p in CONF.glob(f"{group}/*.yaml")} == set(registry.names()), group
    assert set(schemas()["model"]) == set(FAMILIES.names())
    # report order comes from the registry: baselines first
    assert METHODS.names()[:3] == ["full", "heads", "bitfit"]
    assert {m.name for m in METHODS if m.mergeable} >= {"lora", "loha", "lokr", "ia3", "vera"}
    assert not METHODS.get("adapter").mergeable


def test_validating_a_config_imports_nothing_heavy():
    # the reason a bad value fails in about a second: no torch, detectron2, peft, transformers
    code = (
        "import sys\n"
        "from peftseg.cli import main\n"
        "try:\n    rc = main(['train', 'train.optimizer=adamww', 'hydra.run.dir=' + sys.argv[1]])\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "heavy = [m for m in ('torch', 'detectron2', 'peft', 'transformers') if m in sys.modules]\n"
        "print('RC', rc, 'HEAVY', heavy)\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, timeout=120, cwd=d)
        written = list(Path(d).rglob("results.json"))
    assert "RC 2 HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "train.optimizer='adamww' is not one of the choices: adamw, sgd" in proc.stderr
    assert written == []  # a single run writes nothing: the dir may belong to another run


def test_a_sweep_member_with_a_bad_value_leaves_a_failed_record(peftseg, tmp_path):
    proc = peftseg("train", "-m", "train.max_iter=-1,0", "train=smoke")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "multirun").rglob("results.json"))]
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert "train.max_iter must be an integer at least 1" in records[0]["error"]["message"]
    assert "sweep: 2 of 2 runs failed" in proc.stdout


def _composed(*overrides):
    from peftseg.config import compose_config

    return compose_config(list(overrides))


@pytest.mark.parametrize("overrides,message", [
    (["train.optimizer=adamww"], r"train\.optimizer='adamww' is not one of the choices: adamw, sgd"),
    (["train.lr_schedule=linear"], r"train\.lr_schedule='linear' is not one of the choices: cosine, step"),
    (["train.device=tpu"], r"train\.device='tpu' is not one of the choices: auto, cpu, cuda, cuda:N"),
    (["method=adapter", "method.sites=[atn]"], r"\['atn'\].*choose from \['attn', 'mlp', 'mlp_parallel'\]"),
    (["method=adapter", "method.activation=swish"], r"choose one of \['gelu', 'relu'\]"),
    (["+train.max_iters=10"], r"train\.max_iters is not a setting of train 'default' \(did you mean train\.max_iter\?\)"),
    (["+method.rnk=4"], r"method\.rnk is not a setting of method 'lora' \(did you mean method\.rank\?\)"),
    (["train.max_iter=-5"], r"train\.max_iter must be an integer at least 1 \(got -5\)"),
    (["train.max_iter=0"], r"train\.max_iter must be an integer at least 1"),
    (["train.ims_per_batch=0"], r"train\.ims_per_batch must be an integer at least 1"),
    (["train.log_period=0"], r"train\.log_period must be an integer at least 1"),
    (["train.num_workers=-1"], r"train\.num_workers must be an integer at least 0"),
    (["train.weight_decay=-1"], r"train\.weight_decay must be a number >= 0"),
    (["train.warmup_factor=-0.1"], r"train\.warmup_factor must be a number >= 0 and <= 1"),
    (["train.optimizer=sgd", "train.momentum=-0.5"], r"train\.momentum must be a number >= 0 and < 1"),
    (["train.clip_grad_norm=-1"], r"train\.clip_grad_norm must be a number >= 0"),
    (["model.image_size=0"], r"model\.image_size must be an integer at least 32"),
    (["method.rank=0"], r"method\.rank must be an integer at least 1"),
    (["method=vera", "method.dropout=1.5"], r"method\.dropout must be a number >= 0 and < 1"),
    (["dataset.num_val=0"], r"dataset\.num_val must be an integer at least 1"),
])
def test_bad_values_fail_at_compose_time_naming_field_value_and_choices(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(_composed(*overrides))


def test_every_preset_composes_and_validates():
    for group in GROUPS:
        for path in sorted(CONF.glob(f"{group}/*.yaml")):
            if group == "dataset" and path.stem == "coco_format":
                continue  # its four paths are required (???) by design
            validate(_composed(f"{group}={path.stem}"))


def test_swin_b_extends_swin_t_and_presets_restate_no_default():
    cfg = _composed("model=swin_b").model
    assert (cfg.name, cfg.embed_dim, list(cfg.depths), cfg.window_size) == ("swin_b", 128, [2, 2, 18, 2], 7)
    text = (CONF / "model" / "vitdet_b.yaml").read_text()
    assert "embed_dim" not in text and _composed("model=vitdet_b").model.embed_dim == 768


def test_param_table_is_unchanged_by_the_move_to_registries():
    """Counts of scripts/param_table.py on the tiny presets, as before the registries
    (tests/data/param_table_tiny.json was written by the name-marker accounting)."""
    spec = importlib.util.spec_from_file_location("param_table", ROOT / "scripts" / "param_table.py")
    pt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pt)
    golden = json.loads((ROOT / "tests" / "data" / "param_table_tiny.json").read_text())
    for model, expected in golden.items():
        rows = [(label, ov) for label, ov in pt.ROWS] + pt.FAMILY_ROWS.get(pt.family_of_preset(model), [])
        # rows added since (e.g. mona) are not in the snapshot; every row it has is unchanged
        rows = [(label, ov) for label, ov in rows if label in expected]
        got = {r["label"]: {k: r[k] for k in ("trainable", "total", "peft", "backbone", "backbone_trainable")}
               for r in pt.table_rows(model, rows, 3)}
        assert got == expected, model


def test_vera_trains_rank_plus_out_features_per_targeted_linear(model):
    cfg = preset("method", "vera", METHODS.get("vera").config, rank=16, targets=["attn_qkv", "attn_proj"])
    adapted = apply_method(model, cfg)
    targeted = [m for n, m in adapted.named_modules()
                if n.endswith((".attn.qkv", ".attn.proj")) and hasattr(m, "vera_lambda_d")]
    assert targeted
    closed_form = sum(16 + m.base_layer.out_features for m in targeted)
    counts = count_parameters(adapted)
    assert counts.by_group["peft"]["total"] == counts.by_group["peft"]["trainable"] == closed_form
    # the shared random projections are frozen buffers, not parameters
    assert all(not n.startswith("vera_A") for n in added_params(adapted))
    assert any("vera_A" in n for n, _ in adapted.named_buffers())


def test_clip_grad_norm_bounds_the_gradient_the_optimizer_sees(model):
    model = apply_method(model, preset("method", "full", METHODS.get("full").config))
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"base_lr": 1e-3})
    seen = []
    optimizer = build_optimizer(model, cfg, clip_grad_norm=1e-3)
    base_step = type(optimizer).__mro__[1].step

    def spy(self, closure=None):  # the unclipped class's step: runs after the clipper
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return base_step(self, closure)

    type(optimizer).__mro__[1].step, restore = spy, base_step
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.full_like(p, 1.0)  # norm ~ sqrt(#params) >> 1e-3
        optimizer.step()
    finally:
        type(optimizer).__mro__[1].step = restore
    # the clipped norm is recomputed here in float32 over ~1e6 entries: each norm's blocked sum
    # rounds ~log2(1e6) = 20 times, plus the scaling: 64 ulps of max_norm (measured: below it)
    assert seen and seen[0] <= 1e-3 + ulps(1e-3, 64)


def test_clip_grad_norm_null_takes_the_model_recipe():
    from peftseg.engine.optim import clip_norm_of

    assert clip_norm_of(_composed("model=m2f_tiny")) == 0.01
    assert clip_norm_of(_composed("model=vitdet_tiny")) == 0.0
    assert clip_norm_of(_composed("model=m2f_tiny", "train.clip_grad_norm=0")) == 0.0


def test_merge_refusal_derives_from_registration(model):
    from peftseg.checkpoint.merge import merge_and_unload

    adapted = apply_method(model, preset("method", "adapter", METHODS.get("adapter").config))
    with pytest.raises(UserError, match=r"carries adapter modules.*Merge works for .*lora"):
        merge_and_unload(adapted)


def test_slurm_port_differs_between_array_tasks():
    from peftseg.engine.distributed import _port_of

    ports = {_port_of(f"4242_{i}") for i in range(8)}
    assert len(ports) == 8 and all(20000 <= p < 40000 for p in ports)


def test_dataset_declares_its_evaluator(tmp_path, monkeypatch):
    from detectron2.data import MetadataCatalog

    from peftseg.data import register_splits
    from peftseg.data.shapes import ShapesDatasetConfig

    splits = register_splits(ShapesDatasetConfig(num_train=2, num_val=2, cache_dir=str(tmp_path)))
    assert MetadataCatalog.get(splits.val).evaluator_type == DATASETS.get("shapes").evaluator_type == "coco"


def test_eval_and_merge_take_help():
    from peftseg.cli import main

    assert main(["eval", "--help"]) == 0
    assert main(["merge", "--help"]) == 0


def test_eval_overrides_use_hydra_syntax_and_refuse_the_model():
    from peftseg.checkpoint.load import compose_for_checkpoint
    from peftseg.results import flatten_config

    saved = OmegaConf.to_container(_composed(), resolve=True)
    cfg = compose_for_checkpoint(saved, ["train.device=cpu", "dataset.num_val=7"])
    assert cfg.train.device == "cpu" and cfg.dataset.num_val == 7 and cfg.method.name == "lora"
    with pytest.raises(UserError, match=r"'method.rank=4' cannot be set here"):
        compose_for_checkpoint(saved, ["method.rank=4"])
    with pytest.raises(UserError, match=r"dataset\.num_val must be an integer at least 1"):
        compose_for_checkpoint(saved, ["dataset.num_val=0"])
    assert flatten_config(cfg)["dataset.num_val"] == 7


@pytest.mark.parametrize("overrides,message", [
    (["dataset=coco", "dataset.num_val=5"], r"Could not override 'dataset\.num_val' \(Key 'num_val' not in 'CocoDatasetConfig'\)"),
    (["~dataset.foo"], r"'dataset\.foo' does not exist"),
    (["+train.device=cpu"], r"An item is already at 'train\.device'"),
    (["train.num_workers=abc"], r"train\.num_workers=abc \(Value 'abc' of type 'str' could not be converted to Integer\)"),
    (["dataset=nope"], r"Unknown dataset 'nope'\. Available dataset options: .*shapes"),
    (["+dataset.foo=1"], r"dataset\.foo is not a setting of dataset 'shapes'"),
])
def test_eval_overrides_hydra_refuses_are_one_paragraph_naming_them(overrides, message):
    from peftseg.checkpoint.load import compose_for_checkpoint

    saved = OmegaConf.to_container(_composed(), resolve=True)
    with pytest.raises(UserError, match=message):
        compose_for_checkpoint(saved, overrides)


def test_eval_overrides_take_hydras_grammar_on_the_checkpoints_own_config():
    from peftseg.checkpoint.load import compose_for_checkpoint

    saved = OmegaConf.to_container(_composed("method=adapter_lora", "method.lora.rank=2", "dataset.num_val=9"),
                                   resolve=True)
    cfg = compose_for_checkpoint(saved, ["++train.device=cpu", "dataset.train_subset=0.5"])
    assert (cfg.method.name, cfg.method.lora.rank, cfg.dataset.num_val) == ("adapter_lora", 2, 9)
    assert (cfg.train.device, cfg.dataset.train_subset) == ("cpu", 0.5)
    assert set(cfg) == set(GROUPS)
    cfg = compose_for_checkpoint(saved, ["dataset=coco", "dataset.root=/data"])  # that dataset's settings
    assert (cfg.dataset.name, cfg.dataset.root, cfg.method.lora.rank) == ("coco", "/data", 2)


def test_a_checkpoint_whose_settings_this_version_lacks_is_named_not_blamed_on_the_overrides():
    from peftseg.checkpoint.load import compose_for_checkpoint

    saved = OmegaConf.to_container(_composed(), resolve=True)
    saved["method"]["train_heads"] = True
    with pytest.raises(UserError, match=r"the checkpoint's saved config does not fit this peftseg version "
                                        r"\(Key 'train_heads' not in 'LoraConfig'"):
        compose_for_checkpoint(saved, ["train.device=cpu"])


def test_glob_sweep_syntax_runs_the_lora_family(peftseg, tmp_path):
    proc = peftseg("train", "-m", "method=glob(lo*)", "train=smoke", "train.max_iter=2", "train.warmup_iters=0", "model.score_thresh_test=0.0", "dataset.num_train=8",
                   "dataset.num_val=4", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "multirun").rglob("results.json"))]
    assert sorted(r["config"]["method.name"] for r in records) == ["loha", "lokr", "lora"]
    assert all(r["status"] == "ok" for r in records)


def test_vera_exports_in_peft_layout_and_peft_loads_it(base, tmp_path):
    """Projections are redrawn from projection_prng_key, so the export holds only the
    trained vectors; peft's own loader rebuilds the same model from it."""
    import copy as _copy

    from peft import PeftModel
    from safetensors.torch import load_file

    from peftseg.checkpoint.files import trainable_state
    from peftseg.checkpoint.formats import write_peft_export

    model = apply_method(_copy.deepcopy(base), preset("method", "vera", METHODS.get("vera").config, rank=16))
    with torch.no_grad():  # as if trained: b leaves zero, so the update is not the identity
        for n, p in model.named_parameters():
            if "vera_lambda_b" in n:
                p.normal_(0, 0.5)
    export = write_peft_export(model, trainable_state(model), tmp_path)
    tensors = load_file(str(export / "adapter_model.safetensors"))
    assert tensors and not any("vera_A" in k or "vera_B" in k for k in tensors)
    plain = _copy.deepcopy(base)
    plain.load_state_dict(load_file(str(export / "trained_outside_peft.safetensors")), strict=False)
    loaded = PeftModel.from_pretrained(plain, str(export)).eval()
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval().backbone(x)
        got = loaded.base_model.model.backbone(x)
        moved = base.backbone(x)
    for k in want:
        # the same layers and projections redrawn from the same key: identical kernels (measured: equal);
        # 32 ulps of the feature's max allows other blocking over the 4 blocks, as merged LoRA does
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=ulps(want[k], 32))
    # the update is not zero: it moves features by more than the bound above
    assert not any(torch.allclose(want[k], moved[k], rtol=0, atol=ulps(want[k], 32)) for k in want)


def test_an_unknown_key_inside_a_group_of_settings_is_named_with_that_groups_settings():
    with pytest.raises(UserError, match=r"method\.lora\.rnk is not a setting of method 'adapter_lora' \(did you mean "
                                        r"method\.lora\.rank\?\); the settings of method\.lora are: .*, rank, "):
        validate(_composed("method=adapter_lora", "+method.lora.rnk=4"))
    # an interpolated value is checked as the value it points to
    validate(_composed("method=adapter_lora", "method.lora.alpha=${method.lora.rank}"))
    with pytest.raises(UserError, match=r"method\.rank must be an integer at least 1"):
        validate(_composed("train.seed=0", "method.rank=${train.seed}"))
