"""Device half of DSSD: draft with llama.cpp, verify on the edge.

`DeviceRuntime` is the library API (sync and async); `python -m device_runtime serve`
runs an OpenAI-compatible HTTP server over it (device_runtime.openai_server).
"""
from device_runtime.api import (  # noqa: F401
    AsyncTokenStream,
    Completion,
    ContextLengthError,
    DeviceRuntime,
    EdgeUnavailable,
    Piece,
    RequestError,
    RuntimeBusy,
    TokenStream,
)

from device_runtime.api import __all__  # noqa: E402,F401  (one list of the public names)
