"""The committed gRPC stubs are exactly what `make protos` generates from seamline.proto."""

from __future__ import annotations

from pathlib import Path

from seamline.protos import generate


def test_committed_stubs_match_regenerated(tmp_path):
    for fresh in generate.generate(tmp_path):
        committed = Path(generate.HERE, fresh.name)
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed.name} differs from a fresh protoc run: run `make protos` and commit the result")


def test_stubs_import_inside_the_package():
    from seamline.protos import seamline_pb2, seamline_pb2_grpc

    assert seamline_pb2_grpc.SeamlineStub is not None
    assert seamline_pb2.StepRequest(start_position=3).start_position == 3
    # k = 0 (all-cloud baseline): token ids instead of a hidden-state tensor
    req = seamline_pb2.StepRequest(tokens=seamline_pb2.TokenIds(ids=[1, 2]))
    assert req.WhichOneof("input") == "tokens"
