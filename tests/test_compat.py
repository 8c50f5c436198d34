"""Each private API of a dependency that peftseg.compat uses still exists and still means what
compat relies on: a dependency update that changes one fails here, naming it."""

from __future__ import annotations

import torch

from peftseg import compat


def test_detectron2_simple_trainer_makes_its_data_iterator_lazily_and_steps_take_from_it():
    from detectron2.engine import SimpleTrainer

    drawn = []

    class Loader:
        def __iter__(self):
            drawn.append("iter")
            return iter([[{"x": 1}], [{"x": 2}]])

    model = torch.nn.Linear(1, 1)
    trainer = SimpleTrainer(model, Loader(), torch.optim.SGD(model.parameters(), lr=0.1))
    assert drawn == []  # not made before it is asked for
    compat.start_data_iterator(trainer)
    assert drawn == ["iter"]
    assert compat.next_batch(trainer) == [{"x": 1}]
    assert compat.next_batch(trainer) == [{"x": 2}]
    assert drawn == ["iter"]  # made once: the steps draw from the same iterator


def test_transformers_mask2former_attention_calls_the_module_function_compat_routes():
    """The pixel decoder's attention module calls `multi_scale_deformable_attention` of its
    module by name, with (value, shapes, locations, weights): a routed kernel sees every call
    of a routed model's forward, and an unrouted model runs transformers' own function."""
    import inspect

    from transformers.models.mask2former import modeling_mask2former as mod

    forward = inspect.getsource(mod.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention.forward)
    assert "multi_scale_deformable_attention(value, spatial_shapes_list, sampling_locations, attention_weights)" \
        in forward
    assert list(inspect.signature(getattr(mod, "_peftseg_original_msda", mod.multi_scale_deformable_attention))
                .parameters)[:1] == ["value"]

    attn = mod.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(embed_dim=8, num_heads=2, n_levels=1,
                                                                            n_points=1)
    routed, plain = torch.nn.Sequential(attn), torch.nn.Sequential(
        mod.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(embed_dim=8, num_heads=2, n_levels=1,
                                                                         n_points=1))
    calls = []

    def kernel(original, *args):
        calls.append(len(args))
        return original(*args)

    assert compat.route_mask2former_deformable_attention(routed, kernel) == 1
    x, ref = torch.randn(1, 4, 8), torch.rand(1, 4, 1, 2)
    kwargs = dict(encoder_hidden_states=x, reference_points=ref, spatial_shapes_list=[(2, 2)],
                  level_start_index=torch.tensor([0]))
    routed[0](x, **kwargs)
    assert calls == [4]
    plain[0](x, **kwargs)
    assert calls == [4]  # another model's forward: transformers' function, untouched


def test_optuna_reopens_a_running_trial_that_reports_and_is_judged_like_the_one_asked_for():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from peftseg.experiments.study_storage import trial_id

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    study.ask()
    asked = study.ask()
    reopened = compat.reopen_trial(study, trial_id(storage, study.study_name, asked.number))
    reopened.report(0.1, step=3)
    assert reopened.number == asked.number and reopened.should_prune()
    assert study.get_trials()[1].intermediate_values == {3: 0.1} and not study.get_trials()[0].intermediate_values


def test_static_image_padding_pads_as_detectron2_does_and_is_undone():
    from detectron2.structures import ImageList

    original = ImageList.__dict__["from_tensors"]
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 40)]
    for kwargs in ({}, {"size_divisibility": 32}, {"padding_constraints": {"square_size": 96}},
                   {"size_divisibility": 16, "padding_constraints": {"size_divisibility": 32, "square_size": 0}}):
        want = ImageList.from_tensors(images, **kwargs)
        with compat.static_image_padding():
            got = ImageList.from_tensors(images, **kwargs)
        assert torch.equal(got.tensor, want.tensor), kwargs
        assert [tuple(map(int, s)) for s in got.image_sizes] == [tuple(map(int, s)) for s in want.image_sizes]
    assert ImageList.__dict__["from_tensors"] is original


def test_peft_lora_takes_a_registered_layer_class_for_a_module_type_before_its_own():
    """A registered custom LoRA layer wraps the modules of its type (subclasses of nn.Conv2d
    included); the other modules keep peft's own layers."""
    import peft
    from detectron2.layers import Conv2d as D2Conv2d

    class Marked(peft.tuners.lora.Conv2d):
        pass

    model = torch.nn.Sequential()
    model.add_module("d2", D2Conv2d(3, 4, 3, norm=torch.nn.GroupNorm(2, 4)))
    model.add_module("plain", torch.nn.Conv2d(4, 4, 1))
    cfg = peft.LoraConfig(r=2, target_modules=["d2", "plain"])
    compat.register_custom_lora_layers(cfg, {D2Conv2d: Marked})
    model = peft.inject_adapter_in_model(cfg, model)
    assert type(model.d2) is Marked and type(model.plain) is peft.tuners.lora.Conv2d
    assert model.d2.base_layer.norm is not None  # the wrapped layer is the detectron2 one, whole
