"""No code runs from a file: crafted pickles whose __reduce__ would create a marker file are
refused (naming the file and what it asked for) through every load site: eval, merge,
resume and model.weights (.pth, .pkl); honest files still load (.pkl arrays, .safetensors
with compile/DDP prefixes); a URL that never answers times out with a fix."""

import pickle
import socket
import threading

import numpy as np
import pytest
import safetensors.torch
import torch

from peftseg.cli import main as cli_main
from peftseg.io.download import fetch
from peftseg.checkpoint.files import PeftCheckpointer
from peftseg.errors import UserError
from peftseg.models._weights import load_weights


class MakesMarker:
    """Unpickling this calls open(marker, "w"): the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a load site executed code from a pickle"


def evil_pth(tmp_path, marker, peftseg_meta=True):
    path = tmp_path / "model_final.pth"
    data = {"model": {"w": torch.zeros(2)}, "payload": MakesMarker(marker)}
    if peftseg_meta:
        data["peftseg"] = {"format": 1}
    torch.save(data, path)
    return path


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_eval_and_merge_refuse_a_code_carrying_checkpoint(tmp_path, marker, command, capsys):
    path = evil_pth(tmp_path, marker)
    assert cli_main([command, f"checkpoint={path}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(path) in err and "io.open" in err and "safetensors" in err


def test_resume_refuses_a_code_carrying_checkpoint(tmp_path, marker, model):
    path = evil_pth(tmp_path, marker)
    with pytest.raises(UserError, match="asks for io.open"):
        PeftCheckpointer(model, meta={}).load_peft(path, {})  # what train.resume=<file> calls


def test_model_weights_pth_is_loaded_without_code(tmp_path, marker, model):
    path = evil_pth(tmp_path, marker, peftseg_meta=False)
    with pytest.raises(UserError, match=r"model.weights .*model_final.pth was not loaded.*io.open"):
        load_weights(model, str(path))


def test_model_weights_pkl_admits_arrays_only(tmp_path, marker, model):
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "__author__": "x", "p": MakesMarker(marker)}, f, protocol=2)
    with pytest.raises(UserError, match=r"evil.pkl was not loaded.*io.open"):
        load_weights(model, str(evil))
    # an honest detectron2 model-zoo .pkl (numpy arrays, protocol 2 as the zoo's are) loads
    state = {k: v.numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}
    zoo = tmp_path / "zoo.pkl"
    with open(zoo, "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f, protocol=2)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    report = load_weights(model, str(zoo))
    assert not report.missing and not report.shape_mismatch
    k = "backbone.net.blocks.0.attn.qkv.weight"
    assert np.array_equal(model.state_dict()[k].numpy(), state[k])


def test_safetensors_with_compile_and_ddp_prefixes_loads(tmp_path, model):
    want = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({f"module._orig_mod.{k}": v.contiguous() for k, v in want.items()}, path)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    report = load_weights(model, str(path))
    assert not report.missing and not report.unexpected
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())


def test_a_peftseg_checkpoint_as_model_weights_is_refused(tmp_path, model):
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"backbone.net.blocks.0.attn.qkv.lora_A.default.weight": torch.zeros(2, 2)},
                "peftseg": {"format": 1}}, path)
    with pytest.raises(UserError, match="peftseg PEFT checkpoint.*train.resume"):
        load_weights(model, str(path))


def test_truncated_weights_name_the_file(tmp_path, model):
    path = tmp_path / "cut.pth"
    torch.save({"model": model.state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="cut.pth"):
        load_weights(model, str(path))


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/weights/model.pth"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_url_that_never_answers_times_out_with_a_fix(silent_server, tmp_path, monkeypatch, model):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"did not answer within 0.5 s.*curl -L -o model.pth"):
        fetch(silent_server, timeout=0.5)
    monkeypatch.setattr("peftseg.io.download.TIMEOUT_S", 0.5)
    with pytest.raises(UserError, match="did not answer"):
        load_weights(model, silent_server)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))  # no partial file left


def test_a_peftseg_final_safetensors_as_model_weights_is_refused(tmp_path, model):
    from peftseg.checkpoint.formats import checkpoint_metadata, safetensors_bytes

    path = tmp_path / "model_final.safetensors"
    path.write_bytes(safetensors_bytes({"roi_heads.box_predictor.cls_score.bias": torch.zeros(4)},
                                       checkpoint_metadata({"format": 1})))
    with pytest.raises(UserError, match="peftseg PEFT checkpoint"):
        load_weights(model, str(path))
