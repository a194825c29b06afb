"""Pure pieces without a server: config, sampling, the session store."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from seamline.cloud.cli import add_arguments, config_from_args
from seamline.cloud.config import CloudConfig, ConfigError, parse_size
from seamline.cloud.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from seamline.cloud.sampling import SamplingParams, draw_seed, sample, validate
from seamline.cloud.sessions import SessionStore
from seamline.protos.codec import CodecConfig


@pytest.mark.parametrize("text, expected", [("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5G", 1_500_000_000),
                                            ("1024", 1024), (4096, 4096), ("64 KiB", 65536), ("3mi", 3 * 2**20)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "2XB", "-1", "", "1.2.3GB", True, float("inf")])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "cloud.toml"
    toml.write_text('model = "demo"\nkv-budget = "1GiB"\nmax_batch = 4\nport = 7000\n')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--config", str(toml), "--max-batch", "8", "--host", "0.0.0.0"]))
    assert (config.kv_budget, config.max_batch, config.port, config.host) == (2**30, 8, 7000, "0.0.0.0")
    js = tmp_path / "cloud.json"
    js.write_text(json.dumps({"cloud": {"session_ttl": 5, "device": "cpu"}}))
    config = CloudConfig.from_sources(js, max_sessions=3)
    assert (config.session_ttl, config.device, config.max_sessions) == (5, "cpu", 3)


@pytest.mark.parametrize("content, fragment", [("bogus = 1", "unknown setting"), ("port = -1", "port"),
                                               ("device = 'tpu'", "device"), ("session_ttl = 0", "session_ttl"),
                                               ("tls_cert = 'a.pem'", "--tls-key"), ("max_batch = 'x'", "max_batch"),
                                               ("[broken", "TOML")])
def test_config_errors_name_the_setting(tmp_path, content, fragment):
    path = tmp_path / "c.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        CloudConfig.from_sources(path)


def test_greedy_and_logprobs():
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    s = sample(logits, SamplingParams(top_logprobs=2), 0)
    assert s.token_id == 1 and s.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    assert [t for t, _ in s.top] == [1, 3]


def test_seeded_draws_depend_on_seed_and_position_only():
    logits = torch.zeros(1000)
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits, p, pos).token_id for pos in range(20)]
    assert draws == [sample(logits, p, pos).token_id for pos in range(20)]
    assert len(set(draws)) > 10
    assert draw_seed(7, 3) != draw_seed(8, 3) and 0 <= draw_seed(2**64 - 1, 10**9) < 2**63
    top_k = SamplingParams(temperature=5.0, top_k=3, seed=1)
    ranked = torch.arange(1000, dtype=torch.float32)
    assert {sample(ranked, top_k, pos).token_id for pos in range(50)} <= {997, 998, 999}


@pytest.mark.parametrize("params", [SamplingParams(temperature=-0.1), SamplingParams(top_k=300),
                                    SamplingParams(top_p=-0.5), SamplingParams(stop_token_ids=(5, 256))])
def test_sampling_validation(params):
    with pytest.raises(InvalidArgument, match="sampling"):
        validate(params, 256)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_limits_rewind_and_ttl():
    clock = Clock()
    store = SessionStore(CloudConfig(max_sessions=2, kv_budget=1000, session_ttl=10), max_positions=128, clock=clock)
    a = store.open("dev", 1, CodecConfig(), SamplingParams(max_new_tokens=2), bytes_per_token=10)
    b = store.open("dev", 1, CodecConfig(), SamplingParams(), bytes_per_token=10)
    with pytest.raises(ResourceExhausted, match="max sessions"):
        store.open("dev", 1, CodecConfig(), SamplingParams(), bytes_per_token=10)
    store.reserve(a, 5)
    assert a.capacity == 64 and store.kv_bytes == 640  # grows in quanta
    store.reserve(b, 30)
    assert b.capacity == 30 and store.kv_bytes == 940  # the quantum would not fit: exactly what is needed
    with pytest.raises(ResourceExhausted, match="KV budget"):
        store.reserve(b, 40)
    with pytest.raises(ResourceExhausted, match="context is full"):
        store.reserve(a, 129)

    a.position = 5
    assert not a.record_sample(9, 128) and a.tokens_generated == 1
    a.position = 6
    assert a.record_sample(9, 128)  # max_new_tokens = 2
    with pytest.raises(FailedPrecondition, match="resend from position 6"):
        a.rewind(7)
    a.rewind(3)
    assert a.position == 3 and a.tokens_generated == 0 and a.first_sample_position is None

    clock.now = 5
    store.touch(a)
    clock.now = 12
    assert [s.id for s in store.evict_expired()] == [b.id]
    assert store.kv_bytes == 640 and len(store) == 1
    clock.now = 30
    with pytest.raises(NotFound):
        store.touch(a)  # expired on access
    assert store.kv_bytes == 0 and store.evicted_total == 2


def test_sampling_never_raises_on_extreme_inputs():
    logits = torch.tensor([1.0, 5.0, 4.999, -3.0])
    assert sample(logits, SamplingParams(temperature=1e-30, seed=3), 0).token_id == 1  # tiny T ~ greedy
    broken = torch.tensor([float("nan"), 2.0, float("nan"), 1.0])
    assert sample(broken, SamplingParams(temperature=1.0, top_p=0.5), 0).token_id == 1
    assert sample(torch.full((4,), float("nan")), SamplingParams(temperature=1.0), 0).token_id in range(4)
    assert sample(torch.full((4,), float("-inf")), SamplingParams(), 0).token_id == 0


def test_a_cache_room_takes_the_new_positions_in_place_and_equals_a_concatenation():
    """``concat_cache`` with a ``CacheRoom`` (what the executor passes: a strided view of its KV slab or of a
    batch's gathered copy) writes the new keys after the past in the buffer itself, no copy of the past."""
    from seamline.partitioner.families.base import CacheRoom, concat_cache

    gen = torch.Generator().manual_seed(0)
    slab = torch.randn(2, 7, 2, 3, 4, generator=gen)  # (B, P+T, 2 = K/V, Hkv, D): the slab's row layout
    past, new = 5, torch.randn(2, 3, 2, 4, generator=gen)  # new keys (B, Hkv, T, D)
    expected = torch.cat([slab[:, :past, 0].transpose(1, 2), new], dim=-2)
    full = concat_cache(CacheRoom(slab[:, :, 0].transpose(1, 2), past), new)
    assert full.data_ptr() == slab.data_ptr()  # the buffer itself, not a copy
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(slab[:, past:, 0], new.transpose(1, 2))  # written into the slab's rows
    with pytest.raises(ValueError, match="cannot take 5 past and 3 new"):
        concat_cache(CacheRoom(slab[:, :, 1].transpose(1, 2), past), torch.zeros(2, 3, 3, 4))
    assert concat_cache(None, new) is new
