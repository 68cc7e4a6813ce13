"""CoMask: instance segmentation with MSFEM and the collaborative head.

Public API: `load_config`, `build_model`, `Predictor`, `__version__`.
"""

from comask.config import load_config

__version__ = "0.1.0"
__all__ = ["load_config", "build_model", "Predictor", "__version__"]


def __getattr__(name: str):
    # torch-heavy pieces are imported on first use, so `import comask` stays cheap
    if name == "build_model":
        from comask.modeling.build import build_model

        return build_model
    if name == "Predictor":
        from comask.engine.predict import Predictor

        return Predictor
    raise AttributeError(name)
