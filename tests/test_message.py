"""libchirp messages: defaults, validation, read-only fields, release without slot.

Pure Python: no node is started here (tests/test_node.py covers received messages).
"""

import concurrent.futures

import pytest

import libchirp
import libchirp.queue


def test_queue_message_is_message_thread():
    assert libchirp.queue.Message is libchirp.MessageThread is libchirp.Message
    assert libchirp.Message.__name__ == "Message"
    assert issubclass(libchirp.MessageThread, libchirp.MessageBase)


def test_new_message_defaults():
    msg = libchirp.MessageThread()
    assert isinstance(msg.identity, bytes) and len(msg.identity) == 16
    assert msg.serial == 0
    assert msg.header == b"" and msg.data == b""
    assert msg.address == "0.0.0.0"
    assert msg.port == 0
    assert msg.remote_identity == bytes(16)
    assert msg.has_slot is False


def test_identities_are_random():
    ids = {libchirp.MessageThread().identity for _ in range(1000)}
    assert len(ids) == 1000
    assert bytes(16) not in ids


@pytest.mark.parametrize("name", ["identity", "serial", "remote_identity", "has_slot"])
def test_read_only_fields(name):
    msg = libchirp.MessageThread()
    with pytest.raises(AttributeError):
        setattr(msg, name, getattr(msg, name))


def test_no_new_attributes():
    msg = libchirp.MessageThread()
    with pytest.raises(AttributeError):
        msg.adress = "127.0.0.1"


@pytest.mark.parametrize("name", ["header", "data"])
def test_header_and_data(name):
    msg = libchirp.MessageThread()
    setattr(msg, name, b"abc")
    assert getattr(msg, name) == b"abc"
    setattr(msg, name, bytearray(b"xyz"))
    assert getattr(msg, name) == b"xyz" and type(getattr(msg, name)) is bytes
    setattr(msg, name, memoryview(b"mv"))
    assert getattr(msg, name) == b"mv" and type(getattr(msg, name)) is bytes
    for bad in ("text", 5, None, [1, 2]):
        with pytest.raises(TypeError):
            setattr(msg, name, bad)
        with pytest.raises(AssertionError):  # libchirp 1.x raised AssertionError
            setattr(msg, name, bad)
    assert getattr(msg, name) == b"mv"


def test_header_limit():
    msg = libchirp.MessageThread()
    msg.header = b"h" * 65535
    with pytest.raises(ValueError):
        msg.header = b"h" * 65536


@pytest.mark.parametrize(
    "text,readback",
    [
        ("127.0.0.1", "127.0.0.1"),
        ("10.1.2.3", "10.1.2.3"),
        ("::1", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
    ],
)
def test_address(text, readback):
    msg = libchirp.MessageThread()
    msg.address = text
    assert msg.address == readback


@pytest.mark.parametrize("bad", ["localhost", "1.2.3", "256.1.1.1", "", "::g", "1.2.3.4 "])
def test_bad_address_names_the_value(bad):
    msg = libchirp.MessageThread()
    with pytest.raises(ValueError) as info:
        msg.address = bad
    assert repr(bad) in str(info.value)
    assert msg.address == "0.0.0.0"


def test_address_must_be_str():
    msg = libchirp.MessageThread()
    with pytest.raises(TypeError):
        msg.address = b"127.0.0.1"


def test_port():
    msg = libchirp.MessageThread()
    msg.port = 65535
    assert msg.port == 65535
    msg.port = 0
    assert msg.port == 0
    for bad in (65536, -1, 70000):
        with pytest.raises(ValueError, match="65535"):
            msg.port = bad
        with pytest.raises(AssertionError):  # what libchirp 1.x raised (an assert)
            msg.port = bad
    for bad in ("80", 80.0, None, True):
        with pytest.raises(TypeError):
            msg.port = bad
    assert msg.port == 0


def test_release_without_slot_resolves_to_none():
    msg = libchirp.MessageThread()
    for fut in (msg.release_slot(), msg.release()):
        assert isinstance(fut, concurrent.futures.Future)
        assert fut.done() and fut.result() is None


def test_repr():
    msg = libchirp.MessageThread()
    msg.address = "::1"
    msg.port = 2998
    msg.data = b"12345"
    text = repr(msg)
    assert text.startswith("<Message "), "the documented class name, not MessageThread"
    assert msg.identity.hex() in text and "::1" in text and "2998" in text and "5 bytes" in text


def test_send_without_address_is_refused():
    """A new message's address is unset: sending raises ValueError (1.x sent to 0.0.0.0)."""
    msg = libchirp.Message()
    msg.port = 2998
    with pytest.raises(ValueError, match="address was never set"):
        msg._target()
    msg.address = "0.0.0.0"  # set explicitly: the caller means it
    assert msg._target() == (4, bytes(4))
