"""The compressor: calibration -> allocation -> factorisation -> residual -> writer."""

from .calibration import CalibrationDataError, load_documents
from .compressor import RFIDCompressor, factorize_experts

__all__ = ["CalibrationDataError", "RFIDCompressor", "factorize_experts", "load_documents"]
