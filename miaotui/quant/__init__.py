"""Weight formats (how one matrix is held and multiplied: base.py's contract, a module per family), the recipe that
gives each matrix of a model its format, and calibration statistics for activation-aware int4."""
