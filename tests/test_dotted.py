"""One flattening of nested values into dotted keys, for records, CSV, resume checks and results."""

from peftseg.dotted import flatten


def test_nested_dicts_become_dotted_keys_under_the_prefix():
    nested = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}
    assert flatten(nested) == {"a.b": 1, "a.c.d": [1, 2]}  # an empty dict adds no key
    assert flatten(nested, "p") == {"p.a.b": 1, "p.a.c.d": [1, 2]}
    assert flatten(3, "p") == {"p": 3}


def test_depth_keeps_deeper_dicts_as_one_value_and_lists_open_on_request():
    nested = {"method": {"name": "adapter_lora", "lora": {"rank": 4}, "targets": ["mlp"]}}
    assert flatten(nested, depth=2) == {"method.name": "adapter_lora", "method.lora": {"rank": 4},
                                        "method.targets": ["mlp"]}
    assert flatten({"segm": {"AP": [1.0, {"x": 2.0}]}}, lists=True) == {"segm.AP[0]": 1.0, "segm.AP[1].x": 2.0}
