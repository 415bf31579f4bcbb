"""Wire format: every message round-trips; untrusted bytes only ever raise WireError."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from protocol import wire
from protocol.sampling import SamplingParams
from protocol.verification import VerdictKind


def _messages() -> list[wire.Message]:
    rng = np.random.default_rng(0)
    return [
        wire.Hello(1, "sha256:abc", 49152, "pi-4", "secret"),
        wire.Welcome(7, "smollm2", "sha256:abc", 49152, (2, 0), 16, 8192, 2048, ("full", "support")),
        wire.Welcome(7, "smollm2", "sha256:abc", 49152, (2, 0), 16, 8192, 2048, ("full",), replica="edge-2:8765"),
        wire.Start("dssd", SamplingParams(0.7, 40, 0.9), 42, 128, np.arange(10, dtype=np.int32)),
        wire.Start("edge-only", SamplingParams(0.0), 0, 1, np.array([5], np.int32), "support"),
        wire.Draft(12, np.array([3], np.int32), np.array([4, 5, 6], np.int32),
                   q_draft=np.array([0.5, 0.25, 1.0], np.float32)),
        wire.Draft(12, np.zeros(0, np.int32), np.array([4, 5], np.int32)),
        wire.Draft(3, np.zeros(0, np.int32), np.array([1, 2], np.int32),
                   q_rows=rng.random((2, 50)).astype(np.float32)),
        wire.Draft(3, np.zeros(0, np.int32), np.array([1, 2], np.int32),
                   q_rows=rng.random((2, 50)).astype(np.float16)),
        wire.VerdictMsg(VerdictKind.BONUS, 4, 17),
        wire.VerdictMsg(VerdictKind.CORRECTION, 1, 9),
        wire.VerdictMsg(VerdictKind.RESAMPLE, 2, p_full=rng.random(100).astype(np.float32)),
        wire.VerdictMsg(VerdictKind.RESAMPLE, 0, p_full=rng.random(100).astype(np.float16)),
        wire.VerdictMsg(VerdictKind.RESAMPLE, 0, p_ids=np.array([3, 9], np.int32),
                        p_values=np.array([0.4, 0.6], np.float32)),
        wire.Tokens(np.array([1, 2, 3], np.int32), done=True),
        wire.End(99),
        wire.Done({"rounds": 3, "accepted_per_position": [3, 2]}),
        wire.Error(wire.ErrorCode.VOCAB_MISMATCH, "vocabularies differ: ünïcode"),
    ]


def _equal(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is not None and b is not None and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("msg", _messages(), ids=lambda m: type(m).__name__)
def test_round_trip(msg: wire.Message) -> None:
    data = wire.encode(msg, session=5, round=77)
    frame = wire.decode(data)
    assert (frame.session, frame.round) == (5, 77)
    assert type(frame.message) is type(msg)
    for name in msg.__dataclass_fields__:
        assert _equal(getattr(frame.message, name), getattr(msg, name)), name


def test_header_is_16_bytes_and_documented_layout() -> None:
    data = wire.encode(wire.End(3), session=1, round=2)
    assert wire.HEADER_SIZE == 16
    assert data[:2] == b"DS" and data[2] == wire.VERSION and data[3] == wire.MsgType.END
    assert struct.unpack_from("<III", data, 4) == (1, 2, 4)
    assert len(data) == 20


def test_specific_errors() -> None:
    good = wire.encode(wire.Draft(1, np.zeros(0, np.int32), np.array([1, 2], np.int32),
                                  q_draft=np.array([0.5, 0.5], np.float32)))
    with pytest.raises(wire.Truncated):
        wire.decode(good[:10])
    with pytest.raises(wire.Truncated):
        wire.decode(good[:-1])
    with pytest.raises(wire.BadMagic):
        wire.decode(b"XX" + good[2:])
    with pytest.raises(wire.WrongVersion):
        wire.decode(good[:2] + bytes([9]) + good[3:])
    with pytest.raises(wire.UnknownType):
        wire.decode(good[:3] + bytes([200]) + good[4:])
    with pytest.raises(wire.Oversized):
        wire.decode(good, max_frame=len(good) - 1)
    with pytest.raises(wire.Malformed):
        wire.decode(good + b"\0")
    with pytest.raises(wire.Malformed):  # bad sampling settings inside a Start
        bad = wire.Start("dssd", SamplingParams(), 0, 1, np.array([1], np.int32))
        wire.decode(wire.encode(bad).replace(b'"top_p":1.0', b'"top_p":7.0'))
    with pytest.raises(wire.Malformed):
        wire.decode("text frame")  # type: ignore[arg-type]


def test_fuzz_random_bytes_and_mutations() -> None:
    """>= 10k random and mutated frames: decode returns a Frame or raises WireError only."""
    rng = np.random.default_rng(1234)
    valid = [wire.encode(m) for m in _messages()]
    outcomes = {"ok": 0, "error": 0}
    for i in range(12_000):
        if i % 4 == 0:
            data = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
            if i % 8 == 0:  # random bytes behind a valid header prefix
                data = valid[i % len(valid)][:4] + data
        else:
            buf = bytearray(valid[int(rng.integers(len(valid)))])
            for _ in range(int(rng.integers(1, 4))):
                op = rng.integers(3)
                pos = int(rng.integers(len(buf) + 1))
                if op == 0 and buf:
                    buf[min(pos, len(buf) - 1)] = int(rng.integers(256))
                elif op == 1:
                    del buf[pos : pos + int(rng.integers(1, 8))]
                else:
                    buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 8)), dtype=np.uint8).tobytes()
            if rng.random() < 0.5 and len(buf) >= wire.HEADER_SIZE:  # keep the length honest
                struct.pack_into("<I", buf, 12, len(buf) - wire.HEADER_SIZE)
            data = bytes(buf)
        try:
            wire.decode(data)
            outcomes["ok"] += 1
        except wire.WireError:
            outcomes["error"] += 1
    assert outcomes["error"] > 1000 and outcomes["ok"] > 100, outcomes


def test_ids_narrow_to_uint16_and_widen_when_needed() -> None:
    """Ids travel as uint16 when they fit (any vocabulary up to 65,536), else int32; exact both ways."""
    q = np.array([0.5, 0.25, 0.125, 1.0], np.float32)
    small = wire.Draft(100, np.zeros(0, np.int32), np.array([1, 2, 65535, 4], np.int32), q_draft=q)
    assert len(wire.encode(small)) == 16 + 8 + 4 * 2 + 4 * 4  # 48 bytes for a gamma-4 DSSD round
    big = wire.Draft(100, np.array([262_143], np.int32), np.array([1, 70_000, 3, 4], np.int32), q_draft=q)
    back = wire.decode(wire.encode(big)).message
    assert back.prefix_ids.tolist() == [262_143] and back.draft_ids.tolist() == [1, 70_000, 3, 4]
    assert len(wire.encode(wire.VerdictMsg(VerdictKind.BONUS, 4, 17))) == 16 + 7
    cand = wire.VerdictMsg(VerdictKind.RESAMPLE, 1, p_ids=np.array([5, 9, 5, 80_000], np.int32),
                           p_values=np.array([0.1, 0.2, 0.1, 0.3], np.float32), candidates=True)
    back = wire.decode(wire.encode(cand)).message
    assert back.candidates and back.p_ids.tolist() == [5, 9, 5, 80_000]


def test_welcome_replica_travels_only_when_set() -> None:
    """A Welcome without a replica id is byte-identical to the original one (old devices and
    edges interoperate); one with it names the replica."""
    plain = wire.Welcome(7, "m", "sha256:abc", 10, (0,), 4, 64, 32, ("full",))
    assert b"replica" not in wire.encode(plain)
    named = wire.decode(wire.encode(wire.Welcome(7, "m", "sha256:abc", 10, (0,), 4, 64, 32, ("full",), "r1")))
    assert named.message.replica == "r1" and wire.decode(wire.encode(plain)).message.replica == ""
