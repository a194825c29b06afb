"""One settings mechanism for both daemons: flags, config file and environment from one declaration."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from seamline.cloud.config import CloudConfig
from seamline.edge.cli import add_edge_arguments, add_generate_arguments, run_edge
from seamline.edge.config import DAEMON, EdgeConfig
from seamline.protos.settings import ConfigError, settings_of


def _parser(config_type) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    config_type.add_flags(p)
    return p


def _load(config_type, tmp_path, argv=(), file_text=None, env=None):
    args = _parser(config_type).parse_args(list(argv))
    if file_text is not None:
        path = tmp_path / f"{config_type.SECTION}.toml"
        path.write_text(file_text)
        args.config = str(path)
    return config_type.from_args(args, environ=env or {})


# (config, setting, a bad text value, a good one, what the error says)
CASES = [
    (EdgeConfig, "threads", "many", "3", "expected an integer >= 1"),
    (EdgeConfig, "chunk_tokens", "0", "8", "expected an integer >= 1"),
    (EdgeConfig, "cloud", "localhost", "a:1,b:2", "HOST:PORT"),
    (EdgeConfig, "codec", "int3", "int8", "expected one of fp32"),
    (EdgeConfig, "step_timeout", "inf", "2.5", "finite number"),
    (EdgeConfig, "verify", "maybe", "false", "expected true or false"),
    (CloudConfig, "kv_budget", "lots", "1GiB", "as a size"),
    (CloudConfig, "port", "70000", "7000", "<= 65535"),
    (CloudConfig, "session_ttl", "0", "5", "> 0"),
    (CloudConfig, "device", "tpu", "cpu", "cuda:N"),
]


@pytest.mark.parametrize("config_type, name, bad, good, says", CASES)
def test_a_bad_value_from_each_source_names_the_setting_and_the_source(tmp_path, config_type, name, bad, good,
                                                                       says):
    f = next(f for f in settings_of(config_type) if f.name == name)
    env_name = f"SEAMLINE_{config_type.SECTION.upper()}_{name.upper()}"
    flag = [f.flag, bad] if f.kind is not bool else [f"--{name}={bad}"]
    if f.kind is not bool:
        with pytest.raises(ConfigError) as e:
            _load(config_type, tmp_path, argv=flag)
        assert str(e.value).startswith(f"{name} (flag {f.flag}): ") and says in str(e.value)
    with pytest.raises(ConfigError) as e:
        _load(config_type, tmp_path, file_text=f"{name.replace('_', '-')} = {bad!r}\n")
    assert f"{name} (config file {tmp_path}" in str(e.value) and says in str(e.value)
    with pytest.raises(ConfigError) as e:
        _load(config_type, tmp_path, env={env_name: bad})
    assert str(e.value).startswith(f"{name} (environment variable {env_name}): ") and says in str(e.value)
    good_value = _load(config_type, tmp_path, env={env_name: good})
    assert getattr(good_value, name) == f.convert(good)


def test_env_overrides_file_and_flag_overrides_env(tmp_path):
    file_text = "[edge]\nthreads = 2\nchunk_tokens = 16\ncloud = ['f:1']\nverify = false\n"
    env = {"SEAMLINE_EDGE_THREADS": "3", "SEAMLINE_EDGE_CLOUD": "e:1,e:2"}
    c = _load(EdgeConfig, tmp_path, file_text=file_text)
    assert (c.threads, c.chunk_tokens, c.cloud, c.verify) == (2, 16, ["f:1"], False)
    c = _load(EdgeConfig, tmp_path, file_text=file_text, env=env)
    assert (c.threads, c.chunk_tokens, c.cloud, c.verify) == (3, 16, ["e:1", "e:2"], False)
    c = _load(EdgeConfig, tmp_path, ["--threads", "4", "--verify"], file_text=file_text, env=env)
    assert (c.threads, c.chunk_tokens, c.cloud, c.verify) == (4, 16, ["e:1", "e:2"], True)
    assert _load(EdgeConfig, tmp_path).threads == 1  # the declared default
    c = _load(CloudConfig, tmp_path, ["--max-batch", "8"], file_text="kv-budget = '1GiB'\nmax_batch = 4\n",
              env={"SEAMLINE_CLOUD_KV_BUDGET": "3GiB", "SEAMLINE_CLOUD_MAX_BATCH": "6"})
    assert (c.kv_budget, c.max_batch) == (3 * 2**30, 8)


def test_every_setting_is_a_flag_a_file_key_and_a_variable(tmp_path):
    for config_type in (EdgeConfig, CloudConfig):
        dests = {a.dest for a in _parser(config_type)._actions}
        names = {f.name for f in settings_of(config_type)}
        assert names == {f.name for f in dataclasses.fields(config_type)} and names <= dests
    generate = argparse.ArgumentParser()
    add_generate_arguments(generate)
    daemon_only = {f.name for f in settings_of(EdgeConfig) if f.spec.group == DAEMON}
    shared = {f.name for f in settings_of(EdgeConfig)} - daemon_only
    assert "listen" in daemon_only and {"bundle", "cloud", "token", "split"} <= shared
    assert shared <= {a.dest for a in generate._actions}


def test_the_token_comes_from_its_own_variable_and_is_never_shown(tmp_path):
    c = _load(EdgeConfig, tmp_path, env={"SEAMLINE_TOKEN": "s3cret"})
    assert c.token == "s3cret" and c.to_dict()["token"] == "***"
    with pytest.raises(ConfigError) as e:
        _load(EdgeConfig, tmp_path, file_text="token = 12345\n")
    assert "token (config file" in str(e.value) and "12345" not in str(e.value)


def test_unknown_names_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="environment variable SEAMLINE_EDGE_THRADS: no such edge setting"):
        _load(EdgeConfig, tmp_path, env={"SEAMLINE_EDGE_THRADS": "2"})
    with pytest.raises(ConfigError, match="unknown setting 'thrads'"):
        _load(EdgeConfig, tmp_path, file_text="thrads = 2\n")
    assert _load(EdgeConfig, tmp_path, env={"SEAMLINE_CACHE": "/tmp", "SEAMLINE_EDGE_THREADS": ""}).threads == 1


def test_checks_across_settings(tmp_path):
    with pytest.raises(ConfigError, match="--tls-key"):
        _load(CloudConfig, tmp_path, ["--tls-cert", "a.pem"])
    with pytest.raises(ConfigError, match="threads \\(as given in code\\)"):
        EdgeConfig(threads=0)


def test_the_daemon_reports_a_bad_setting_and_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("SEAMLINE_EDGE_CHUNK_TOKENS", "-3")
    p = argparse.ArgumentParser()
    add_edge_arguments(p)
    assert run_edge(p.parse_args(["--bundle", "nowhere"])) == 2
    err = capsys.readouterr().err
    assert "chunk_tokens (environment variable SEAMLINE_EDGE_CHUNK_TOKENS): expected an integer >= 1" in err
