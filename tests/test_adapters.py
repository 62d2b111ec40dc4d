"""LORA_DIR's listing and a worker's adapter bookkeeping, without torch (webapp.model.adapters)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webapp.model import adapters


def test_the_listing_names_files_and_folders_and_nothing_a_request_could_turn_into_a_path(tmp_path):
    (tmp_path / "night.safetensors").write_bytes(b"x")
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "pytorch_lora_weights.safetensors").write_bytes(b"xy")
    (tmp_path / "one-file").mkdir()
    (tmp_path / "one-file" / "weights.safetensors").write_bytes(b"xyz")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not an adapter")
    (tmp_path / ".hidden.safetensors").write_bytes(b"x")
    (tmp_path / "sp ace.safetensors").write_bytes(b"x")
    found = adapters.listing(tmp_path)
    assert list(found) == ["night", "one-file", "styles"]
    assert found["night"].path == tmp_path / "night.safetensors" and found["night"].stamp[1] == 1
    assert found["styles"].path == tmp_path / "styles" and found["styles"].stamp[1] == 2
    assert adapters.listing(None) == {} and adapters.listing(tmp_path / "missing") == {}


def test_a_changed_file_has_another_stamp(tmp_path):
    path = tmp_path / "night.safetensors"
    path.write_bytes(b"first")
    before = adapters.listing(tmp_path)["night"]
    path.write_bytes(b"second!")
    os.utime(path, ns=(before.stamp[0] + 10**9, before.stamp[0] + 10**9))
    assert adapters.listing(tmp_path)["night"].stamp != before.stamp


def test_the_cache_evicts_the_least_recently_used_that_the_batch_does_not_need():
    cache = adapters.Cache(size=2)
    a, b, c = (adapters.Adapter(name, None, (1, 1)) for name in "abc")
    cache.loaded["a"] = a.stamp
    cache.loaded["b"] = b.stamp
    assert cache.holds(a)  # a is now the most recently used
    assert cache.evictions({"c"}) == ["b"]
    assert cache.evictions({"b", "c"}) == ["a"]
    assert not cache.holds(c)
    assert not cache.holds(adapters.Adapter("a", None, (2, 1))), "a changed file is not the one loaded"


def test_a_bad_adapter_is_remembered_until_its_file_changes():
    cache = adapters.Cache(size=1)
    cache.bad["x"] = ((1, 10), "failed to load: size mismatch")
    assert cache.known_bad(adapters.Adapter("x", None, (1, 10))) == "failed to load: size mismatch"
    assert cache.known_bad(adapters.Adapter("x", None, (2, 10))) is None


def test_an_adapter_is_exactly_one_safetensors_file_and_anything_else_is_refused_by_name(tmp_path):
    """The file a worker loads is the one listed and stamped (``weights``, its weight_name). A pickle file,
    beside a safetensors file or instead of it, and a folder of two candidates are listed with the reason they
    are refused, so a request naming them gets a 4xx saying why rather than diffusers' own choice. Before this
    change a pickle-only folder was silently unlisted, and a folder was handed to diffusers whole."""
    (tmp_path / "two-files").mkdir()
    for name in ("a.safetensors", "pytorch_lora_weights.safetensors"):
        (tmp_path / "two-files" / name).write_bytes(b"x")
    (tmp_path / "pickle-beside").mkdir()
    (tmp_path / "pickle-beside" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / "pickle-beside" / "pytorch_lora_weights.bin").write_bytes(b"x")
    (tmp_path / "pickle-only").mkdir()
    (tmp_path / "pickle-only" / "adapter_model.bin").write_bytes(b"x")
    (tmp_path / "loose.pt").write_bytes(b"x")
    (tmp_path / "snapshot").mkdir()  # a Hugging Face cache snapshot: its files are symlinks into blobs
    (tmp_path / "blob").write_bytes(b"xyzw")
    (tmp_path / "snapshot" / "weights.safetensors").symlink_to(tmp_path / "blob")
    found = adapters.listing(tmp_path)
    assert "2 .safetensors files (a.safetensors, pytorch_lora_weights.safetensors)" in found["two-files"].problem
    assert "pickle file (pytorch_lora_weights.bin)" in found["pickle-beside"].problem
    assert "pickle file (adapter_model.bin)" in found["pickle-only"].problem
    assert "loose.pt is a pickle file" in found["loose"].problem
    assert all(found[name].weights is None for name in ("two-files", "pickle-beside", "pickle-only", "loose"))
    snapshot = found["snapshot"]
    assert snapshot.problem is None and snapshot.weights == tmp_path / "snapshot" / "weights.safetensors"
    assert snapshot.stamp[1] == 4  # the blob's size, through the symlink


names = st.sampled_from(["w", "pytorch_lora_weights", "adapter_model", "x y", ".hidden", "a" * 120])
suffixes = st.sampled_from([".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".txt", ""])


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    folders=st.dictionaries(
        st.sampled_from(["one", "two", "three", "bad name!"]),
        st.lists(st.tuples(names, suffixes, st.booleans()), max_size=4),
        max_size=3,
    )
)
def test_any_adapter_folder_is_either_one_safetensors_file_or_refused_by_name(tmp_path_factory, folders):
    """The fuzzer's side of adapter files: whatever a folder holds, ``listing`` never raises, and each adapter
    it lists either names exactly one safetensors file and holds no pickle, or carries the reason it is refused."""
    root = tmp_path_factory.mktemp("loras")
    for folder, files in folders.items():
        (root / folder).mkdir()
        for stem, suffix, as_link in files:
            path = root / folder / f"{stem}{suffix}"
            if path.exists():
                continue
            if as_link:
                target = root / f"blob-{folder}-{stem}{suffix}"
                target.write_bytes(b"x")
                path.symlink_to(target)
            else:
                path.write_bytes(b"x")
    for name, adapter in adapters.listing(root).items():
        holds = sorted(adapter.path.iterdir()) if adapter.path.is_dir() else [adapter.path]
        pickles = [path for path in holds if path.suffix in adapters.PICKLE_SUFFIXES]
        weights = [path for path in holds if path.suffix == adapters.SUFFIX]
        if adapter.problem is None:
            assert adapter.weights in weights and len(weights) == 1 and not pickles, (name, holds)
        else:
            assert adapter.weights is None and (pickles or len(weights) > 1), (name, holds, adapter.problem)
