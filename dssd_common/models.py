"""Where the project's default model pair lives (paths only; nothing is created here).

Why here and not in `quantize.defaults`: both runtimes' CLIs default to these files, and
importing model preparation (pip, llama.cpp's quantizer) for a path made the runtimes
point up at `quantize`. `quantize.defaults.prepare_default_models` materialises them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: The real model families the tools know by name (`quantize prepare --family`,
#: `benchmarks ... --family`); the first is the default pair.
FAMILIES = ("smollm2", "gemma3")
#: Human-readable name of the default model.
MODEL_NAME = "SmolLM2-135M-Instruct"
#: Environment variable that overrides the default models directory.
MODELS_DIR_ENV = "DSSD_MODELS_DIR"
#: Default models directory, relative to the current working directory.
DEFAULT_MODELS_DIR = Path("models")

Q4_1_FILENAME = "smollm2-135m-instruct-q4_1.gguf"
Q4_0_FILENAME = "smollm2-135m-instruct-q4_0.gguf"


@dataclass(frozen=True)
class DefaultModels:
    """Paths of the default model files (they may not exist yet).

    ``target_gguf`` and ``draft_q4_1_gguf`` are the same file on purpose: the edge
    dequantizes it to fp32, the device runs it as Q4_1.
    """

    models_dir: Path
    target_gguf: Path
    draft_q4_1_gguf: Path
    draft_q4_0_gguf: Path

    def missing(self) -> list[Path]:
        """Files that do not exist yet (empty when prepared)."""
        return [p for p in (self.draft_q4_1_gguf, self.draft_q4_0_gguf) if not p.is_file()]


def resolve_models_dir(models_dir: str | os.PathLike[str] | None = None) -> Path:
    """The models directory: explicit argument, else ``$DSSD_MODELS_DIR``, else ``./models``.

    Returned absolute, so the paths stay valid if the caller later changes directory.
    """
    if models_dir is not None and str(models_dir) != "":
        chosen = Path(models_dir)
    elif os.environ.get(MODELS_DIR_ENV):
        chosen = Path(os.environ[MODELS_DIR_ENV])
    else:
        chosen = DEFAULT_MODELS_DIR
    return chosen.expanduser().absolute()


def default_models(models_dir: str | os.PathLike[str] | None = None) -> DefaultModels:
    """Paths of the default models in the resolved models directory; creates nothing."""
    root = resolve_models_dir(models_dir)
    q4_1 = root / Q4_1_FILENAME
    return DefaultModels(
        models_dir=root,
        target_gguf=q4_1,
        draft_q4_1_gguf=q4_1,
        draft_q4_0_gguf=root / Q4_0_FILENAME,
    )


# --------------------------------------------------------------------------- Gemma-3 pair
#: The second real family (issue 20): Gemma-3-270M, shipped on PyPI as a Q4_K_M GGUF in
#: four chunk packages, under the Gemma terms (prepared only with an explicit acceptance).
GEMMA3_NAME = "Gemma-3-270M"
GEMMA3_Q4_K_M_FILENAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_Q4_0_FILENAME = "gemma-3-270m-q4_0.gguf"


@dataclass(frozen=True)
class Gemma3Models:
    """Paths of the Gemma-3 pair: the shipped Q4_K_M GGUF is the edge target (dequantized to
    fp32 by transformers); a Q4_0 requantized from it is the (weaker) device draft."""

    models_dir: Path
    target_gguf: Path
    draft_gguf: Path

    def missing(self) -> list[Path]:
        """Files that do not exist yet (empty when prepared)."""
        return [p for p in (self.target_gguf, self.draft_gguf) if not p.is_file()]


def gemma3_models(models_dir: str | os.PathLike[str] | None = None) -> Gemma3Models:
    """Paths of the Gemma-3 pair in the resolved models directory; creates nothing."""
    root = resolve_models_dir(models_dir)
    return Gemma3Models(models_dir=root, target_gguf=root / GEMMA3_Q4_K_M_FILENAME,
                        draft_gguf=root / GEMMA3_Q4_0_FILENAME)
