"""fer_lib: interpretable facial expression recognition guided by action-unit cues.

The folders are the layers of the data flow (docs: each subpackage's docstring), each one
importing only from the layers above it:

    faces/      landmarks (MediaPipe, schemes) -> AU codebook -> AU heatmaps; compound codebook
    data/       datasets (RAF-DB, AffectNet, FER2013, ImageFolder, synthetic) -> batches with AU maps
    models/     model registry and factory (timm backbones, LNLAttenNet, mini-Xception), tapped
                layers and their attention, checkpoint files
    training/   composite loss (CE + lambda * alignment), the training loop, recipes (presets)
    analysis/   after training: evaluation, CAMs and ATT-/CAM-COS, AU explanations, exploration
    methods/    the hosted methods: continual compound learning, ContraWarping (ssl, warps)
    workflow/   papermill pipelines over the notebooks, the Jupyter kernel and lab
    metrics.py, plots.py, utils.py: shared by every layer

Modules keep their short legacy names too (`fer_lib.train`, `python -m fer_lib.pipeline`, ...):
`_LegacyNames` maps each to its new home, the same module object, so old imports and commands work.
"""
import importlib
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

MOVED = {
    "landmarks": "faces.landmarks", "au": "faces.au", "compound": "faces.compound",
    "checkpoints": "models.checkpoints", "peer": "models.peer", "lnlattennet": "models.lnlattennet",
    "losses": "training.losses", "train": "training.train", "presets": "training.presets",
    "interpret": "analysis.interpret", "explain": "analysis.explain", "evaluate": "analysis.evaluate",
    "explore": "analysis.explore", "continual": "methods.continual", "ssl": "methods.ssl",
    "warps": "methods.warps", "pipeline": "workflow.pipeline", "jupyter": "workflow.jupyter",
}


class _LegacyNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`fer_lib.<old>` -> `fer_lib.<layer>.<old>`: imports get the new module itself; `python -m
    fer_lib.<old>` runs the new module's main()."""

    def find_spec(self, name, path=None, target=None):
        old = name[len(__name__) + 1:] if name.startswith(__name__ + ".") else None
        return importlib.machinery.ModuleSpec(name, self) if old in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.rsplit('.', 1)[1]]}")

    def exec_module(self, module):
        pass

    def get_code(self, name):  # used by runpy for `python -m fer_lib.<old>`
        target = f"{__name__}.{MOVED[name.rsplit('.', 1)[1]]}"
        return compile(f"import importlib, sys; sys.exit(importlib.import_module({target!r}).main())",
                       f"<{name} -> {target}>", "exec")


sys.meta_path.append(_LegacyNames())
