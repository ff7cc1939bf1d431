"""hf-rfid: RFID-MoE compression of Mixture-of-Experts language models, loadable with Hugging Face transformers.

`import hf_rfid` registers the `rfid_moe` quantization method with transformers, so that
`AutoModelForCausalLM.from_pretrained(...)` rebuilds compressed checkpoints.
"""

__version__ = "0.1.0"

from .compress import CalibrationDataError, RFIDCompressor, factorize_experts
from .config import RFIDMoEConfig
from .loading import (
    CheckpointFormatError,
    NotLoadedWithHfRfidError,
    check_model,
    from_pretrained,
)
from .modeling import FactorizedExperts, UnsupportedModelError
from .quantizer import RFIDMoEHfQuantizer, dequantize_model, is_registered, register

register()

__all__ = [
    "CalibrationDataError",
    "CheckpointFormatError",
    "FactorizedExperts",
    "NotLoadedWithHfRfidError",
    "RFIDCompressor",
    "RFIDMoEConfig",
    "RFIDMoEHfQuantizer",
    "UnsupportedModelError",
    "__version__",
    "check_model",
    "dequantize_model",
    "factorize_experts",
    "from_pretrained",
    "is_registered",
    "register",
]
