"""tasa-deploy: task-aware mixed-precision quantization (TASA, arXiv 2607.00908) for llama.cpp and vLLM."""

__version__ = "0.1.0"


class TasaError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(TasaError):
    """Bad arguments or input files (exit code 2)."""

    exit_code = 2


def quantize(*args, **kwargs):
    """`tasa_deploy.api.quantize` (imported lazily: `import tasa_deploy` stays light)."""
    from tasa_deploy.api import quantize as run

    return run(*args, **kwargs)


def export(*args, **kwargs):
    """`tasa_deploy.api.export`."""
    from tasa_deploy.api import export as run

    return run(*args, **kwargs)
