"""A compiled extension module that may be missing: imported once, with a build hint when it is needed."""
import importlib


class OptionalExtension:
    """Imports `module` (which registers its torch ops); `require()` raises, saying how to build it, if that failed."""

    def __init__(self, module: str, what: str, build_command: str):
        self.what, self.build_command = what, build_command
        try:
            importlib.import_module(module)
        except ImportError as error:
            self.error = error
        else:
            self.error = None

    def available(self) -> bool:
        return self.error is None

    def require(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the {self.what} are not built ({self.error}); build them with: {self.build_command}")
