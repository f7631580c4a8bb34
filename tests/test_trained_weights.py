"""Trained UNet weights in every format recare.train writes, applied to a base model; learned tokens."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re

import pytest
import torch
from safetensors.torch import save_file

from recare.models import (
    DIFFUSERS_UNET, OFFICIAL_UNET_FILE, STATE_DICT, TRAINED_PARAMS, TRAINED_PARAMS_FILE, ModelLoadError,
    apply_trained, derive_pipeline, find_trained_weights, load_learned_tokens, load_pipeline,
    load_trained_unet_state,
)
from tests.helpers_tiny import TINY_HIDDEN, make_tiny_pipeline

CHANGED = ("conv_in.weight", "down_blocks.1.attentions.0.proj_in.weight", "up_blocks.0.resnets.0.conv1.bias")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


@pytest.fixture
def base(tiny_dir):
    return load_pipeline(tiny_dir, device="cpu")


def snapshot(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def trained_subset(unet, seed: int = 1) -> dict[str, torch.Tensor]:
    """New values for a few UNet tensors, as a training run would change them."""
    gen = torch.Generator().manual_seed(seed)
    state = unet.state_dict()
    return {name: state[name] + torch.randn(state[name].shape, generator=gen) for name in CHANGED}


def trained_full(unet, seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in unet.state_dict().items()}


def write_params(folder, tensors, **metadata):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / TRAINED_PARAMS_FILE),
              metadata={"format": "recare-trained-params", **metadata})
    return folder / TRAINED_PARAMS_FILE


def assert_state(unet, expected: dict[str, torch.Tensor]):
    state = unet.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


# ---------------------------------------------------------------------------------------------
# the three formats and the run folder


def test_trained_params_subset_changes_only_its_tensors(base, tmp_path):
    before = snapshot(base.unet)
    subset = trained_subset(base.unet)
    path = write_params(tmp_path / "run", subset)

    applied = apply_trained(base.unet, tmp_path / "run")

    assert applied.format == TRAINED_PARAMS and applied.path == path
    assert_state(base.unet, subset)
    unchanged = {k: v for k, v in before.items() if k not in subset}
    assert_state(base.unet, unchanged)
    assert not torch.equal(before[CHANGED[0]], subset[CHANGED[0]])


def test_load_trained_unet_state_returns_the_subset_without_applying(base, tmp_path):
    before = snapshot(base.unet)
    subset = trained_subset(base.unet)
    state = load_trained_unet_state(write_params(tmp_path, subset), base.unet)
    assert set(state) == set(CHANGED)
    assert all(torch.equal(state[k], subset[k]) for k in CHANGED)
    assert_state(base.unet, before)


@pytest.mark.parametrize("layout", ["unet-folder", "run-with-unet", "sharded"])
def test_diffusers_unet_folder(base, tiny_dir, tmp_path, layout):
    donor = load_pipeline(tiny_dir, device="cpu").unet
    full = trained_full(donor)
    donor.load_state_dict(full)
    run = tmp_path / "run"
    shard = {"max_shard_size": "20KB"} if layout == "sharded" else {}
    donor.save_pretrained(run / "unet", **shard)
    if layout == "sharded":
        assert (run / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    target = run / "unet" if layout == "unet-folder" else run

    applied = apply_trained(base.unet, target)

    assert applied.format == DIFFUSERS_UNET and applied.path == run / "unet"
    assert_state(base.unet, full)


def test_official_pt_full_state_dict(base, tmp_path):
    full = trained_full(base.unet)
    torch.save(full, tmp_path / OFFICIAL_UNET_FILE)

    applied = apply_trained(base.unet, tmp_path)  # a run folder holding only the official file

    assert applied.format == STATE_DICT
    assert_state(base.unet, full)


def test_run_folder_prefers_params_then_unet_then_pt(base, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(trained_full(base.unet), run / OFFICIAL_UNET_FILE)
    assert find_trained_weights(run).format == STATE_DICT
    base.unet.save_pretrained(run / "unet")
    assert find_trained_weights(run).format == DIFFUSERS_UNET
    write_params(run, trained_subset(base.unet))
    assert find_trained_weights(run).format == TRAINED_PARAMS


def test_load_pipeline_with_trained(tiny_dir, base, tmp_path):
    subset = trained_subset(base.unet)
    write_params(tmp_path / "run", subset)
    pipe = load_pipeline(tiny_dir, device="cpu", trained=tmp_path / "run")
    assert_state(pipe.unet, subset)
    assert not torch.equal(base.unet.state_dict()[CHANGED[0]], subset[CHANGED[0]])  # separate loads


def test_fp16_base_takes_fp32_trained_tensors(tiny_dir, tmp_path):
    pipe = load_pipeline(tiny_dir, device="cpu", dtype="fp16")
    fp32 = load_pipeline(tiny_dir, device="cpu").unet
    subset = trained_subset(fp32)
    apply_trained(pipe.unet, write_params(tmp_path, subset))
    assert pipe.unet.dtype == torch.float16
    assert_state(pipe.unet, {k: v.half() for k, v in subset.items()})


def test_written_by_the_trainer_and_read_back(base, tiny_dir, tmp_path):
    """recare.train.export writes the run outputs; each loads back onto the base it came from."""
    from recare.train.export import save_official_pt, save_trained_params, save_unet_folder

    trained = load_pipeline(tiny_dir, device="cpu").unet
    base_state = snapshot(trained)
    trained.load_state_dict(trained_subset(trained), strict=False)
    for name, writer in [("params", lambda p: save_trained_params(trained, base_state, p / TRAINED_PARAMS_FILE,
                                                                   train_method="noxattn")),
                         ("unet", lambda p: save_unet_folder(trained, p / "unet")),
                         ("pt", lambda p: save_official_pt(trained, p / OFFICIAL_UNET_FILE))]:
        fresh = load_pipeline(tiny_dir, device="cpu").unet
        writer(tmp_path / name)
        apply_trained(fresh, tmp_path / name)
        assert_state(fresh, trained.state_dict())


def test_same_architecture_other_base_is_refused_by_fingerprint(tiny_dir, tmp_path):
    """Same names and shapes (think SD v1.4 vs v1.5): only the recorded base fingerprint tells them apart."""
    from recare.train.export import save_trained_params

    other_dir = make_tiny_pipeline(tmp_path / "other-base", seed=7)
    trained = load_pipeline(other_dir, device="cpu").unet
    base_state = snapshot(trained)
    trained.load_state_dict(trained_subset(trained), strict=False)
    save_trained_params(trained, base_state, tmp_path / "run" / TRAINED_PARAMS_FILE, train_method="noxattn")

    base = load_pipeline(tiny_dir, device="cpu").unet
    before = snapshot(base)
    with pytest.raises(ModelLoadError, match="trained from another base model: its header records the base UNet sha256:"):
        apply_trained(base, tmp_path / "run")
    assert_state(base, before)
    apply_trained(base, tmp_path / "run", check_base=False)  # the user insists
    assert_state(base, {k: v for k, v in trained.state_dict().items() if k in CHANGED})
    fp16 = load_pipeline(other_dir, device="cpu", dtype="fp16").unet
    apply_trained(fp16, tmp_path / "run")  # the same base in fp16 has the same fingerprint


# ---------------------------------------------------------------------------------------------
# checkpoints that do not fit, damaged files


def test_tensor_of_another_shape_is_named_and_nothing_changes(base, tmp_path):
    before = snapshot(base.unet)
    bad = trained_subset(base.unet)
    bad[CHANGED[1]] = torch.zeros(3, 3)
    path = write_params(tmp_path, bad, base_model="some/other-model")
    with pytest.raises(ModelLoadError, match=re.escape(f"tensor '{CHANGED[1]}' has shape [3, 3] in the checkpoint")) as info:
        apply_trained(base.unet, path)
    assert "trained on another base model (base_model=some/other-model)" in str(info.value)
    assert_state(base.unet, before)


def test_unknown_tensor_is_named(base, tmp_path):
    bad = {"mid_block.no_such_layer.weight": torch.zeros(2)}
    with pytest.raises(ModelLoadError, match=r"tensor 'mid_block.no_such_layer.weight' is not in the base UNet.*another base"):
        apply_trained(base.unet, write_params(tmp_path, bad))


def test_full_state_dict_missing_a_tensor_is_named(base, tmp_path):
    full = trained_full(base.unet)
    first = next(iter(full))
    del full[first]
    torch.save(full, tmp_path / "unet.pt")
    with pytest.raises(ModelLoadError, match=re.escape(f"lacks the base UNet's tensor '{first}' (1 of")):
        apply_trained(base.unet, tmp_path / "unet.pt")


def test_unet_of_another_architecture(base, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_HIDDEN, norm_num_groups=2,
    )
    torch.save(other.state_dict(), tmp_path / OFFICIAL_UNET_FILE)
    with pytest.raises(ModelLoadError, match=r"tensor 'conv_in.weight' has shape \[8, 4, 3, 3\].*\[4, 4, 3, 3\]"):
        apply_trained(base.unet, tmp_path)


@pytest.mark.parametrize("name", [TRAINED_PARAMS_FILE, OFFICIAL_UNET_FILE])
def test_truncated_file(base, tmp_path, name):
    if name == TRAINED_PARAMS_FILE:
        whole = write_params(tmp_path / "src", trained_subset(base.unet)).read_bytes()
    else:
        torch.save(trained_full(base.unet), tmp_path / "whole.pt")
        whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelLoadError, match="damaged or incomplete"):
        apply_trained(base.unet, tmp_path / "run")


def test_pt_that_is_not_a_state_dict(base, tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "x.pt")
    with pytest.raises(ModelLoadError, match="is not a state dict"):
        apply_trained(base.unet, tmp_path / "x.pt")


def test_folder_without_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(ModelLoadError, match="holds no trained UNet weights"):
        find_trained_weights(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        find_trained_weights(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="not a trained-weights file"):
        find_trained_weights(tmp_path / "notes.txt")


# ---------------------------------------------------------------------------------------------
# learned textual-inversion tokens


def write_token(folder, placeholder, embedding):
    folder.mkdir(parents=True, exist_ok=True)
    name = placeholder.strip("<>*")
    save_file({placeholder: embedding.contiguous()}, str(folder / f"{name}.safetensors"))


def test_load_learned_tokens(base, tmp_path):
    gen = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(TINY_HIDDEN, generator=gen), torch.randn(TINY_HIDDEN, generator=gen)
    write_token(tmp_path / "run" / "tokens", "<v1*>", v1)
    write_token(tmp_path / "run" / "tokens", "<v2*>", v2)
    vocab_before = len(base.tokenizer)

    added = load_learned_tokens(base, tmp_path / "run")

    assert added == ["<v1*>", "<v2*>"]
    assert len(base.tokenizer) == vocab_before + 2
    rows = base.text_encoder.get_input_embeddings().weight
    for placeholder, embedding in zip(added, (v1, v2)):
        ids = base.tokenizer(f"a photo of {placeholder}").input_ids
        token_id = base.tokenizer.convert_tokens_to_ids(placeholder)
        assert token_id in ids
        assert torch.equal(rows[token_id], embedding)


@pytest.mark.parametrize("problem, message", [
    ("width", "has width 7 but this text encoder's is 32"),
    ("two", "holds 2 tensors"),
    ("known", "already has"),
    ("none", "no learned tokens"),
])
def test_bad_token_files_leave_the_pipeline_unchanged(base, tmp_path, problem, message):
    tokens = tmp_path / "tokens"
    write_token(tokens, "<ok*>", torch.zeros(TINY_HIDDEN))
    if problem == "width":
        write_token(tokens, "<w*>", torch.zeros(7))
    elif problem == "two":
        save_file({"<a*>": torch.zeros(TINY_HIDDEN), "<b*>": torch.zeros(TINY_HIDDEN)}, str(tokens / "z.safetensors"))
    elif problem == "known":  # the same run's tokens loaded twice: "<ok*>" is there already, "<new*>" must not be added
        assert load_learned_tokens(base, tmp_path) == ["<ok*>"]
        write_token(tokens, "<new*>", torch.zeros(TINY_HIDDEN))
    else:
        (tokens / "ok.safetensors").unlink()
    vocab_before = len(base.tokenizer)
    with pytest.raises(ModelLoadError, match=message):
        load_learned_tokens(base, tmp_path)
    assert len(base.tokenizer) == vocab_before  # checked before anything was added


# ---------------------------------------------------------------------------------------------
# deriving a pipeline leaves the base as it was


def test_derive_pipeline_keeps_base_and_shares_read_only_parts(base, tmp_path):
    before = snapshot(base.unet)
    vocab_before = len(base.tokenizer)
    subset = trained_subset(base.unet)
    write_params(tmp_path / "run", subset)
    write_token(tmp_path / "run" / "tokens", "<v1*>", torch.ones(TINY_HIDDEN))

    derived = derive_pipeline(base, trained=tmp_path / "run", learned_tokens=tmp_path / "run")

    assert_state(base.unet, before)
    assert len(base.tokenizer) == vocab_before
    assert_state(derived.unet, subset)
    assert derived.unet is not base.unet and derived.scheduler is not base.scheduler
    assert derived.vae is base.vae
    assert derived.text_encoder is not base.text_encoder and "<v1*>" in derived.tokenizer.get_vocab()
    shared = derive_pipeline(base, trained=tmp_path / "run")
    assert shared.text_encoder is base.text_encoder and shared.tokenizer is base.tokenizer
    out = derived("a photo of <v1*>", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
