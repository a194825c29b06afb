"""seamline.testing, the one home of what tests, benchmarks and the demo share."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from seamline.testing.certs import mint_pki
from seamline.testing.procs import Child, cloud_command
from seamline.testing.wait import WaitTimeout, async_wait_until, wait_until


def test_the_link_emulator_left_the_device_package():
    assert importlib.util.find_spec("seamline.edge.linkemu") is None
    assert importlib.util.find_spec("seamline.testing.linkemu") is not None


def test_wait_until_returns_the_value_or_fails_with_the_message():
    calls = iter([0, None, "ready"])
    assert wait_until(lambda: next(calls), 10, interval=0) == "ready"
    with pytest.raises(WaitTimeout, match="within 0s: the cloud never answered"):
        wait_until(lambda: False, 0, message=lambda: "the cloud never answered")


async def test_async_wait_until_awaits_coroutine_conditions():
    calls = []

    async def condition():
        calls.append(1)
        return len(calls) >= 3 and "done"

    assert await async_wait_until(condition, 10, interval=0) == "done"
    with pytest.raises(WaitTimeout):
        await async_wait_until(lambda: 0, 0)


def test_child_reads_both_streams_and_reports_an_early_exit():
    code = "import sys; print('hello on stdout'); print('oops on stderr', file=sys.stderr); sys.exit(3)"
    child = Child("script", [sys.executable, "-c", code])
    assert child.wait_for(r"hello on (\w+)", 60).group(1) == "stdout"
    with pytest.raises(RuntimeError, match=r"script exited \(3\) before it was ready") as info:
        child.wait_for("never printed", 60)
    assert "oops on stderr" in str(info.value) and "oops on stderr" in child.output
    assert child.stop() == 3


def test_cloud_command_turns_settings_into_flags():
    cmd = cloud_command("demo", "--threads", "2", max_batch=4, log_level=None, session_ttl=1.5)
    assert cmd[1:4] == ["-m", "seamline", "cloud"]
    args = cmd[4:]
    assert args[:2] == ["--model", "demo"] and args[-2:] == ["--threads", "2"]
    flags = dict(zip(args[2:-2:2], args[3:-2:2], strict=True))
    assert flags == {"--host": "127.0.0.1", "--port": "0", "--device": "cpu", "--max-batch": "4",
                     "--session-ttl": "1.5"}


def test_minted_certificates_chain_to_their_own_ca(tmp_path):
    from cryptography import x509

    d = mint_pki(tmp_path / "pki", client_name="phone-b")
    load = lambda name: x509.load_pem_x509_certificate((d / name).read_bytes())
    ca, rogue_ca = load("ca.pem"), load("rogue-ca.pem")
    server, client, rogue = load("server.pem"), load("client.pem"), load("rogue.pem")
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    rogue.verify_directly_issued_by(rogue_ca)
    with pytest.raises(ValueError):
        rogue.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert client.subject.rfc4514_string() == rogue.subject.rfc4514_string() == "CN=phone-b"
