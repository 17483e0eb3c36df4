"""The core without the demo extra: in a Python where its packages (transformers, matplotlib,
cv2, tqdm, gguf, accelerate) cannot be imported, apparate imports, prepares a small CNN, trains its ramps (with progress on
stderr) and serves it; the demo's parts say how to install what they miss."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Prepended to each snippet: every import of the demo extra's packages raises ImportError as if
# they were absent. The finder hands out a spec whose loader refuses, rather than raising in
# find_spec, because torch probes optional packages with importlib.util.find_spec and expects a
# spec or None from it.
BLOCK_THE_EXTRA = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys

    BLOCKED = {"transformers", "matplotlib", "cv2", "tqdm", "gguf", "accelerate"}

    class _Absent(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

        def exec_module(self, module):
            raise AssertionError("create_module always raises")

    sys.meta_path.insert(0, _Absent())
""")


def _run(snippet: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    code = BLOCK_THE_EXTRA + textwrap.dedent(snippet)
    result = subprocess.run([sys.executable, "-c", code, *arguments], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# The tests' small residual CNN, trained to tell which quadrant of an image is bright, is served
# with ramps.
CORE_SNIPPET = """
    import pathlib, sys

    try:
        import tqdm
    except ImportError:
        pass
    else:
        raise AssertionError("tqdm is importable: this is not a Python without the demo extra")

    import torch
    import apparate
    from tests.helpers import separable, train_cnn

    model = train_cnn()

    ee = apparate.prepare(model, separable(8))
    assert [site.name for site in ee.sites] == [f"blocks.{i}" for i in range(5)], ee.sites
    agreement = ee.train_ramps(separable(300), epochs=10)
    assert len(agreement) == 5 and max(agreement) > 0.5, agreement
    stream = separable(64)
    with torch.no_grad():
        vanilla = model(stream).argmax(1).tolist()
    assert len(set(vanilla)) > 1, "a model that answers one class proves little"
    with apparate.Runtime(ee, example_inputs=(stream[:8],), profile_cache=pathlib.Path(sys.argv[1]),
                          background=False) as runtime:
        answers = [r for start in range(0, 64, 16) for r in runtime.infer(stream[start:start + 16])]
    # The calibration split warm-starts the controller: exits may open at once, within the
    # constraint's reach on 64 requests.
    assert len(answers) == 64
    assert sum(r.prediction == v for r, v in zip(answers, vanilla)) >= 62
    loaded = {name.partition(".")[0] for name in sys.modules}
    for name in ("transformers", "matplotlib", "cv2", "tqdm"):
        assert name not in loaded, name
    print("served", len(answers))
"""


def test_prepare_train_and_infer_without_the_extra(tmp_path):
    result = _run(CORE_SNIPPET, str(tmp_path))
    assert "served 64" in result.stdout
    assert "apparate: backbone" in result.stderr and "apparate: ramps (epochs)" in result.stderr


def test_demo_parts_name_the_missing_package_and_the_fix():
    result = _run("""
        from apparate import cli
        from apparate.demo._extra import EXTRA_PACKAGES, require
        from apparate.demo.data import read_video_frames

        assert set(EXTRA_PACKAGES) == BLOCKED
        for module, package in EXTRA_PACKAGES.items():
            try:
                require(module)
            except ImportError as error:
                message = str(error)
                assert package in message and 'pip install "apparate[demo]"' in message, message
            else:
                raise AssertionError(f"{module} imported")
        try:
            read_video_frames("street.avi")
        except ImportError as error:
            assert "opencv-python-headless" in str(error), error
        else:
            raise AssertionError("read_video_frames ran without OpenCV")
        try:
            cli.main(["--version"])
        except SystemExit as exit:
            assert exit.code == 0
    """)
    assert result.stdout.startswith("apparate ")
