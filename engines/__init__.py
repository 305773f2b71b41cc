"""dd-compile runtime: load a compiled student from its manifest and sample, without torch.

Heavy backends (onnxruntime, tensorrt, torch) are imported only by the runner that needs them.
"""

from engines.errors import BackendUnavailable, DDCompileError, InputError, IntegrityError
from engines.iospec import IOSpec, TensorSpec
from engines.manifest import Manifest
from engines.runtime import SamplerPipeline, load
from engines.schedule import Sampler, SamplingSchedule

__all__ = [
    "load",
    "SamplerPipeline",
    "Manifest",
    "IOSpec",
    "TensorSpec",
    "Sampler",
    "SamplingSchedule",
    "DDCompileError",
    "InputError",
    "BackendUnavailable",
    "IntegrityError",
]
