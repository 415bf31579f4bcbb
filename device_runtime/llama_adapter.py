"""The one place that touches llama-cpp-python beyond its documented `Llama` methods.

Why: exact speculative decoding needs what the high-level API does not give: the raw
logits of the last evaluated token without a copy (`llama_get_logits_ith` on the private
`Llama._ctx`), a KV cache cut back to a committed prefix (writing `Llama.n_tokens`, which
the next `Llama.eval` turns into a `kv_cache_seq_rm`), the vocabulary's own token texts
and end-of-generation set (`Llama._model.vocab`), and the C quantizer. These are private
fields and low-level bindings that change between releases without notice; kept here, an
upgrade is checked in one file, and an unsupported version fails at import with a message
instead of decoding wrongly.

Everything else (`Llama.eval`, `tokenize`, `detokenize`, `metadata`, `token_bos`, ...)
is public API and used directly by callers.
"""
from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import llama_cpp
import numpy as np

#: Versions this module was checked against: at least MIN_VERSION, below MAX_VERSION.
#: 0.3.36 is the tested one (requirements.txt pins it); later 0.3.x releases are accepted
#: because the fields used here have kept their meaning within 0.3, a new minor release
#: is refused until someone re-checks this file against it.
MIN_VERSION: tuple[int, int, int] = (0, 3, 36)
MAX_VERSION: tuple[int, int, int] = (0, 4, 0)


class UnsupportedLlamaCpp(ImportError):
    """The installed llama-cpp-python is outside the versions this adapter supports."""


def parse_version(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string such as "0.3.36" or "0.3.36.dev1"."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        raise UnsupportedLlamaCpp(f"cannot read the llama-cpp-python version {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_version(version: str) -> None:
    """Raise `UnsupportedLlamaCpp` unless MIN_VERSION <= version < MAX_VERSION."""
    v = parse_version(version)
    if not MIN_VERSION <= v < MAX_VERSION:
        lo, hi = (".".join(map(str, x)) for x in (MIN_VERSION, MAX_VERSION))
        raise UnsupportedLlamaCpp(
            f"llama-cpp-python {version} is not supported (need >={lo},<{hi}; tested with {lo}): "
            f"the draft uses its private fields, see {Path(__file__).name}. "
            f"Install the pinned version: pip install 'llama-cpp-python=={lo}'"
        )


check_version(getattr(llama_cpp, "__version__", "unknown"))

Llama = llama_cpp.Llama


class LlamaModel:
    """A llama.cpp context and the operations on it that need llama-cpp-python's internals.

    Wraps an existing `Llama` (so tests can wrap one they built) or opens one (`open`);
    the public `Llama` API stays available as `.llm`.
    """

    def __init__(self, llm: Llama) -> None:
        self.llm = llm
        self.n_vocab = int(llm.n_vocab())

    @classmethod
    def open(
        cls,
        model_path: str | Path,
        *,
        n_ctx: int,
        n_threads: int,
        n_gpu_layers: int = 0,
        exact: bool = False,
        logits_all: bool = False,
        n_batch: int | None = None,
    ) -> "LlamaModel":
        """A quiet llama.cpp context on a GGUF.

        `exact`: f32 KV cache and no flash attention, so logits compare with torch's to
        ~1e-5 in tests (the f16 default differs by ~1e-2). `logits_all` keeps every
        position's logits in `Llama.scores` (tests), at a cost of n_ctx x n_vocab floats.
        """
        kwargs: dict = {}
        if exact:
            kwargs.update(type_k=0, type_v=0, flash_attn=False)
        return cls(llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=n_batch or min(512, n_ctx),
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_gpu_layers=n_gpu_layers,
            logits_all=logits_all,
            verbose=False,
            **kwargs,
        ))

    # -- vocabulary --------------------------------------------------------------------

    def vocab_texts(self) -> list[bytes]:
        """Every token's text in id order, as llama.cpp's vocabulary stores it (for fingerprints)."""
        vocab = self.llm._model.vocab
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        return [llama_cpp.llama_vocab_get_text(vocab, i) for i in range(n)]

    def token_text(self, token: int) -> bytes:
        """The stored text of one token (special tokens included, unlike `detokenize`)."""
        return llama_cpp.llama_vocab_get_text(self.llm._model.vocab, token)

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation for this model (EOS, EOT, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def eog_ids(self) -> tuple[int, ...]:
        """All end-of-generation ids of the vocabulary, in id order."""
        vocab = self.llm._model.vocab
        return tuple(i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i))

    def chat_prompt(self, template: str, messages: list[dict[str, str]]) -> str:
        """Render `messages` through a GGUF chat template as llama-cpp-python's chat handler does."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(token: int) -> str:
            return "" if token < 0 else self.token_text(token).decode("utf-8", "replace")

        fmt = Jinja2ChatFormatter(template=template, eos_token=text(self.llm.token_eos()),
                                  bos_token=text(self.llm.token_bos()))
        return fmt(messages=messages).prompt

    # -- KV cache and logits ---------------------------------------------------------------

    def truncate(self, n_keep: int) -> None:
        """Keep only the first `n_keep` tokens of the KV cache.

        Writing `n_tokens` is how llama-cpp-python itself does it: its next `eval` removes
        every cached position from `n_tokens` on (`kv_cache_seq_rm`) before decoding, so
        the cut costs nothing until then and the cache never holds stale positions past it.
        """
        if not 0 <= n_keep <= self.llm.n_tokens:
            raise ValueError(f"cannot keep {n_keep} of {self.llm.n_tokens} cached tokens")
        self.llm.n_tokens = n_keep

    def last_logits(self) -> np.ndarray:
        """The logits of the last evaluated token, as a view of llama.cpp's buffer.

        No copy (a vocabulary-sized row per drafted token adds up on a Pi); the view is
        valid only until the next `eval`. `Llama.scores` would need `logits_all` or a copy.
        """
        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def close(self) -> None:
        self.llm.close()


# -- quantizer -----------------------------------------------------------------------------


def ftype_ids() -> dict[str, int]:
    """Map target names ("Q4_0", "Q4_K_M", "F16", "F32", ...) to llama.cpp ftype ids.

    Taken from the installed bindings rather than hard-coded, so the list always matches
    the quantizer that will actually run.
    """
    names: dict[str, int] = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            names[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = int(getattr(llama_cpp, attr))
    if hasattr(llama_cpp, "LLAMA_FTYPE_ALL_F32"):
        names["F32"] = int(llama_cpp.LLAMA_FTYPE_ALL_F32)
    return names


def quantize_file(src: Path, dst: Path, ftype: int, *, nthread: int) -> int:
    """Run llama.cpp's `llama_model_quantize` on `src` into `dst`; returns its code (0: success)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    return int(llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params)))

