"""Fuzzing the parsers that read untrusted bytes: safetensors headers, the index, config.json.

Every input must end either in a checkpoint whose every tensor reads back within the file's
bytes, or in CheckpointError: never another exception, never a hang (hypothesis deadline),
never an allocation sized by a declared length (tracemalloc peak bounded by the input size).

The default run is bounded (FUZZ_EXAMPLES per test, a few hundred in all); set
K2MINI_FUZZ_EXAMPLES=20000 for a long run (see scripts/fuzz_headers.sh).
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2mini.checkpoint.reader import INDEX_FILE, Checkpoint
from k2mini.checkpoint.safetensors_format import ITEMSIZE, PlannedTensor, encode_header
from k2mini.checkpoint.source import LocalSource
from k2mini.errors import CheckpointError
from k2mini.model.spec import ModelSpec

FUZZ_EXAMPLES = int(os.environ.get("K2MINI_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=3000,  # ms per case: a hang or quadratic blow-up fails here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    derandomize=os.environ.get("K2MINI_FUZZ_EXAMPLES") is None,  # the default suite is reproducible
)
# Parsing JSON expands text into Python objects (a dict entry per key, boxed ints...), so
# peak memory is a multiple of the input; a declared length never enters into it.
MEMORY_FACTOR = 80
MEMORY_SLACK = 4 << 20

SHARD = "model-1-of-1.safetensors"
CONFIG = b'{"hidden_size": 64}'


class MemorySource:
    """The Source protocol over in-memory files, so each case costs no disk I/O."""

    description = "mem"
    concurrency = 1

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.bytes_read = 0

    def exists(self, rel: str) -> bool:
        return rel in self.files

    def size(self, rel: str) -> int:
        if rel not in self.files:
            raise CheckpointError("file is missing", path=rel)
        return len(self.files[rel])

    def read_into(self, rel: str, offset: int, buf: memoryview) -> None:
        data = self.files[rel][offset : offset + len(buf)]
        if len(data) < len(buf):
            raise CheckpointError("truncated", path=rel)
        buf[:] = data
        self.bytes_read += len(data)

    def read_bytes(self, rel: str) -> bytes:
        return self.files[rel]

    def list_files(self) -> list[str]:
        return sorted(self.files)


def check_outcome(files: dict[str, bytes]) -> str:
    """Open and read everything; return 'ok' or 'refused'. Any other exception fails the test."""
    total = sum(len(b) for b in files.values())
    tracemalloc.start()
    try:
        try:
            ck = Checkpoint(MemorySource(files))
        except CheckpointError:
            return "refused"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= MEMORY_FACTOR * total + MEMORY_SLACK, (peak, total)
    for t in ck.tensors.values():
        assert 0 <= t.offset and t.offset + t.nbytes <= len(files[t.file])
        raw = ck.read_raw(t.name)
        assert raw.numel() * raw.element_size() == t.nbytes
        assert raw.view(-1).view(torch.uint8).numpy().tobytes() == files[t.file][t.offset : t.offset + t.nbytes]
    for name in ck.weight_names():
        try:
            ck.read(name)
        except CheckpointError:
            pass  # e.g. an FP8 weight with a mismatched scale: refused by name
    return "ok"


def one_shard(shard: bytes, index: bytes | None = None) -> dict[str, bytes]:
    files = {"config.json": CONFIG, SHARD: shard}
    if index is not None:
        files[INDEX_FILE] = index
    else:
        files["model.safetensors"] = files.pop(SHARD)
    return files


# -- strategies ------------------------------------------------------------------------

ints = st.one_of(
    st.integers(-3, 300),
    st.sampled_from([-1, 2**31, 2**32 - 1, 2**40, 2**62, 2**63, 2**64, 10**30]),
)
junk = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=8), st.lists(ints, max_size=3))
names = st.one_of(
    st.builds(
        "model.layers.{}.mlp.experts.{}.{}".format,
        st.integers(0, 3),
        st.integers(0, 3),
        st.sampled_from(["up_proj.weight", "up_proj.weight_scale_inv", "down_proj.weight"]),
    ),
    st.sampled_from(["model.norm.weight", "lm_head.weight", "__metadata__", "", "model.layers." + "9" * 5000 + ".x"]),
    st.text(max_size=20),
)
dtypes = st.one_of(st.sampled_from(sorted(ITEMSIZE)), st.sampled_from(["F4", "f32", "", "I128"]), junk)
shapes = st.one_of(st.lists(st.integers(0, 40), max_size=3), st.lists(ints, max_size=10), junk)
offsets = st.one_of(st.lists(ints, min_size=2, max_size=2), st.lists(ints, max_size=4), junk)
entries = st.fixed_dictionaries({}, optional={"dtype": dtypes, "shape": shapes, "data_offsets": offsets})
metadata = st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), junk)


@st.composite
def structured_shards(draw) -> bytes:
    """Headers with the right keys and wrong values: offsets past EOF, overlaps, odd shapes."""
    header = draw(st.dictionaries(names, st.one_of(entries, junk), max_size=6))
    if draw(st.booleans()):
        header["__metadata__"] = draw(metadata)
    body = json.dumps(header).encode()
    body += b" " * draw(st.integers(0, 8))
    n = draw(st.one_of(st.just(len(body)), ints.filter(lambda v: 0 <= v < 2**64)))
    data = b"\x3c" * draw(st.integers(0, 4096))
    return struct.pack("<Q", n) + body + data


def valid_shard(tensors: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    plan = [PlannedTensor(n, d, s) for n, d, s in tensors]
    head = encode_header(plan)
    return head + b"".join(bytes(range(256)) * (t.nbytes // 256 + 1) for t in plan)[: sum(t.nbytes for t in plan)]


SEED_SHARD = valid_shard(
    [
        ("model.layers.1.mlp.experts.0.up_proj.weight", "F8_E4M3", (130, 40)),
        ("model.layers.1.mlp.experts.0.up_proj.weight_scale_inv", "F32", (2, 1)),
        ("model.layers.1.mlp.gate.weight", "BF16", (4, 40)),
        ("model.norm.weight", "BF16", (40,)),
    ]
)


@st.composite
def mutated_shards(draw) -> bytes:
    """A valid shard with bytes flipped, inserted, deleted or cut, in header and data."""
    b = bytearray(SEED_SHARD)
    (hlen,) = struct.unpack("<Q", b[:8])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "length", "digit", "data"]))
        pos = draw(st.integers(0, max(0, min(len(b), 8 + hlen + 16) - 1)))
        if op == "data" and len(b) > 8 + hlen:
            # Tensor bytes are opaque: any value must read back, never be interpreted.
            b[draw(st.integers(8 + hlen, len(b) - 1))] = draw(st.integers(0, 255))
        if op == "flip" and b:
            b[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del b[draw(st.integers(0, len(b))) :]
        elif op == "length" and len(b) >= 8:
            b[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
        elif op == "digit":
            # Change one number in the header: offsets and shapes become inconsistent.
            digits = [i for i in range(8, min(len(b), 8 + hlen)) if 48 <= b[i] <= 57]
            if digits:
                b[draw(st.sampled_from(digits))] = ord(str(draw(st.integers(0, 9))))
    return bytes(b)


def _deep(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


@st.composite
def hostile_json(draw) -> bytes:
    """JSON-level attacks: nesting, non-objects, huge numbers, duplicate keys, bad UTF-8."""
    kind = draw(st.sampled_from(["deep", "scalar", "bignum", "dup", "bytes", "bigfloat", "deepvalue"]))
    if kind == "deep":
        return _deep(draw(st.integers(500, 200_000)), draw(st.sampled_from(["list", "dict"]))).encode()
    if kind == "deepvalue":
        return ('{"x": ' + _deep(draw(st.integers(500, 50_000)), "list") + "}").encode()
    if kind == "scalar":
        return draw(st.sampled_from([b"[]", b"null", b"1", b'"s"', b"true", b"", b" "]))
    if kind == "bignum":
        return b'{"a": {"dtype": "F32", "shape": [' + b"9" * draw(st.integers(4000, 20000)) + b'], "data_offsets": [0, 4]}}'
    if kind == "bigfloat":
        return b'{"a": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}'
    if kind == "dup":
        return b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}'
    return draw(st.binary(max_size=64)) + b"\xff\xfe" + draw(st.binary(max_size=64))


def framed(body: bytes, data: int = 64) -> bytes:
    return struct.pack("<Q", len(body)) + body + b"\0" * data


# -- the fuzz tests -------------------------------------------------------------------

OUTCOMES: dict[str, dict[str, int]] = {}


def _record(test: str, outcome: str) -> None:
    OUTCOMES.setdefault(test, {}).setdefault(outcome, 0)
    OUTCOMES[test][outcome] += 1


@FUZZ
@given(structured_shards())
def test_structured_headers_end_in_checkpoint_error_or_a_sound_checkpoint(shard):
    _record("structured", check_outcome(one_shard(shard)))


@FUZZ
@given(mutated_shards())
def test_mutated_shards_end_in_checkpoint_error_or_a_sound_checkpoint(shard):
    _record("mutated", check_outcome(one_shard(shard)))


@FUZZ
@given(hostile_json(), st.sampled_from(["header", "index", "config"]))
def test_hostile_json_anywhere_ends_in_checkpoint_error(payload, where):
    if where == "header":
        files = one_shard(framed(payload))
    elif where == "index":
        files = one_shard(SEED_SHARD, index=payload)
    else:
        files = one_shard(SEED_SHARD) | {"config.json": payload}
    outcome = check_outcome(files)
    _record(f"hostile-json-{where}", outcome)
    # A header or index must be refused; config.json is only parsed by the reader (its
    # values are checked by ModelSpec), so a well-formed object there may pass.
    assert outcome == "refused" or (where == "config" and _plain_json_object(payload))


def _plain_json_object(payload: bytes) -> bool:
    def no_dups(pairs):
        assert len({k for k, _ in pairs}) == len(pairs)
        return dict(pairs)

    try:
        return isinstance(json.loads(payload.decode("utf-8"), object_pairs_hook=no_dups), dict)
    except (ValueError, RecursionError, AssertionError):
        return False


weight_map_values = st.one_of(
    st.just(SHARD),
    st.sampled_from(["../x.safetensors", "/etc/passwd", "C:\\x", "a/../../b", "", "nul\x00l", "missing.safetensors"]),
    st.text(max_size=12),
    junk,
)
index_docs = st.one_of(
    st.fixed_dictionaries(
        {"weight_map": st.one_of(st.dictionaries(names, weight_map_values, max_size=6), junk)},
        optional={"metadata": junk},
    ),
    st.dictionaries(st.text(max_size=5), junk, max_size=3),
)


@FUZZ
@given(index_docs)
def test_index_documents_end_in_checkpoint_error_or_a_sound_checkpoint(doc):
    outcome = check_outcome(one_shard(SEED_SHARD, index=json.dumps(doc).encode()))
    _record("index", outcome)
    if outcome == "ok":
        # Only names that stay inside the checkpoint can have been accepted.
        assert set(doc["weight_map"].values()) <= {SHARD}


config_fields = st.fixed_dictionaries(
    {},
    optional={
        k: st.one_of(ints, junk)
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "n_routed_experts",
            "num_experts_per_tok",
            "first_k_dense_replace",
            "n_group",
            "topk_group",
            "n_shared_experts",
            "moe_layer_freq",
            "q_lora_rank",
            "vocab_size",
            "quantization_config",
            "rope_theta",
        )
    },
)


@FUZZ
@given(config_fields)
def test_config_values_are_range_checked(overrides):
    cfg = dict(BASE_CONFIG) | overrides
    try:
        spec = ModelSpec.from_config(cfg)
    except CheckpointError:
        _record("config", "refused")
        return
    _record("config", "ok")
    assert spec.num_hidden_layers * spec.n_routed_experts <= 1 << 18
    assert 1 <= spec.num_experts_per_tok <= spec.n_routed_experts
    assert spec.n_routed_experts % spec.n_group == 0 and 1 <= spec.topk_group <= spec.n_group
    assert 0 <= spec.first_k_dense_replace <= spec.num_hidden_layers
    assert 0 <= spec.n_shared_experts <= 64


BASE_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 256,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
}


def test_seed_shard_itself_opens(tmp_path):
    """The mutation seed is valid, so mutated cases start from something that parses; the
    same bytes on disk through LocalSource give the same table as through MemorySource."""
    assert check_outcome(one_shard(SEED_SHARD)) == "ok"
    (tmp_path / "config.json").write_bytes(CONFIG)
    (tmp_path / "model.safetensors").write_bytes(SEED_SHARD)
    disk = Checkpoint(LocalSource(tmp_path))
    mem = Checkpoint(MemorySource(one_shard(SEED_SHARD)))
    assert disk.tensors == mem.tensors


def test_declared_sizes_never_size_an_allocation(tmp_path):
    """A 1 TiB declared header length and a tensor declared 2**39 bytes past a short file."""
    huge_len = struct.pack("<Q", 1 << 40) + b"{}" + b"\0" * 100
    huge_tensor = framed(json.dumps({"w": {"dtype": "F32", "shape": [1 << 37], "data_offsets": [0, 1 << 39]}}).encode())
    for shard in (huge_len, huge_tensor):
        assert check_outcome(one_shard(shard)) == "refused"


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    if OUTCOMES:
        total = sum(sum(v.values()) for v in OUTCOMES.values())
        print(f"\nfuzz cases: {total} " + json.dumps(OUTCOMES, sort_keys=True))
