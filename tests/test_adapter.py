"""Method `adapter`: exact identity at init, closed-form size, removal, training, refusals."""

import copy
import dataclasses
import io

import pytest
import torch

from helpers import run_in_process, shapes_batch, train_steps_and_check, ulps
from conftest import records_under
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods._adapter_layers import BottleneckAdapter, remove_adapters
from peftseg.methods.adapter import AdapterConfig
from peftseg.models.vitdet import VitDetConfig
from peftseg.params import count_parameters
from helpers import preset



def adapter_cfg(**overrides):
    return preset("method", "adapter", AdapterConfig, **overrides)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, 128, 128), generator=g, dtype=torch.uint8),
             "height": 128, "width": 128} for _ in range(2)]


@pytest.fixture(scope="module")
def reference(base, batch):
    """The base model's backbone features and detections on `batch`."""
    with torch.no_grad():
        x = base.preprocess_image(batch).tensor
        return x, base.backbone(x), base(batch)


def assert_same_features(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_detections(a: list, b: list):
    for ra, rb in zip(a, b, strict=True):
        ia, ib = ra["instances"], rb["instances"]
        assert len(ia) > 0
        assert torch.equal(ia.pred_boxes.tensor, ib.pred_boxes.tensor)
        assert torch.equal(ia.scores, ib.scores)
        assert torch.equal(ia.pred_classes, ib.pred_classes)
        assert torch.equal(ia.pred_masks, ib.pred_masks)


def adapter_stacks(model):
    return {n: m.peft_adapters for n, m in model.named_modules() if hasattr(m, "peft_adapters")}


def closed_form(n: int, sites: int, blocks: int, d: int, b: int) -> int:
    return n * sites * blocks * (2 * d * b + d + b)


@pytest.mark.parametrize("n,sites", [(2, ["attn", "mlp"]), (2, ["attn", "mlp_parallel"]),
                                     (3, ["mlp_parallel"])])
def test_at_init_outputs_equal_the_base_model_exactly(model, batch, reference, n, sites):
    x, feats, dets = reference
    model = apply_method(model, adapter_cfg(adapters_per_block=n, sites=sites)).eval()
    depth = len(model.backbone.net.blocks)
    stacks = adapter_stacks(model)
    assert len(stacks) == depth * len(sites)
    assert all(len(s) == n for s in stacks.values())
    with torch.no_grad():
        assert_same_features(feats, model.backbone(x))
        assert_same_detections(dets, model(batch))
        # the adapter path is live: a non-zero up projection moves the features
        for stack in stacks.values():
            stack[-1].up.bias.fill_(0.05)
        moved = model.backbone(x)
    assert not torch.equal(moved["p3"], feats["p3"])


def test_parallel_adds_the_branch_delta_to_the_mlp_output(model):
    model = apply_method(model, adapter_cfg(adapters_per_block=2, sites=["mlp_parallel"]))
    mlp = model.backbone.net.blocks[1].mlp
    torch.manual_seed(1)
    for a in mlp.peft_adapters:
        torch.nn.init.normal_(a.up.weight, std=0.1)
    h = torch.randn(2, 8, 8, mlp.fc1.in_features)
    with torch.no_grad():
        got = mlp(h)
        a0, a1 = mlp.peft_adapters
        branch = a1(a0(h))
        remove_adapters(model)
        plain = mlp(h)
    # the hook adds the residuals (r0 + r1) where this adds (x + r0 + r1) - x: ~4 roundings each side,
    # each at most an ulp of the largest term (|h| or |branch|); 8 ulps of that
    tol = ulps(torch.stack([h.abs().max(), branch.abs().max()]), 8)
    torch.testing.assert_close(got, plain + (branch - h), rtol=0, atol=tol)
    assert not torch.allclose(got, plain, rtol=0, atol=tol)  # the branch moves it by more than rounding


@pytest.mark.parametrize("n,overrides", [(1, {}), (2, {}), (3, {}), (2, {"reduction": 8.0}),
                                         (1, {"bottleneck": 5, "sites": ["mlp_parallel"]})])
def test_parameter_count_matches_the_closed_form(model, n, overrides):
    before = count_parameters(model)
    d = model.backbone.net.blocks[0].attn.proj.out_features
    depth = len(model.backbone.net.blocks)
    cfg = adapter_cfg(adapters_per_block=n, **overrides)
    # default width is automatic: min(64, d // 4), i.e. 24 for vitdet_tiny's d=96
    b = d // 8 if "reduction" in overrides else (cfg.bottleneck or min(64, d // 4))
    expected = closed_form(n, len(cfg.sites), depth, d, b)
    c = count_parameters(apply_method(model, cfg))
    assert c.by_group["peft"] == {"total": expected, "trainable": expected}
    assert c.total == before.total + expected
    assert c.by_group["backbone"] == {"total": before.by_group["backbone"]["total"], "trainable": 0}
    neck_heads = before.by_group["neck"]["total"] + before.by_group["task_heads"]["total"]
    assert c.trainable == expected + neck_heads
    assert all(a.down.out_features == b for s in adapter_stacks(model).values() for a in s)


def test_frozen_heads_train_only_adapters_and_zero_adds_none(base):
    c = count_parameters(apply_method(copy.deepcopy(base), adapter_cfg(train_task_layers=False)))
    assert c.trainable == c.by_group["peft"]["total"] > 0
    none = apply_method(copy.deepcopy(base), adapter_cfg(adapters_per_block=0))
    assert not adapter_stacks(none) and count_parameters(none).by_group["peft"]["total"] == 0


def test_base_parameter_names_unchanged_and_adapters_named_peft(base, model):
    model = apply_method(model, adapter_cfg())
    base_keys = set(base.state_dict())
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert all("peft_adapters." in k for k in keys - base_keys)
    assert "backbone.net.blocks.0.attn.peft_adapters.1.up.weight" in keys


def test_remove_adapters_restores_keys_and_outputs(base, model, batch, reference):
    x, feats, dets = reference
    model = apply_method(model, adapter_cfg(sites=["attn", "mlp_parallel"]))
    with torch.no_grad():
        for stack in adapter_stacks(model).values():
            for a in stack:
                a.up.bias.fill_(0.1)
        assert not torch.equal(model.backbone(x)["p3"], feats["p3"])
        remove_adapters(model)
        assert list(model.state_dict()) == list(base.state_dict())
        assert not adapter_stacks(model)
        assert all(not m._forward_hooks for m in model.modules())
        model.eval()
        assert_same_features(feats, model.backbone(x))
        assert_same_detections(dets, model(batch))


def test_deepcopy_and_pickle_keep_outputs(model, reference):
    x, feats, _ = reference
    model = apply_method(model, adapter_cfg(sites=["attn", "mlp_parallel"]))
    with torch.no_grad():
        for stack in adapter_stacks(model).values():
            torch.nn.init.normal_(stack[0].up.weight, std=0.05)
        want = model.backbone(x)
    assert not torch.equal(want["p3"], feats["p3"])
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        with torch.no_grad():
            assert_same_features(want, other.backbone(x))
        # the copy's hooks read the copy's adapters, not the original's
        remove_adapters(other)
        with torch.no_grad():
            assert_same_features(feats, other.backbone(x))
    with torch.no_grad():
        assert_same_features(want, model.backbone(x))


def test_tuple_outputs_adapt_element_zero_and_keep_the_rest(model):
    # other families' attention returns (hidden, weights): the hook sees it through the map
    model = apply_method(model, adapter_cfg(adapters_per_block=1, sites=["attn"]))
    attn = model.backbone.net.blocks[0].attn
    adapter: BottleneckAdapter = attn.peft_adapters[0]
    torch.nn.init.normal_(adapter.up.weight, std=0.1)
    weights = torch.randn(3)
    original = type(attn).forward
    attn.forward = lambda h: (original(attn, h), weights)
    h = torch.randn(1, 4, 4, attn.proj.in_features)
    with torch.no_grad():
        hidden, w = attn(h)
        plain = original(attn, h)
    assert w is weights
    assert torch.equal(hidden, adapter(plain))


def test_training_moves_exactly_the_trainable_parameters(model, tmp_path):
    batch = shapes_batch(tmp_path, n=2)
    model = apply_method(model, adapter_cfg(adapters_per_block=2, sites=["attn", "mlp_parallel"]))
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in names if "peft_adapters." in n} <= trainable
    assert not any(n.startswith("backbone.net.") and "peft_adapters." not in n for n in trainable)
    # every parameter is handed over and decay is off: a change can only come from a gradient
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    train_steps_and_check(model, batch, optimizer, trainable, "adapter")


@pytest.mark.parametrize("overrides,fix", [
    ({"adapters_per_block": -1}, r"method\.adapters_per_block must be an integer from 0 to 4"),
    ({"adapters_per_block": 5}, r"method\.adapters_per_block=2"),
    ({"bottleneck": -1}, r"method\.bottleneck=-1 is negative.*or 0 for the automatic"),
    ({"bottleneck": 96}, r"hidden width d=96 .*choose method\.bottleneck from 1 to 95"),
    ({"reduction": 0.5}, r"96 // 0\.5 = 192.*method\.reduction above 1"),
    ({"reduction": 4.0, "bottleneck": 32}, r"set only one of them: method\.reduction=0"),
    ({"reduction": -2.0}, r"method\.reduction must be 0 \(off\) or a positive number"),
    ({"sites": ["attn", "ffn"]}, r"\['ffn'\].*choose from \['attn', 'mlp', 'mlp_parallel'\]"),
    ({"sites": ["mlp", "mlp_parallel"]}, r"keep one of them, e\.g\. method\.sites=\[attn,mlp_parallel\]"),
    ({"sites": ["attn", "attn"]}, r"list each site once"),
    ({"sites": []}, r"list at least one adapter site"),
    ({"scale": float("inf")}, r"method\.scale must be a finite, non-zero number"),
    ({"scale": float("nan")}, r"method\.scale must be a finite"),
    ({"activation": "swish"}, r"choose one of \['gelu', 'relu'\], e\.g\. method\.activation=gelu"),
])
def test_bad_config_is_refused_with_the_fix(model, overrides, fix):
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(UserError, match=fix):
        apply_method(model, adapter_cfg(**overrides))
    assert [n for n, _ in model.named_parameters()] == names  # refused before attaching


def test_site_the_family_lacks_lists_the_sites_it_has(model):
    model.peftseg_facts.family = dataclasses.replace(
        model.peftseg_facts.family, adapter_sites={"attn": model.peftseg_facts.family.adapter_sites["attn"]}
    )
    with pytest.raises(UserError, match=r"defines no 'mlp' adapter site; the sites it has are: attn"):
        apply_method(model, adapter_cfg(sites=["attn", "mlp_parallel"]))
    assert not adapter_stacks(model)


def test_site_matching_nothing_is_refused(model):
    model.peftseg_facts.family = dataclasses.replace(
        model.peftseg_facts.family,
        adapter_sites={**model.peftseg_facts.family.adapter_sites, "mlp": r"backbone\.net\.layers\.\d+\.ffn"},
    )
    with pytest.raises(UserError, match=r"'mlp' .*matches no module.*sites of this family are: attn, mlp"):
        apply_method(model, adapter_cfg())
    assert not adapter_stacks(model)


def test_site_without_linear_or_width_mismatch_is_refused(model):
    family = model.peftseg_facts.family
    model.peftseg_facts.family = dataclasses.replace(
        family, adapter_sites={**family.adapter_sites, "attn": r"backbone\.net\.blocks\.\d+\.norm1"}
    )
    with pytest.raises(UserError, match=r"cannot infer the hidden width.*contains no nn\.Linear"):
        apply_method(model, adapter_cfg(sites=["attn"]))
    model.peftseg_facts.family = family
    # an AdaptFormer branch adds its delta to the MLP's output, so input and output widths must agree
    model.backbone.net.blocks[0].mlp.fc1 = torch.nn.Linear(48, 384)
    with pytest.raises(UserError, match=r"maps 48 to 96 features; use method\.sites=\[…,mlp\]"):
        apply_method(model, adapter_cfg(sites=["mlp_parallel"]))
    assert not adapter_stacks(model)


def test_applying_twice_is_refused(model):
    model = apply_method(model, adapter_cfg(adapters_per_block=1))
    with pytest.raises(UserError, match="already carries adapters"):
        apply_method(model, adapter_cfg(adapters_per_block=1))


def test_adapter_run_records_closed_form_params(tmp_path, shapes_cache):
    run_in_process(tmp_path, shapes_cache, "method=adapter", "method.adapters_per_block=2", "train.max_iter=10", "train.warmup_iters=0")
    (record,) = records_under(tmp_path)
    assert record["status"] == "ok"
    assert record["config"]["method.name"] == "adapter"
    tiny = preset("model", "vitdet_tiny", VitDetConfig)
    expected = closed_form(2, 2, tiny.depth, tiny.embed_dim, min(64, tiny.embed_dim // 4))
    assert record["params"]["by_group"]["peft"] == {"total": expected, "trainable": expected}
    assert 0.0 <= record["metrics"]["segm"]["AP"] <= 100.0
