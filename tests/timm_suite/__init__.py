"""timm's own model test suite, vendored: run over the Vim models by tests/test_timm_suite.py."""
VENDORED_TIMM_VERSION = "1.0.31"
