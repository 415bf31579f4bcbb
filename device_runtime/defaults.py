"""The device's request defaults, in one place: the library (`GenerationConfig`,
`DeviceRuntime.generate/stream/astream/agenerate`), `python -m device_runtime` and
`python -m device_runtime serve` all take theirs from here.

(The OpenAI-compatible server keeps OpenAI's own sampling defaults for what OpenAI
defines, temperature 1 and top_p 1 with no top-k; its extensions default to these.)
"""
from __future__ import annotations

from device_runtime.gamma import DEFAULT_MAX_GAMMA
from protocol.sampling import SamplingParams

MODE = "dssd"
MAX_NEW_TOKENS = 128
TEMPERATURE = 0.7
TOP_K = 40
TOP_P = 0.95
SAMPLING = SamplingParams(TEMPERATURE, TOP_K, TOP_P)
#: None: adaptive ("auto", the GammaController) up to MAX_GAMMA
GAMMA: int | None = None
MAX_GAMMA = DEFAULT_MAX_GAMMA
PIPELINE = True
DOWNLINK = "auto"
SEED = 0


def parse_gamma(value: object) -> int | None:
    """'auto' or None -> None (adaptive); an int (or its decimal string) -> that fixed gamma.

    Raises ValueError on anything else (bools included) or a negative gamma."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        raise ValueError(f"gamma must be 'auto' or an integer >= 0, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"gamma must be 'auto' or an integer >= 0, got {value!r}") from None
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"gamma must be 'auto' or an integer >= 0, got {value!r}")
    return value
