"""`adapterserve serve` refuses bad flags with one line naming the flag, before it loads a model."""
import hashlib
import json
import logging

import pytest

from engine.cli import _parser, main


@pytest.mark.parametrize("flags,message", [
    (["--port", "99999"], "argument --port: a port is 0-65535, got 99999"),
    (["--metrics-port", "-2"], "argument --metrics-port: a port is 0-65535, got -2"),
    (["--threads", "0"], "argument --threads: must be > 0, got 0"),
    (["--max-device-adapters", "0"], "argument --max-device-adapters: must be > 0, got 0"),
    (["--grace-seconds", "-1"], "argument --grace-seconds: must be >= 0, got -1"),
    (["--max-message-mb", "0"], "argument --max-message-mb: must be 1-2047"),
    (["--max-message-mb", "2048"], "argument --max-message-mb: must be 1-2047 (gRPC's limit is a 32-bit byte count)"),
    (["--grace-seconds", "inf"], "argument --grace-seconds: must be a finite number, got inf"),
])
def test_bad_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--adapter", "sentiment"], "--adapter expects NAME=SOURCE, got 'sentiment'"),
    (["--adapter", "=/tmp/x"], "--adapter expects NAME=SOURCE, got '=/tmp/x'"),
    (["--adapter", "a=/tmp/x", "--adapter", "a=/tmp/y"], "--adapter names 'a' more than once"),
    (["--api-keys", "/nonexistent/keys.json"], "cannot read API key file /nonexistent/keys.json"),
    (["--model", "/nonexistent/model"], "no model folder at '/nonexistent/model'"),
    (["--device", "banana"], "device 'banana' is not a device: use auto, cpu, cuda or cuda:N"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--adapter-store", "/nonexistent/store"], "adapter store '/nonexistent/store' is not a folder"),
])
def test_start_up_failures_are_one_line_errors(flags, message, capsys):
    assert main(["serve", "--port", "0", "--metrics-port", "-1", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "Error: " not in err  # no exception class names ("ValueError: adapter store ...", a review)


@pytest.mark.parametrize("argv, usage", [
    (["info", "--bogus"], "usage: adapterserve info "),
    (["serve", "--bogus"], "usage: adapterserve serve "),
    (["adapters", "load", "/x", "--bogus"], "usage: adapterserve adapters load "),
])
def test_an_unknown_flag_shows_its_commands_usage(argv, usage, capsys):
    """argparse reported it with the top-level usage, "adapterserve [-h] COMMAND ..." (a review)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and usage in err and "unrecognized arguments: --bogus" in err


def test_a_server_address_without_a_port_takes_the_servers_default():
    from engine.cli_types import address

    # gRPC dials port 443 for a host alone: "--server localhost" never reached a server on 50051
    assert [address(a) for a in ("localhost", "[::1]", "h:7", "::1", "fe80::1", "[::1]:7", "unix:/tmp/s")] == [
        "localhost:50051", "[::1]:50051", "h:7", "[::1]:50051", "[fe80::1]:50051", "[::1]:7", "unix:/tmp/s"]


def test_no_server_there_is_said_plainly(capsys):
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    assert main(["embed", "hi", "--server", f"localhost:{port}", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert f"error: no adapterserve server answered at localhost:{port} (is it running" in err
    assert "(no reason)" not in err


def test_hash_key_help_says_what_each_role_may_do(capsys):
    with pytest.raises(SystemExit):
        main(["hash-key", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "with --role admin that is an operator key" in out and "admin: also lists, shows, loads, unloads and averages" in out


def test_no_access_log_quiets_only_the_access_logger(monkeypatch):
    from engine.service.rpc import access_log, log

    monkeypatch.setattr(access_log, "level", logging.NOTSET)  # restored after the test
    flags = ["serve", "--port", "0", "--metrics-port", "-1", "--model", "/nonexistent"]
    assert main(flags) == 2
    assert access_log.level == logging.NOTSET  # on by default: it follows ADAPTERSERVE_LOG_LEVEL
    assert main([*flags, "--no-access-log"]) == 2
    assert access_log.level == logging.WARNING and log.level == logging.NOTSET  # errors are still logged


@pytest.mark.parametrize("flags,top", [([], 0), (["--metrics-per-adapter"], 50), (["--metrics-per-adapter", "8"], 8)])
def test_metrics_per_adapter_is_opt_in(flags, top):
    from engine.cli import _parser

    assert _parser().parse_args(["serve", *flags]).metrics_per_adapter == top


def test_adapter_listings_leave_out_the_slot_the_api_does_not_carry():
    from engine.cli import _plain
    from engine.types import AdapterInfo

    info = AdapterInfo(name="a", tenant=None, method="lora", source="/x", num_params=8, head_type=None, labels=(),
                       slot=-1, tier="device")
    assert "slot" not in _plain([info])[0] and _plain([info])[0]["tier"] == "device"


def test_serve_gives_the_signal_handlers_back_to_an_in_process_caller():
    import signal

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    assert main(["serve", "--port", "0", "--metrics-port", "-1", "--model", "/nonexistent/model"]) == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("argv, message", [
    (["hash-key", "k", "--tenant", ""], "argument --tenant: a tenant must be a non-empty string"),
    (["hash-key", "k", "--tenant", "acme\n"], "argument --tenant: a tenant must not hold control characters"),
    (["embed", "hi", "--server", ""], "argument --server: the server address must be host:port"),
    (["embed", "hi", "--timeout", "0"], "argument --timeout: must be > 0, got 0"),
    (["embed", "hi", "--timeout", "nan"], "argument --timeout: must be a finite number, got nan"),
    (["embed", "hi", "--adapter", ""], "argument --adapter: an adapter name must be a non-empty string"),
    (["embed", "hi", "--server", " "], "argument --server: the server address must be host:port, got ' '"),
    (["info", "--server", "localhost:99999"], "argument --server: a port is 0-65535, got 99999"),  # reached 34463
    (["embed", "hi", "--tenant", " acme"], "argument --tenant: a tenant must not hold control characters, invisible"),
    (["adapters", "load", "/tmp/x", "--name", ""], "argument --name: an adapter name must be a non-empty string"),
    (["adapters", "average", "x", "a=b"], "argument ADAPTER=WEIGHT: expects ADAPTER=WEIGHT, got 'a=b'"),
    (["adapters", "average", "x", "=1"], "expects ADAPTER=WEIGHT, got '=1'"),
])
def test_values_the_server_would_take_for_none_are_refused(argv, message, capsys):
    # over gRPC "" means unset: an empty --name or --tenant would silently act on the default instead
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_hash_key_refuses_a_blank_key(capsys):
    assert main(["hash-key", "  "]) == 2
    err = capsys.readouterr()
    assert "the key must not be empty or blank" in err.err and err.out == ""


def test_an_empty_server_variable_falls_back_to_the_default(monkeypatch):
    monkeypatch.setenv("ADAPTERSERVE_SERVER", "")
    parser = _parser()  # the default is read from the environment when the parser is built
    assert parser.parse_args(["embed", "hi"]).server == "localhost:50051"


def test_hash_key_prints_a_key_file_entry(capsys):
    assert main(["hash-key", "secret", "--tenant", "acme", "--role", "admin"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry == {"sha256": hashlib.sha256(b"secret").hexdigest(), "tenant": "acme", "role": "admin"}


@pytest.mark.parametrize("key", ["ké", "a\nb"])
def test_an_api_key_no_grpc_header_can_carry_is_one_line_error(key, capsys):
    """gRPC logged C-core internals, then INTERNAL 'Invalid metadata' (a probe)."""
    assert main(["info", "--api-key", key, "--server", "localhost:1"]) == 2
    err = capsys.readouterr().err
    assert err == "adapterserve: error: an API key must be printable ASCII: it travels as a gRPC text header\n"


def test_output_to_a_reader_that_left_is_no_traceback():
    """`adapterserve embed ... | head -1` ended in a BrokenPipeError traceback (a probe)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "engine.cli", "hash-key", "k" * 100_000],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader leaves before the output is written
    err = child.stderr.read().decode()
    assert child.wait(60) == 1 and "Traceback" not in err, err
