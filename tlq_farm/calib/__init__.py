from .data import CalibError, CalibSet, load_calibration, load_rows

__all__ = ["CalibError", "CalibSet", "load_calibration", "load_rows"]
