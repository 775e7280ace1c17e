"""The error code -> exception mapping (docs/protocol.md#errors); pure Python."""

import errno

import pytest

import libchirp
from libchirp.errors import ERROR_NAMES, ChirpError, chirp_error_to_exception

# code -> builtin(s) the exception must be an instance of
EXPECTED = {
    1: (ValueError,),
    2: (RuntimeError,),
    3: (RuntimeError, ConnectionError),
    4: (OSError,),
    5: (RuntimeError,),
    6: (RuntimeError, ConnectionError),
    7: (Exception,),
    8: (Exception,),
    9: (TimeoutError,),
    10: (MemoryError,),
    11: (ConnectionError,),
    12: (ConnectionError,),
    13: (Exception,),
    14: (Exception,),
    15: (Exception,),
    16: (Exception,),
    17: (Exception,),
    18: (ConnectionError,),
    19: (RuntimeError,),
    20: (MemoryError,),
}


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_every_code_maps_to_its_builtin(code):
    exc = chirp_error_to_exception(code, "some text")
    assert isinstance(exc, ChirpError)
    for base in EXPECTED[code]:
        assert isinstance(exc, base), (code, type(exc).__mro__)
    assert exc.ecode == code
    assert "some text" in str(exc)


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_text_defaults_to_the_code_name(code):
    for text in (None, "", b""):
        exc = chirp_error_to_exception(code, text)
        assert str(exc).endswith("CH_" + ERROR_NAMES[code])


def test_success_is_no_error():
    assert chirp_error_to_exception(0, "") is None


@pytest.mark.parametrize("code", [21, 99, 1000])
def test_unknown_code(code):
    exc = chirp_error_to_exception(code, None)
    assert isinstance(exc, ChirpError)
    assert str(exc) == "Unknown error: %d" % code
    assert exc.ecode == code


def test_bytes_text_is_decoded():
    exc = chirp_error_to_exception(3, b"peer closed \xff")
    assert "peer closed" in str(exc)


def test_address_in_use_has_errno():
    exc = chirp_error_to_exception(4, "cannot listen on IPv4 port 3000")
    assert exc.errno == errno.EADDRINUSE
    assert "cannot listen" in str(exc)


def test_shutdown_is_connection_error_not_runtime_error():
    exc = chirp_error_to_exception(11, "node stopped")
    assert isinstance(exc, libchirp.ChirpShutdown)
    assert isinstance(exc, ConnectionError)
    assert not isinstance(exc, RuntimeError)


def test_exceptions_can_be_raised_and_caught_by_builtin():
    with pytest.raises(TimeoutError):
        raise chirp_error_to_exception(9, "x")
    with pytest.raises(ConnectionError):
        raise chirp_error_to_exception(3, "x")
    with pytest.raises(RuntimeError):
        raise chirp_error_to_exception(6, "x")
    with pytest.raises(MemoryError):
        raise chirp_error_to_exception(10, "x")
    with pytest.raises(ValueError, match="Config: port"):
        raise chirp_error_to_exception(1, "Config: port must be > 1024. (80)")


def test_each_call_gives_a_new_instance():
    assert chirp_error_to_exception(11) is not chirp_error_to_exception(11)


def test_names_match_the_c_core():
    from libchirp._core import ffi, lib

    for code, name in ERROR_NAMES.items():
        assert ffi.string(lib.ch_error_name(code)).decode() == "CH_" + name
        assert getattr(lib, "CH_" + name) == code
    assert lib.ch_error_name(len(ERROR_NAMES)) == ffi.NULL


def test_type_error_is_also_assertion_error():
    assert issubclass(libchirp.ChirpTypeError, TypeError)
    assert issubclass(libchirp.ChirpTypeError, AssertionError)


def test_send_queue_full_has_its_own_code():
    """SEND_QUEUE_FULL (20) maps to ChirpSendQueueFull whatever the text says."""
    for text in (None, "", "anything at all", "MAX_SEND_QUEUE"):
        exc = chirp_error_to_exception(20, text)
        assert type(exc) is libchirp.ChirpSendQueueFull and exc.ecode == 20
        assert isinstance(exc, MemoryError) and isinstance(exc, libchirp.ChirpMemoryError)
    # ENOMEM stays out of memory, even with a text that names the setting
    assert type(chirp_error_to_exception(10, "MAX_SEND_QUEUE")) is libchirp.ChirpMemoryError


def test_range_errors_are_also_the_1x_builtins():
    """Config ranges: ValueError and OverflowError; Message.port: ValueError and AssertionError."""
    exc = libchirp.ChirpConfigRangeError("x")
    assert isinstance(exc, (ValueError)) and isinstance(exc, OverflowError)
    assert isinstance(exc, ChirpError) and exc.ecode == 1
    exc2 = libchirp.ChirpMessageValueError("y")
    assert isinstance(exc2, ValueError) and isinstance(exc2, AssertionError)


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_negative_codes_map_like_positive_ones(code):
    """C functions return -CH_<NAME>, events carry CH_<NAME> (csrc/error.h): same exception."""
    exc = chirp_error_to_exception(-code, "text")
    assert type(exc) is type(chirp_error_to_exception(code, "text"))
    assert exc.ecode == code and "text" in str(exc)
