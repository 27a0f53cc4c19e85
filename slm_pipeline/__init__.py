"""slm-pipeline: Selective Language Modeling (Rho-1) for long-context pretraining."""

__version__ = "0.1.0"
