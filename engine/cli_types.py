"""argparse value types of the `adapterserve` command line: each refuses a bad value with a message naming it."""
import argparse
import math

from engine.errors import InvalidRequest
from engine.names import check_name

DEFAULT_PORT = 50051  # the server's (serve --port)
GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")  # gRPC targets: passed as they are


def port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {port}")
    return port


def port_or_off(text: str) -> int:
    return -1 if text.strip() == "-1" else port(text)


def name(what: str):
    """argparse type: a name that follows the server's rule (`engine.names`); "" would mean none over gRPC."""
    def parse(text: str) -> str:
        try:
            check_name(text, what)
        except InvalidRequest as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    parse.__name__ = "name"
    return parse


def weighted(text: str) -> tuple[str, float]:
    """argparse type: ADAPTER=WEIGHT (the last '=' splits, so a name may hold one)."""
    name, _, weight = text.rpartition("=")
    try:
        if name:
            return name, float(weight)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expects ADAPTER=WEIGHT, got {text!r}")


def address(text: str) -> str:
    """argparse type: the server's host:port; gRPC would only fail on an empty one after logging internals."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"the server address must be host:port, got {text!r}")
    if ":" not in text or text.endswith("]"):  # a host alone ("localhost", "[::1]"): gRPC would dial port 443
        text += f":{DEFAULT_PORT}"
    elif text.count(":") >= 2 and "[" not in text and "/" not in text and not text.startswith(GRPC_SCHEMES):
        text = f"[{text}]:{DEFAULT_PORT}"  # a bare IPv6 address ("::1") holds no port
    tail = text.rpartition(":")[2]
    if tail.isdigit() and int(tail) > 65535:  # gRPC takes it modulo 65536: localhost:99999 reached port 34463
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {tail} in {text!r}")
    return text


def message_mb(text: str) -> int:
    """argparse type: 1-2047 MB (gRPC takes the byte count as a 32-bit int)."""
    value = int(text)
    if not 0 < value < 2048:
        raise argparse.ArgumentTypeError(f"must be 1-2047 (gRPC's limit is a 32-bit byte count), got {text}")
    return value


def positive(kind, zero: bool = False):
    """argparse type: a number of ``kind`` above 0 (or at least 0)."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse
