"""The model cache: per-key loads that never block other keys' hits, LRU bounds, trained pipelines derived from
a cached base without changing it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threading

import pytest
import torch
from safetensors.torch import save_file

from recare.model_cache import ModelCache, PipelineKey
from recare.models import TRAINED_PARAMS_FILE, ModelLoadError
from tests.helpers_tiny import TINY_HIDDEN, make_tiny_pipeline

WAIT_S = 5.0  # generous bound on what must happen at once; a blocked call would wait forever instead


class FakeLoader:
    """A pipeline loader whose load of a name in `slow` blocks until `release` is set; counts its calls."""

    def __init__(self, slow=()):
        self.slow = set(slow)
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[tuple] = []
        self.fail: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, name, device=None, dtype=None, variant=None):
        with self._lock:
            self.calls.append((name, str(device), str(dtype), variant))
        if name in self.fail:
            raise ModelLoadError(f"cannot load {name}")
        if name in self.slow:
            self.started.set()
            assert self.release.wait(WAIT_S), "the test never released the slow load"
        return {"model": name, "dtype": str(dtype), "variant": variant}

    def count(self, name):
        return sum(1 for call in self.calls if call[0] == name)


def in_thread(fn, *args, **kwargs):
    """Run fn in a daemon thread; returns (thread, result list, error list)."""
    result, error = [], []

    def run():
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001  (handed back to the test)
            error.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result, error


@pytest.fixture
def loader():
    fake = FakeLoader(slow={"A"})
    yield fake
    fake.release.set()  # never leave a thread waiting


def test_slow_load_does_not_block_a_hit_on_another_key(loader):
    cache = ModelCache(device="cpu", pipeline_loader=loader)
    b = cache.pipeline("B")
    slow, slow_result, _ = in_thread(cache.pipeline, "A")
    assert loader.started.wait(WAIT_S)

    hit, hit_result, hit_error = in_thread(cache.pipeline, "B")
    hit.join(WAIT_S)

    assert not hit.is_alive() and not hit_error, "a hit on B waited for A's load"
    assert hit_result == [b] and hit_result[0] is b
    assert slow.is_alive() and not slow_result  # A is still loading
    loader.release.set()
    slow.join(WAIT_S)
    assert slow_result == [{"model": "A", "dtype": "torch.float32", "variant": None}]


def test_two_keys_load_at_the_same_time(loader):
    cache = ModelCache(device="cpu", pipeline_loader=loader)
    slow, slow_result, _ = in_thread(cache.pipeline, "A")
    assert loader.started.wait(WAIT_S)

    other, other_result, _ = in_thread(cache.pipeline, "C")  # a miss: its own load runs beside A's
    other.join(WAIT_S)

    assert not other.is_alive() and other_result[0]["model"] == "C"
    assert slow.is_alive()
    loader.release.set()
    slow.join(WAIT_S)
    assert [k.name for k in cache.cached_pipelines()] == ["C", "A"]


def test_same_key_is_loaded_once_for_concurrent_callers(loader):
    cache = ModelCache(device="cpu", pipeline_loader=loader)
    first, first_result, _ = in_thread(cache.pipeline, "A")
    assert loader.started.wait(WAIT_S)
    second, second_result, _ = in_thread(cache.pipeline, "A")
    loader.release.set()
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert loader.count("A") == 1
    assert first_result[0] is second_result[0]


def test_failed_load_is_reported_and_not_cached(loader):
    cache = ModelCache(device="cpu", pipeline_loader=loader)
    loader.fail.add("broken")
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="cannot load broken"):
            cache.pipeline("broken")
    assert loader.count("broken") == 2
    assert cache.cached_pipelines() == []


def test_least_recently_used_is_dropped(loader):
    cache = ModelCache(device="cpu", max_pipelines=2, pipeline_loader=loader)
    cache.pipeline("B")
    cache.pipeline("C")
    cache.pipeline("B")          # B is now the most recently used
    cache.pipeline("D")          # drops C
    assert [k.name for k in cache.cached_pipelines()] == ["B", "D"]
    cache.pipeline("B")
    assert loader.count("B") == 1
    cache.pipeline("C")
    assert loader.count("C") == 2  # C was dropped, so it loads again


def test_key_is_name_device_dtype_variant(loader, tmp_path, monkeypatch):
    cache = ModelCache(device="cpu", pipeline_loader=loader)
    folder = tmp_path / "model"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    same = [cache.pipeline("model"), cache.pipeline("./model"), cache.pipeline(str(folder))]
    assert same[0] is same[1] is same[2]
    fp16 = cache.pipeline("model", dtype="fp16")
    variant = cache.pipeline("model", variant="fp16")
    assert len({id(same[0]), id(fp16), id(variant)}) == 3
    assert fp16["dtype"] == "torch.float16" and variant["variant"] == "fp16"
    assert cache.pipeline_key("model", dtype="fp16") == PipelineKey(str(folder), "cpu", "torch.float16")


def test_encoders_are_cached_per_name_and_device():
    calls = []
    cache = ModelCache(device="cpu", max_encoders=1, encoder_loader=lambda name, device: calls.append(name) or name)
    assert cache.encoder("mini-world") == cache.encoder(" mini-world ") == "mini-world"
    cache.encoder("other")
    cache.encoder("mini-world")
    assert calls == ["mini-world", "other", "mini-world"]


# ---------------------------------------------------------------------------------------------
# trained pipelines from a real (tiny) base


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


def write_trained(run, unet, seed):
    gen = torch.Generator().manual_seed(seed)
    state = unet.state_dict()
    names = ["conv_in.weight", "mid_block.resnets.0.conv1.weight"]
    changed = {n: (state[n] + torch.randn(state[n].shape, generator=gen)).contiguous() for n in names}
    run.mkdir(parents=True, exist_ok=True)
    save_file(changed, str(run / TRAINED_PARAMS_FILE))
    return changed


def test_trained_pipeline_leaves_the_cached_base_unchanged(tiny_dir, tmp_path):
    cache = ModelCache(device="cpu")
    base = cache.pipeline(tiny_dir)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    changed = write_trained(tmp_path / "run", base.unet, seed=1)

    trained = cache.pipeline(tiny_dir, trained=tmp_path / "run")

    for name, tensor in base.unet.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    for name, tensor in changed.items():
        assert torch.equal(trained.unet.state_dict()[name], tensor)
    assert cache.pipeline(tiny_dir) is base
    assert cache.pipeline(tiny_dir, trained=tmp_path / "run") is trained  # cached too
    assert trained.vae is base.vae and trained.text_encoder is base.text_encoder
    assert trained.tokenizer is base.tokenizer
    assert trained.unet is not base.unet and trained.scheduler is not base.scheduler
    assert trained.scheduler.config == base.scheduler.config


def test_rewritten_trained_weights_are_a_new_entry(tiny_dir, tmp_path):
    cache = ModelCache(device="cpu")
    base = cache.pipeline(tiny_dir)
    write_trained(tmp_path / "run", base.unet, seed=1)
    first = cache.pipeline(tiny_dir, trained=tmp_path / "run")
    newer = write_trained(tmp_path / "run", base.unet, seed=2)
    st = (tmp_path / "run" / TRAINED_PARAMS_FILE).stat()
    os.utime(tmp_path / "run" / TRAINED_PARAMS_FILE, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = cache.pipeline(tiny_dir, trained=tmp_path / "run")
    assert second is not first
    assert torch.equal(second.unet.state_dict()["conv_in.weight"], newer["conv_in.weight"])


def test_learned_tokens_go_into_copies(tiny_dir, tmp_path):
    cache = ModelCache(device="cpu")
    base = cache.pipeline(tiny_dir)
    (tmp_path / "run" / "tokens").mkdir(parents=True)
    save_file({"<v1*>": torch.ones(TINY_HIDDEN)}, str(tmp_path / "run" / "tokens" / "v1.safetensors"))

    pipe = cache.pipeline(tiny_dir, learned_tokens=tmp_path / "run")

    assert "<v1*>" in pipe.tokenizer.get_vocab() and "<v1*>" not in base.tokenizer.get_vocab()
    assert pipe.unet is base.unet  # no trained weights asked for: the base UNet is shared
    vocab_rows = base.text_encoder.get_input_embeddings().weight.shape[0]
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == vocab_rows + 1


def test_trained_weights_that_do_not_fit_raise_and_cache_nothing_new(tiny_dir, tmp_path):
    cache = ModelCache(device="cpu")
    cache.pipeline(tiny_dir)
    (tmp_path / "run").mkdir()
    save_file({"conv_in.weight": torch.zeros(1, 2)}, str(tmp_path / "run" / TRAINED_PARAMS_FILE))
    with pytest.raises(ModelLoadError, match="trained on another base model"):
        cache.pipeline(tiny_dir, trained=tmp_path / "run")
    assert len(cache.cached_pipelines()) == 1
