"""Every training output format loads back with plain diffusers / torch / safetensors."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from recare.train.export import (
    model_fingerprint, read_learned_token, read_trained_params_header, save_learned_token, save_learned_tokens,
    save_official_pt, save_trained_params, save_unet_folder,
)
from recare.train.textual_inversion import LearnedToken
from tests.helpers_tiny import TINY_HIDDEN, build_tiny_pipeline, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def pipe(tokenizer_dir):
    return build_tiny_pipeline(seed=0, tokenizer_dir=tokenizer_dir)


def trained_copy(unet: torch.nn.Module, pattern: str = "attn2") -> tuple[torch.nn.Module, list[str]]:
    """A copy of `unet` whose tensors with `pattern` in their name changed (as xattn training would)."""
    trained = copy.deepcopy(unet)
    changed = []
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if pattern in name:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(changed))))
                changed.append(name)
    return trained, changed


def full_size(unet, tmp_path) -> int:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "full.safetensors"))
    return (tmp_path / "full.safetensors").stat().st_size


# ---- learned tokens -----------------------------------------------------------------------------

def test_token_files_load_with_diffusers(pipe, tmp_path):
    tokens = [LearnedToken("<v1*>", "a", torch.randn(TINY_HIDDEN), (0.5, 0.4)),
              LearnedToken("<v2*>", "a", torch.randn(TINY_HIDDEN), (0.3,))]
    files = save_learned_tokens(tokens, tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["tokens/v1.safetensors", "tokens/v2.safetensors"]
    assert set(load_file(files[0])) == {"<v1*>"} and load_file(files[0])["<v1*>"].shape == (TINY_HIDDEN,)

    rows = pipe.text_encoder.get_input_embeddings().num_embeddings
    for token, f in zip(tokens, files):
        pipe.load_textual_inversion(str(f), token=token.placeholder)   # plain diffusers
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == rows + 2
    for token in tokens:
        token_id = pipe.tokenizer.convert_tokens_to_ids(token.placeholder)
        assert torch.equal(weight[token_id].detach(), token.embedding)
    ids = pipe.tokenizer("a photo of a <v2*>").input_ids
    assert pipe.tokenizer.convert_tokens_to_ids("<v2*>") in ids

    again = read_learned_token(files[0])
    assert again.placeholder == "<v1*>" and again.initializer == "a"
    assert torch.equal(again.embedding, tokens[0].embedding)


def test_token_files_load_through_recare_models(tokenizer_dir, tmp_path):
    from recare.models import load_learned_tokens

    save_learned_tokens([LearnedToken("<v1*>", "a", torch.ones(TINY_HIDDEN))], tmp_path)
    fresh = build_tiny_pipeline(seed=0, tokenizer_dir=tokenizer_dir)
    assert load_learned_tokens(fresh, tmp_path) == ["<v1*>"]


def test_token_header_records_what_made_it(tmp_path):
    from safetensors import safe_open

    token = LearnedToken("<v*>", "person", torch.zeros(4), (1.0, 0.5, 0.25))
    path = save_learned_token(token, tmp_path / "t.safetensors", metadata={"round": 1})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "recare-learned-token" and meta["placeholder"] == "<v*>"
    assert meta["initializer"] == "person" and meta["steps"] == "3" and meta["round"] == "1"


# ---- trained_params.safetensors -----------------------------------------------------------------

def test_trained_params_hold_only_changed_tensors_and_apply_with_load_state_dict(pipe, tokenizer_dir, tmp_path):
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    trained, changed = trained_copy(pipe.unet)
    path = save_trained_params(trained, base_state, tmp_path / "trained_params.safetensors",
                               train_method="xattn", metadata={"method": "recare", "steps": 3})
    tensors = load_file(path)
    assert sorted(tensors) == sorted(changed) and len(changed) > 0

    fresh = build_tiny_pipeline(seed=0, tokenizer_dir=tokenizer_dir).unet   # the base again, from scratch
    result = fresh.load_state_dict(load_file(path), strict=False)
    assert not result.unexpected_keys
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert path.stat().st_size < 0.5 * full_size(pipe.unet, tmp_path)

    header = read_trained_params_header(path)
    assert header["format"] == "recare-trained-params" and header["format_version"] == "1"
    assert header["base_fingerprint"] == model_fingerprint(pipe.unet) and header["train_method"] == "xattn"
    assert header["tensors"] == str(len(changed)) and header["method"] == "recare" and header["steps"] == "3"


def test_trained_params_by_names(pipe, tmp_path):
    trained, changed = trained_copy(pipe.unet)
    path = save_trained_params(trained, changed, tmp_path / "p.safetensors", train_method="xattn",
                               base_fingerprint=model_fingerprint(pipe.unet))
    assert sorted(load_file(path)) == sorted(changed)
    with pytest.raises(TypeError, match="base_fingerprint"):
        save_trained_params(trained, changed, tmp_path / "q.safetensors", train_method="xattn")
    with pytest.raises(ValueError, match="not a UNet state-dict name"):
        save_trained_params(trained, ["attn2.nope"], tmp_path / "q.safetensors", train_method="xattn",
                            base_fingerprint="x")


def test_trained_params_apply_through_recare_models(pipe, tmp_path):
    from recare.models import apply_trained

    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    trained, _ = trained_copy(pipe.unet, pattern="conv")
    save_trained_params(trained, base_state, tmp_path / "trained_params.safetensors", train_method="noxattn")
    apply_trained(pipe.unet, tmp_path)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in pipe.unet.state_dict().items())


def test_a_failed_write_keeps_the_previous_file(pipe, tmp_path, monkeypatch):
    import safetensors.torch

    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    trained, _ = trained_copy(pipe.unet)
    path = save_trained_params(trained, base_state, tmp_path / "trained_params.safetensors", train_method="xattn")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_trained_params(trained, base_state, path, train_method="xattn")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained_params.safetensors"]   # no temp file left


# ---- full UNet formats --------------------------------------------------------------------------

def test_unet_folder_loads_with_from_pretrained(pipe, tmp_path):
    from diffusers import UNet2DConditionModel

    trained, _ = trained_copy(pipe.unet)
    save_unet_folder(pipe.unet, tmp_path / "unet")
    save_unet_folder(trained, tmp_path / "unet")          # replaces the folder as a whole
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["unet"]


def test_official_pt_loads_with_torch_load(pipe, tmp_path):
    trained, _ = trained_copy(pipe.unet)
    path = save_official_pt(trained, tmp_path / "ReCARE-Diffusers-UNet.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == set(pipe.unet.state_dict())
    fresh = copy.deepcopy(pipe.unet)
    fresh.load_state_dict(state)                           # strict: every tensor is there
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())


# ---- fingerprint --------------------------------------------------------------------------------

def test_fingerprint_tells_models_apart_and_ignores_the_dtype(pipe, tokenizer_dir):
    fp = model_fingerprint(pipe.unet)
    assert fp.startswith("sha256:") and len(fp) == 7 + 16
    assert model_fingerprint(copy.deepcopy(pipe.unet)) == fp
    assert model_fingerprint(pipe.unet.state_dict()) == fp
    assert model_fingerprint(copy.deepcopy(pipe.unet).half()) == fp       # fp16 copy of the same weights
    trained, _ = trained_copy(pipe.unet)
    assert model_fingerprint(trained) != fp
    assert model_fingerprint(build_tiny_pipeline(seed=1, tokenizer_dir=tokenizer_dir).unet) != fp
