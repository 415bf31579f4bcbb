"""Message dataclasses <-> bytes. The only place in the project where frames are made.

Pure and I/O-free: `encode` turns a message into one binary frame (one WebSocket
message), `decode` turns untrusted bytes back into a `Frame` or raises a `WireError`
subclass that names what was wrong. Layout, all little-endian (see docs/protocol.md):

    header (16 bytes): magic b"DS" | version u8 | type u8 | session u32 | round u32 | payload_len u32
    payload: per message type, below.

Token ids are int32; probabilities are float32 (or float16 where the message says so).
Handshake-like messages that happen once per request carry a small UTF-8 JSON object.
"""
from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import numpy as np

from protocol.logprobs import OFF as LOGPROBS_OFF, TokenLogprobs
from protocol.sampling import SamplingParams
from protocol.verification import VerdictKind

MAGIC = b"DS"
VERSION = 1
HEADER = struct.Struct("<2sBBIII")
HEADER_SIZE = HEADER.size  # 16
#: Frames larger than this are refused unless the caller passes its own limit.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024

_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_FLOAT_CODES = {1: _F32, 2: _F16}
_FLOAT_CODE_OF = {_F32: 1, _F16: 2}


class WireError(ValueError):
    """Base class: the bytes are not a valid frame of this protocol."""


class BadMagic(WireError):
    pass


class WrongVersion(WireError):
    pass


class UnknownType(WireError):
    pass


class Truncated(WireError):
    pass


class Oversized(WireError):
    pass


class Malformed(WireError):
    """Structurally wrong payload: bad counts, trailing bytes, invalid JSON or field."""


class MsgType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    START = 3
    DRAFT = 4
    VERDICT = 5
    TOKENS = 6
    END = 7
    DONE = 8
    ERROR = 9
    MORE = 10


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1
    UNEXPECTED = 2  # a valid frame at the wrong time
    VERSION = 3
    VOCAB_MISMATCH = 4
    LIMIT = 5  # gamma, context, new tokens or message size over the server's caps
    UNSUPPORTED = 6  # unknown mode / downlink / setting
    BUSY = 7
    AUTH = 8
    DESYNC = 9  # device and edge disagree on the committed length
    INTERNAL = 10
    SHUTDOWN = 11


class DownlinkKind(enum.IntEnum):
    """How P_j travels down after a rejection in DSSD."""

    NONE = 0  # not needed (bonus, or the token is already decided)
    FULL = 1  # the whole P_j row, dtype given by a float code
    SUPPORT = 2  # (id, prob) pairs of P_j's non-zero entries
    CANDIDATES = 3  # (id, prob) pairs of K i.i.d. draws from P_j (candidate residual sampling)


# ---------------------------------------------------------------------------------------
# reading helpers


class _Reader:
    """Cursor over an untrusted payload; every read is bounds-checked."""

    def __init__(self, payload: memoryview) -> None:
        self._buf = payload
        self._pos = 0

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        end = self._pos + fmt.size
        if end > len(self._buf):
            raise Truncated(f"payload ends inside a {fmt.size}-byte field")
        values = fmt.unpack_from(self._buf, self._pos)
        self._pos = end
        return values

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        nbytes = count * dtype.itemsize
        end = self._pos + nbytes
        if count < 0 or end > len(self._buf):
            raise Truncated(f"payload too short for {count} x {dtype.name}")
        arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
        self._pos = end
        return arr

    def rest_bytes(self) -> bytes:
        data = bytes(self._buf[self._pos :])
        self._pos = len(self._buf)
        return data

    def finish(self) -> None:
        if self._pos != len(self._buf):
            raise Malformed(f"{len(self._buf) - self._pos} unexpected trailing bytes")


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _json_obj(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise Malformed(f"invalid JSON payload: {exc}") from None
    if not isinstance(obj, dict):
        raise Malformed("JSON payload must be an object")
    return obj


def _get(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """A typed field of a decoded JSON object (bool is not accepted as int)."""
    if name not in obj:
        if default is ...:
            raise Malformed(f"missing field {name!r}")
        return default
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise Malformed(f"field {name!r} has the wrong type")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise Malformed(f"field {name!r} has the wrong type")
    return value


def _ids(values: Any) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=_I32)


def _floats(values: Any, dtype: np.dtype = _F32) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=dtype)


def _float_rows(values: np.ndarray) -> np.ndarray:
    """float16 stays float16 (the sender chose it); anything else travels as float32."""
    return _floats(values, _F16 if np.asarray(values).dtype == np.float16 else _F32)


# ---------------------------------------------------------------------------------------
# messages


@dataclass(frozen=True)
class Hello:
    """Device -> edge, first frame of a connection."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    protocol_version: int
    vocab_fingerprint: str
    n_vocab: int
    client: str = ""
    auth_token: str = ""

    def payload(self) -> bytes:
        return _json_bytes(
            {
                "protocol_version": self.protocol_version,
                "vocab_fingerprint": self.vocab_fingerprint,
                "n_vocab": self.n_vocab,
                "client": self.client,
                "auth_token": self.auth_token,
            }
        )

    @classmethod
    def parse(cls, r: _Reader) -> "Hello":
        o = _json_obj(r.rest_bytes())
        return cls(
            protocol_version=_get(o, "protocol_version", int),
            vocab_fingerprint=_get(o, "vocab_fingerprint", str),
            n_vocab=_get(o, "n_vocab", int),
            client=_get(o, "client", str, ""),
            auth_token=_get(o, "auth_token", str, ""),
        )


@dataclass(frozen=True)
class Welcome:
    """Edge -> device: the session is open; here are the model and the server's caps."""

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    session_id: int
    model: str
    vocab_fingerprint: str
    n_vocab: int
    eos_token_ids: tuple[int, ...]
    max_gamma: int
    max_context: int
    max_new_tokens: int
    downlinks: tuple[str, ...]
    #: Which edge process answered (for operators and reports; "" = not said). Travels
    #: only when set, so a Welcome without it is byte-identical to the original one.
    replica: str = ""

    def payload(self) -> bytes:
        return _json_bytes(
            ({"replica": self.replica} if self.replica else {}) | {
                "session_id": self.session_id,
                "model": self.model,
                "vocab_fingerprint": self.vocab_fingerprint,
                "n_vocab": self.n_vocab,
                "eos_token_ids": list(self.eos_token_ids),
                "max_gamma": self.max_gamma,
                "max_context": self.max_context,
                "max_new_tokens": self.max_new_tokens,
                "downlinks": list(self.downlinks),
            }
        )

    @classmethod
    def parse(cls, r: _Reader) -> "Welcome":
        o = _json_obj(r.rest_bytes())
        eos = _get(o, "eos_token_ids", list)
        downlinks = _get(o, "downlinks", list)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
            raise Malformed("eos_token_ids must be integers")
        if not all(isinstance(d, str) for d in downlinks):
            raise Malformed("downlinks must be strings")
        return cls(
            session_id=_get(o, "session_id", int),
            model=_get(o, "model", str),
            vocab_fingerprint=_get(o, "vocab_fingerprint", str),
            n_vocab=_get(o, "n_vocab", int),
            eos_token_ids=tuple(eos),
            max_gamma=_get(o, "max_gamma", int),
            max_context=_get(o, "max_context", int),
            max_new_tokens=_get(o, "max_new_tokens", int),
            downlinks=tuple(downlinks),
            replica=_get(o, "replica", str, ""),
        )


_START_HEAD = struct.Struct("<II")  # json length, number of prompt ids


#: Largest request seed in `Start` (both sides check it): 63 bits, so a seed fits a signed
#: int64 wherever it is stored, and numpy's SeedSequence takes it as it is.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Start:
    """Device -> edge: begin a request. `prompt_ids` is the whole context to prefill."""

    TYPE: ClassVar[MsgType] = MsgType.START
    mode: str
    sampling: SamplingParams
    seed: int
    max_new_tokens: int
    prompt_ids: np.ndarray
    downlink: str = "full"
    #: -1: no logprobs; k >= 0: the target's logprob of each emitted token and its k best
    #: alternatives travel with the verdicts (protocol.logprobs). Sent only when >= 0.
    logprobs: int = LOGPROBS_OFF
    #: the output's grammar (protocol.constraints.GrammarSpec.as_json), or None: free text
    grammar: dict[str, Any] | None = None

    def payload(self) -> bytes:
        fields = {
            "mode": self.mode,
            "temperature": self.sampling.temperature,
            "top_k": self.sampling.top_k,
            "top_p": self.sampling.top_p,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "downlink": self.downlink,
        }
        if self.logprobs != LOGPROBS_OFF:
            fields["logprobs"] = self.logprobs
        if self.grammar is not None:
            fields["grammar"] = self.grammar
        head = _json_bytes(fields)
        ids = _ids(self.prompt_ids)
        return _START_HEAD.pack(len(head), ids.size) + head + ids.tobytes()

    @classmethod
    def parse(cls, r: _Reader) -> "Start":
        json_len, n_ids = r.unpack(_START_HEAD)
        o = _json_obj(r.array(np.dtype("u1"), json_len).tobytes())
        ids = r.array(_I32, n_ids)
        try:
            sampling = SamplingParams(
                temperature=_get(o, "temperature", float),
                top_k=_get(o, "top_k", int),
                top_p=_get(o, "top_p", float),
            )
        except ValueError as exc:
            if isinstance(exc, WireError):
                raise
            raise Malformed(str(exc)) from None
        return cls(
            mode=_get(o, "mode", str),
            sampling=sampling,
            seed=_get(o, "seed", int),
            max_new_tokens=_get(o, "max_new_tokens", int),
            prompt_ids=ids,
            downlink=_get(o, "downlink", str, "full"),
            logprobs=_get(o, "logprobs", int, LOGPROBS_OFF),
            grammar=_get(o, "grammar", dict, None),
        )


_DRAFT_HEAD = struct.Struct("<IBBBB")  # n_committed, n_prefix, gamma, flags, n_candidates
_VERDICT_HEAD = struct.Struct("<BBB")  # kind, n_accepted, flags
_U32 = struct.Struct("<I")
_TOKEN = struct.Struct("<i")
#: flags bits shared by Draft and Verdict
_WIDE_IDS = 0x10  # ids are int32; otherwise uint16 (any vocabulary up to 65,536)
_U16 = np.dtype("<u2")


def _pack_ids(*arrays: np.ndarray) -> tuple[int, list[bytes]]:
    """The narrowest exact id encoding for all arrays together (one flag per message)."""
    ids = [_ids(a) for a in arrays]
    wide = any(a.size and (a.min() < 0 or a.max() > 0xFFFF) for a in ids)
    return (_WIDE_IDS if wide else 0), [a.tobytes() if wide else a.astype(_U16).tobytes() for a in ids]


def _read_ids(r: _Reader, flags: int, count: int) -> np.ndarray:
    if flags & _WIDE_IDS:
        return r.array(_I32, count)
    return r.array(_U16, count).astype(_I32)


_LOGPROBS_HEAD = struct.Struct("<HBB")  # n tokens, k alternatives, wide ids
#: flags bit of Verdict (and of Tokens' flags byte) saying a logprobs block follows
_HAS_LOGPROBS = 0x20


def _pack_logprobs(lp: TokenLogprobs) -> bytes:
    """n float32 logprobs, then n x k alternative ids (uint16 unless wide) and their float32
    logprobs: 4 + 4 bytes head, 4 bytes per token, 6 (or 8) per alternative."""
    top = _ids(lp.top_ids).reshape(-1)
    wide, (ids,) = _pack_ids(top)
    values = _floats(lp.logprob)
    top_lp = _floats(lp.top_logprobs).reshape(-1)
    if top.size != values.size * lp.k or top_lp.size != top.size:
        raise ValueError("logprobs: top ids and values must be n x k")
    return _LOGPROBS_HEAD.pack(values.size, lp.k, int(bool(wide))) + values.tobytes() + ids + top_lp.tobytes()


def _read_logprobs(r: _Reader) -> TokenLogprobs:
    n, k, wide = r.unpack(_LOGPROBS_HEAD)
    if wide > 1:
        raise Malformed("logprobs: wide flag must be 0 or 1")
    values = r.array(_F32, n)
    ids = _read_ids(r, _WIDE_IDS if wide else 0, n * k).reshape(n, k)
    return TokenLogprobs(values, ids, r.array(_F32, n * k).reshape(n, k))


@dataclass(frozen=True)
class Draft:
    """Device -> edge: one round's uplink.

    `prefix_ids` are committed tokens the edge has not seen (the device's residual
    resample of the previous round); `n_committed` is the device's committed length
    after them, so the edge can detect desync. q is either the gamma scalars q_i(x_i)
    (DSSD), full Q rows (DSD), or absent (greedy). `n_candidates` is how many candidates
    the device wants if this round's rejection is answered by candidate sampling.
    """

    TYPE: ClassVar[MsgType] = MsgType.DRAFT
    n_committed: int
    prefix_ids: np.ndarray
    draft_ids: np.ndarray
    q_draft: np.ndarray | None = None  # (gamma,) float32
    q_rows: np.ndarray | None = None  # (gamma, V) float32 or float16
    n_candidates: int = 0

    def payload(self) -> bytes:
        flags, (prefix, draft) = _pack_ids(self.prefix_ids, self.draft_ids)
        gamma = np.size(self.draft_ids)
        if self.q_draft is not None and self.q_rows is not None:
            raise ValueError("a draft carries q scalars or q rows, not both")
        if self.q_rows is not None:
            rows = _float_rows(self.q_rows)
            if rows.ndim != 2 or rows.shape[0] != gamma:
                raise ValueError("q_rows must have one row per draft token")
            flags |= 2 | _FLOAT_CODE_OF[rows.dtype] << 2
            tail = _U32.pack(rows.shape[1]) + rows.tobytes()
        elif self.q_draft is not None:
            q = _floats(self.q_draft)
            if q.size != gamma:
                raise ValueError("q_draft must have one value per draft token")
            flags |= 1
            tail = q.tobytes()
        else:
            tail = b""
        head = _DRAFT_HEAD.pack(self.n_committed, np.size(self.prefix_ids), gamma, flags, self.n_candidates)
        return head + prefix + draft + tail

    @classmethod
    def parse(cls, r: _Reader) -> "Draft":
        n_committed, n_prefix, gamma, flags, n_candidates = r.unpack(_DRAFT_HEAD)
        if flags & ~(_WIDE_IDS | 0x0F):
            raise Malformed(f"unknown draft flags {flags:#x}")
        prefix = _read_ids(r, flags, n_prefix)
        draft = _read_ids(r, flags, gamma)
        q_kind, float_code = flags & 0x03, (flags >> 2) & 0x03
        q_draft = q_rows = None
        if q_kind == 2 and float_code in _FLOAT_CODES:
            (row_len,) = r.unpack(_U32)
            if row_len == 0:
                raise Malformed("q rows of length 0")
            q_rows = r.array(_FLOAT_CODES[float_code], gamma * row_len).reshape(gamma, row_len)
        elif q_kind == 1 and float_code == 0:
            q_draft = r.array(_F32, gamma)
        elif q_kind != 0 or float_code != 0:
            raise Malformed(f"unknown q encoding in flags {flags:#x}")
        return cls(n_committed, prefix, draft, q_draft, q_rows, n_candidates)


@dataclass(frozen=True)
class VerdictMsg:
    """Edge -> device: the verdict of one round, plus P_j when the device must resample.

    Layout: kind u8, n_accepted u8, flags u8 (bits 0-1 downlink kind, 2-3 float code of
    a full row, 4 wide ids, 5 logprobs follow); then `token` i32 unless kind is RESAMPLE;
    then, with a downlink, a u32 count and the data; then, for a request that asked for
    logprobs, the logprobs block (see `_pack_logprobs`). A plain verdict is 7 bytes.
    """

    TYPE: ClassVar[MsgType] = MsgType.VERDICT
    kind: VerdictKind
    n_accepted: int
    token: int = -1
    p_full: np.ndarray | None = None  # (V,) float32/float16: DownlinkKind.FULL
    p_ids: np.ndarray | None = None  # (n,) int32: SUPPORT or CANDIDATES
    p_values: np.ndarray | None = None  # (n,) float32: P_j at those ids
    candidates: bool = False  # p_ids are i.i.d. draws from P_j, not its support
    #: the target's logprobs of the tokens this verdict settles, in order: the Draft's
    #: prefix (the previous round's resampled token), the accepted drafts, then `token`
    #: unless RESAMPLE (protocol.logprobs)
    logprobs: TokenLogprobs | None = None

    @property
    def downlink(self) -> DownlinkKind:
        if self.p_full is not None:
            return DownlinkKind.FULL
        if self.p_ids is not None:
            return DownlinkKind.CANDIDATES if self.candidates else DownlinkKind.SUPPORT
        return DownlinkKind.NONE

    def payload(self) -> bytes:
        dl = self.downlink
        flags = int(dl)
        body = b""
        if dl is DownlinkKind.FULL:
            row = _float_rows(self.p_full)
            flags |= _FLOAT_CODE_OF[row.dtype] << 2
            body = _U32.pack(row.size) + row.tobytes()
        elif dl is not DownlinkKind.NONE:
            vals = _floats(self.p_values)
            wide, (ids,) = _pack_ids(self.p_ids)
            if np.size(self.p_ids) != vals.size:
                raise ValueError("support ids and values differ in length")
            flags |= wide
            body = _U32.pack(vals.size) + ids + vals.tobytes()
        if self.logprobs is not None:
            flags |= _HAS_LOGPROBS
            body += _pack_logprobs(self.logprobs)
        token = b"" if self.kind == VerdictKind.RESAMPLE else _TOKEN.pack(self.token)
        return _VERDICT_HEAD.pack(self.kind, self.n_accepted, flags) + token + body

    @classmethod
    def parse(cls, r: _Reader) -> "VerdictMsg":
        kind, n_accepted, flags = r.unpack(_VERDICT_HEAD)
        try:
            kind = VerdictKind(kind)
            dl = DownlinkKind(flags & 0x03)
        except ValueError:
            raise Malformed(f"unknown verdict kind {kind} or flags {flags:#x}") from None
        if flags & ~(_WIDE_IDS | _HAS_LOGPROBS | 0x0F):
            raise Malformed(f"unknown verdict flags {flags:#x}")
        has_lp = bool(flags & _HAS_LOGPROBS)
        flags &= ~_HAS_LOGPROBS
        token = -1 if kind == VerdictKind.RESAMPLE else r.unpack(_TOKEN)[0]
        float_code = (flags >> 2) & 0x03
        fields: dict[str, Any] = {}
        if dl is DownlinkKind.FULL:
            dtype = _FLOAT_CODES.get(float_code)
            if dtype is None or flags & _WIDE_IDS:
                raise Malformed(f"bad flags {flags:#x} for a full row")
            (count,) = r.unpack(_U32)
            fields["p_full"] = r.array(dtype, count)
        elif float_code:
            raise Malformed("float code on a downlink without a full row")
        elif dl is DownlinkKind.NONE:
            if flags:
                raise Malformed(f"bad flags {flags:#x} without a downlink")
        else:
            (count,) = r.unpack(_U32)
            fields["p_ids"] = _read_ids(r, flags, count)
            fields["p_values"] = r.array(_F32, count)
            fields["candidates"] = dl is DownlinkKind.CANDIDATES
        if has_lp:
            fields["logprobs"] = _read_logprobs(r)
        return cls(kind, n_accepted, token, **fields)


_TOKENS_HEAD = struct.Struct("<BI")


@dataclass(frozen=True)
class Tokens:
    """Edge -> device in edge-only mode: tokens decoded by the edge alone."""

    TYPE: ClassVar[MsgType] = MsgType.TOKENS
    ids: np.ndarray
    done: bool = False
    logprobs: TokenLogprobs | None = None  # of `ids`, for a request that asked for them

    def payload(self) -> bytes:
        ids = _ids(self.ids)
        flags = int(self.done) | (_HAS_LOGPROBS if self.logprobs is not None else 0)
        tail = b"" if self.logprobs is None else _pack_logprobs(self.logprobs)
        return _TOKENS_HEAD.pack(flags, ids.size) + ids.tobytes() + tail

    @classmethod
    def parse(cls, r: _Reader) -> "Tokens":
        flags, n = r.unpack(_TOKENS_HEAD)
        if flags & ~(1 | _HAS_LOGPROBS):
            raise Malformed("Tokens flags: only done (bit 0) and logprobs (bit 5)")
        ids = r.array(_I32, n)
        return cls(ids, bool(flags & 1), _read_logprobs(r) if flags & _HAS_LOGPROBS else None)


_END = struct.Struct("<I")


@dataclass(frozen=True)
class End:
    """Device -> edge: the request is over (EOS, stop string, length) at `n_committed`.

    `prefix_ids`: committed tokens the edge has not seen (the device's last residual
    resample), sent only by a request with logprobs, whose `Done` then reports theirs.
    """

    TYPE: ClassVar[MsgType] = MsgType.END
    n_committed: int
    prefix_ids: tuple[int, ...] = ()

    def payload(self) -> bytes:
        return _END.pack(self.n_committed) + _ids(list(self.prefix_ids)).tobytes()

    @classmethod
    def parse(cls, r: _Reader) -> "End":
        (n,) = r.unpack(_END)
        rest = r.rest_bytes()
        if len(rest) % 4:
            raise Malformed("End: prefix ids must be int32")
        return cls(n, tuple(np.frombuffer(rest, _I32).tolist()))


@dataclass(frozen=True)
class Done:
    """Edge -> device: the request's edge-side statistics (the request's last frame)."""

    TYPE: ClassVar[MsgType] = MsgType.DONE
    stats: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> bytes:
        return _json_bytes(self.stats)

    @classmethod
    def parse(cls, r: _Reader) -> "Done":
        return cls(_json_obj(r.rest_bytes()))


_MORE = struct.Struct("<H")


@dataclass(frozen=True)
class More:
    """Device -> edge: all candidates were rejected; send `n_candidates` more (0: the full P_j)."""

    TYPE: ClassVar[MsgType] = MsgType.MORE
    n_candidates: int

    def payload(self) -> bytes:
        return _MORE.pack(self.n_candidates)

    @classmethod
    def parse(cls, r: _Reader) -> "More":
        return cls(*r.unpack(_MORE))


_ERROR = struct.Struct("<H")


@dataclass(frozen=True)
class Error:
    """Either direction: a refusal with a code and a human-readable reason."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: int
    message: str

    def payload(self) -> bytes:
        return _ERROR.pack(self.code) + self.message.encode("utf-8")

    @classmethod
    def parse(cls, r: _Reader) -> "Error":
        (code,) = r.unpack(_ERROR)
        try:
            message = r.rest_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("error message is not UTF-8") from None
        return cls(code, message)


Message = Union[Hello, Welcome, Start, Draft, VerdictMsg, Tokens, End, Done, Error, More]
_PARSERS: dict[int, type] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Start, Draft, VerdictMsg, Tokens, End, Done, Error, More)
}


@dataclass(frozen=True)
class Frame:
    message: Message
    session: int = 0
    round: int = 0


def encode(message: Message, *, session: int = 0, round: int = 0) -> bytes:
    payload = message.payload()
    return HEADER.pack(MAGIC, VERSION, message.TYPE, session, round, len(payload)) + payload


def decode(data: bytes | bytearray | memoryview, *, max_frame: int = DEFAULT_MAX_FRAME) -> Frame:
    """Parse one frame from untrusted bytes; raises a `WireError` subclass, nothing else."""
    if isinstance(data, str):
        raise Malformed("text frames are not part of the protocol")
    if len(data) > max_frame:
        raise Oversized(f"frame of {len(data)} bytes exceeds the limit of {max_frame}")
    if len(data) < HEADER_SIZE:
        raise Truncated(f"frame of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, mtype, session, rnd, length = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise BadMagic("not a DSSD frame (bad magic)")
    if version != VERSION:
        raise WrongVersion(f"protocol version {version}, this side speaks {VERSION}")
    cls = _PARSERS.get(mtype)
    if cls is None:
        raise UnknownType(f"unknown message type {mtype}")
    if length != len(data) - HEADER_SIZE:
        kind = Truncated if length > len(data) - HEADER_SIZE else Malformed
        raise kind(f"header says {length} payload bytes, frame has {len(data) - HEADER_SIZE}")
    reader = _Reader(memoryview(data)[HEADER_SIZE:])
    try:
        message = cls.parse(reader)
    except WireError:
        raise
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        raise Malformed(f"invalid {cls.__name__} payload: {exc}") from None
    reader.finish()
    return Frame(message, session, rnd)
