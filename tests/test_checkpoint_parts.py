"""train.checkpoint_parts: the neck and heads recomputed in backward give the same losses and
gradients, keep fewer tensors for backward, and bad values are refused with the fix named."""

import pytest
import torch
from detectron2.utils.events import EventStorage

from helpers import preset, shapes_batch, ulps
from peftseg.build.activation_checkpointing import (
    checkpoint_block_names,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
)
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.registry import METHODS


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return shapes_batch(tmp_path_factory.mktemp("ckpt_parts"), n=2)


def losses_and_grads(model, batch):
    """Summed training loss and gradients, the RNG (drop path, RPN/ROI sampling, denoising
    queries) reset so two calls see the same draws; plus the bytes autograd saved for backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with EventStorage(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sum(model(batch).values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved.values())


# most_saved: the fraction of the plain run's saved bytes that may remain (maskdino's backbone
# and deformable encoder, not checkpointed here, keep most of its activations)
@pytest.mark.parametrize("model_name, parts, expect, most_saved", [
    ("vitdet_tiny", ("mlp", "neck", "heads"),
     ["backbone.net.blocks.0.mlp", "backbone.simfp_3", "proposal_generator.rpn_head", "roi_heads.box_head",
      "roi_heads.mask_head:layers"], 0.9),
    ("swin_tiny", ("neck", "heads"), ["backbone.fpn_lateral2", "backbone.fpn_output5", "proposal_generator.rpn_head"],
     0.9),
    ("maskdino_tiny", ("neck", "heads"),
     ["sem_seg_head.pixel_decoder.mask_features", "sem_seg_head.predictor:prediction_heads"], 0.97),
])
def test_neck_and_heads_checkpoint_to_the_same_loss_and_gradients(batch, model_name, parts, expect, most_saved):
    from peftseg.models import build_model

    torch.manual_seed(0)
    model = apply_method(build_model(preset("model", model_name), num_classes=3),
                         preset("method", "full", METHODS.get("full").config))
    plain_loss, plain, plain_saved = losses_and_grads(model, batch)
    names = enable_activation_checkpointing(model, parts)
    assert set(expect) <= set(names)
    loss, checked, saved = losses_and_grads(model, batch)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert plain.keys() == checked.keys() and len(plain) > 10
    # the neck's and heads' parameters are among those compared
    assert any(n.startswith(("backbone.simfp", "backbone.fpn", "sem_seg_head.pixel_decoder.mask_features")) for n in plain)
    for n in plain:
        # the recomputed forward runs the same kernels; a gradient sums batch x positions products,
        # so a few-ulp change in one (other blocking) shows up to ~64 ulps of its max
        torch.testing.assert_close(checked[n], plain[n], rtol=0, atol=ulps(plain[n], 64), msg=n)
    # what the recomputation is for: backward keeps fewer bytes (the checkpointed modules' inputs only)
    assert saved < most_saved * plain_saved, (saved, plain_saved)
    disable_activation_checkpointing(model)
    assert all(k not in m.__dict__ for m in model.modules() for k in ("forward", "layers", "prediction_heads"))


def test_parts_nest_and_mlp_is_the_backbone_mlp_only(base):
    names = checkpoint_block_names(base, ("blocks", "mlp"))
    assert names == [f"backbone.net.blocks.{i}" for i in range(4)]  # each MLP sits inside a listed block
    assert checkpoint_block_names(base, ("mlp",)) == [f"backbone.net.blocks.{i}.mlp" for i in range(4)]


@pytest.mark.parametrize("overrides, message", [
    (["train.activation_checkpointing=true", "train.checkpoint_parts=[neck,torso]"],
     "train.checkpoint_parts=['neck', 'torso'] names ['torso'], which is not a part. List one or more of "
     "['blocks', 'mlp', 'neck', 'heads'], each once"),
    (["train.activation_checkpointing=true", "train.checkpoint_parts=[]"], "train.checkpoint_parts=[] is empty."),
    (["train.activation_checkpointing=true", "train.checkpoint_parts=[neck,neck]"], "names a part twice."),
    (["train.checkpoint_parts=[neck,heads]"],
     "train.checkpoint_parts=['neck', 'heads'] is set but train.activation_checkpointing is false, so nothing "
     "would be checkpointed. Add train.activation_checkpointing=true, or drop the train.checkpoint_parts override."),
])
def test_checkpoint_parts_validation_names_the_fix(overrides, message):
    from peftseg.config import compose_config, validate

    cfg = compose_config(["model=vitdet_tiny", "method=full", "dataset=shapes", *overrides])
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_a_part_the_family_does_not_list_is_refused():
    from peftseg.models.family import FACTS_ATTR, ModelFacts
    from peftseg.models.mask2former import FAMILY

    # no model of the family needs building: only its FamilyMap is read, and no name matches
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    setattr(model, FACTS_ATTR, ModelFacts(family=FAMILY))
    with pytest.raises(UserError, match=r"model family 'mask2former' lists no checkpointable modules for the "
                                        r"part 'neck' \(FamilyMap.checkpoint_neck\) or none matches this model; "
                                        r"leave 'neck' out of train.checkpoint_parts"):
        enable_activation_checkpointing(model, ("neck",))
    assert not any("forward" in m.__dict__ for m in model.modules())  # refused before wrapping anything
