"""topkd: logit-based knowledge distillation built around TopKD (Top-scaled KD).

``topkd.losses`` depends on torch only and can be used from any training loop; the data,
model, trainer and CLI layers sit on top of it.
"""

__version__ = "0.1.0"
