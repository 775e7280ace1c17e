"""libchirp.Config: defaults, conversion at set time, sealing (docs/config.md); pure Python."""

import pytest

import libchirp
import libchirp.config

DEFAULTS = {
    "REUSE_TIME": 30.0,
    "TIMEOUT": 5.0,
    "PORT": 2998,
    "BACKLOG": 100,
    "MAX_SLOTS": 0,
    "SYNCHRONOUS": True,
    "DISABLE_SIGNALS": False,
    "BUFFER_SIZE": 0,
    "MAX_MSG_SIZE": 104857600,
    "BIND_V6": "::",
    "BIND_V4": "0.0.0.0",
    "IDENTITY": bytes(16),
    "CERT_CHAIN_PEM": None,
    "DH_PARAMS_PEM": None,
    "DISABLE_ENCRYPTION": False,
    "MAX_SEND_QUEUE": 0,
    "AUTO_RELEASE": True,
    "MAX_CONNECTIONS": 0,
    "MAX_CONNECTIONS_PER_ADDRESS": 0,
}


def test_defaults():
    cfg = libchirp.Config()
    for name, value in DEFAULTS.items():
        got = getattr(cfg, name)
        assert got == value and type(got) is type(value), name


def test_unknown_attribute_is_an_error():
    cfg = libchirp.Config()
    with pytest.raises(AttributeError):
        cfg.TIMEOUTS = 3.0
    with pytest.raises(AttributeError):
        cfg.timeout = 3.0
    with pytest.raises(AttributeError):
        _ = cfg.NOPE


@pytest.mark.parametrize("name", ["REUSE_TIME", "TIMEOUT"])
def test_float_fields(name):
    cfg = libchirp.Config()
    setattr(cfg, name, 2)
    assert getattr(cfg, name) == 2.0 and isinstance(getattr(cfg, name), float)
    for bad in ("1", None, b"1", True):
        with pytest.raises(TypeError):
            setattr(cfg, name, bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=name):
            setattr(cfg, name, bad)


@pytest.mark.parametrize(
    "name,low,high,zero",
    [
        ("PORT", 1025, 65535, True),
        ("BACKLOG", 0, 127, True),
        ("MAX_SLOTS", 1, 32, True),
        ("BUFFER_SIZE", 1024, 2**32 - 1, True),
        ("MAX_MSG_SIZE", 1, 2**32 - 1, False),
        ("MAX_SEND_QUEUE", 0, 2**32 - 1, True),
        ("MAX_CONNECTIONS", 1, 1000000, True),
        ("MAX_CONNECTIONS_PER_ADDRESS", 1, 1000000, True),
    ],
)
def test_int_fields_range(name, low, high, zero):
    """Set-time checks use the limits of csrc/config.c; errors are ValueError and OverflowError."""
    cfg = libchirp.Config()
    for good in (low, high) + ((0,) if zero else ()):
        setattr(cfg, name, good)
        assert getattr(cfg, name) == good
    before = getattr(cfg, name)
    bad_values = [high + 1, -1] + ([low - 1] if low - 1 > 0 else [])
    if not zero:
        bad_values.append(0)
    for bad in bad_values:
        with pytest.raises(ValueError, match="Config.%s = %d" % (name, bad)) as info:
            setattr(cfg, name, bad)
        assert isinstance(info.value, OverflowError), "1.x raised OverflowError"
        assert isinstance(info.value, libchirp.ChirpConfigRangeError)
        assert libchirp.config.LIMITS[name].text in str(info.value), "the text names the limits"
    for bad in (1.0, "5", None, False):
        with pytest.raises(TypeError):
            setattr(cfg, name, bad)
    assert getattr(cfg, name) == before, "a rejected value must not be stored"


@pytest.mark.parametrize(
    "name,value,text",
    [
        ("PORT", 1024, "Config: port must be > 1024."),
        ("PORT", 65536, "Config: port must be <= 65535."),
        ("TIMEOUT", 0.05, "Config: timeout must be >= 0.1."),
        ("TIMEOUT", 1200.5, "Config: timeout must be <= 1200."),
        ("REUSE_TIME", -1.0, "Config: reuse time must be >= 0."),
        ("REUSE_TIME", 3601.0, "Config: reuse time must be <= 3600."),
        ("BACKLOG", 128, "Config: backlog must be < 128."),
        ("MAX_SLOTS", 33, "Config: max slots must be <= 32."),
        ("BUFFER_SIZE", 1000, "Config: buffer size must be >= 1024 or 0 for the default."),
        ("MAX_MSG_SIZE", 0, "Config: max message size must be > 0."),
    ],
)
def test_out_of_range_is_refused_when_set(name, value, text):
    """The check happens once, at assignment, with the 1.x wording, the field and its limits."""
    cfg = libchirp.Config()
    with pytest.raises(OverflowError) as info:
        setattr(cfg, name, value)
    msg = str(info.value)
    assert msg.startswith(text), msg
    assert "Config.%s = %r" % (name, value) in msg and "limits: " in msg
    assert isinstance(info.value, ValueError) and info.value.ecode == 1


def test_port_zero_means_a_free_port():
    cfg = libchirp.Config()
    cfg.PORT = 0
    assert cfg.PORT == 0
    assert "free port" in libchirp.config.LIMITS["PORT"].zero


def test_limits_table_covers_every_field():
    """libchirp.config.LIMITS is the one table of defaults and limits (chirp --help shows it)."""
    from libchirp.config import LIMITS

    assert list(LIMITS) == list(DEFAULTS)
    for name, lim in LIMITS.items():
        assert lim.default == DEFAULTS[name] and lim.text and lim.meaning, name
        if lim.low is not None:
            assert lim.too_low and lim.too_high, name


def test_start_check_names_the_certificate_first(tmp_path):
    """A default Config() fails at node start asking for a certificate, then DH parameters."""
    cfg = libchirp.Config()
    with pytest.raises(ValueError) as info:
        cfg._check_start()
    assert str(info.value).startswith("Config: CERT_CHAIN_PEM must be set.")
    assert "DH_PARAMS_PEM" not in str(info.value) and "DISABLE_ENCRYPTION" in str(info.value)
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    cfg.CERT_CHAIN_PEM = cert
    with pytest.raises(ValueError, match="^Config: DH_PARAMS_PEM must be set."):
        cfg._check_start()
    cfg.DH_PARAMS_PEM = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="DH params .*missing.pem does not exist.*DH_PARAMS_PEM"):
        cfg._check_start()
    cfg.DISABLE_ENCRYPTION = True
    cfg._check_start()


def test_start_check_effective_reuse_time():
    cfg = libchirp.Config()
    cfg.DISABLE_ENCRYPTION = True
    cfg.TIMEOUT = 0.1
    cfg.REUSE_TIME = 0.2
    with pytest.raises(OverflowError, match="reuse time must be >= 0.5.*REUSE_TIME = 0.2"):
        cfg._check_start()
    cfg.REUSE_TIME = 0.5
    cfg._check_start()


@pytest.mark.parametrize(
    "name", ["SYNCHRONOUS", "DISABLE_SIGNALS", "DISABLE_ENCRYPTION", "AUTO_RELEASE"]
)
def test_bool_fields(name):
    cfg = libchirp.Config()
    for value, want in ((True, True), (False, False), (1, True), (0, False)):
        setattr(cfg, name, value)
        assert getattr(cfg, name) is want
    for bad in (2, "yes", None):
        with pytest.raises(TypeError):
            setattr(cfg, name, bad)


def test_bind_addresses_are_validated_and_compressed():
    cfg = libchirp.Config()
    cfg.BIND_V4 = "127.0.0.1"
    assert cfg.BIND_V4 == "127.0.0.1"
    cfg.BIND_V6 = "0:0:0:0:0:0:0:1"
    assert cfg.BIND_V6 == "::1"
    cfg.BIND_V6 = "FE80:0000::0001"
    assert cfg.BIND_V6 == "fe80::1"
    for bad in ("::1", "localhost", "1.2.3", "256.0.0.1", ""):
        with pytest.raises(ValueError, match="BIND_V4"):
            cfg.BIND_V4 = bad
    for bad in ("127.0.0.1", "::g", "1::2::3", ""):
        with pytest.raises(ValueError, match="BIND_V6"):
            cfg.BIND_V6 = bad
    with pytest.raises(TypeError):
        cfg.BIND_V4 = b"\x7f\0\0\1"


def test_identity():
    cfg = libchirp.Config()
    cfg.IDENTITY = bytearray(range(16))
    assert cfg.IDENTITY == bytes(range(16)) and type(cfg.IDENTITY) is bytes
    for bad in (bytes(15), bytes(17), b""):
        with pytest.raises(ValueError, match="16"):
            cfg.IDENTITY = bad
    for bad in ("0123456789abcdef", 5, None):
        with pytest.raises(TypeError):
            cfg.IDENTITY = bad


def test_pem_paths(tmp_path):
    cfg = libchirp.Config()
    cfg.CERT_CHAIN_PEM = tmp_path / "cert.pem"
    assert cfg.CERT_CHAIN_PEM == str(tmp_path / "cert.pem")
    cfg.DH_PARAMS_PEM = "dh.pem"
    assert cfg.DH_PARAMS_PEM == "dh.pem"
    cfg.DH_PARAMS_PEM = None
    assert cfg.DH_PARAMS_PEM is None
    with pytest.raises(TypeError):
        cfg.CERT_CHAIN_PEM = 5
    with pytest.raises(ValueError):
        cfg.CERT_CHAIN_PEM = "a\0b"


def test_sealed_config_is_read_only():
    cfg = libchirp.Config()
    cfg.PORT = 4000
    cfg._seal()
    assert cfg.sealed
    with pytest.raises(RuntimeError):
        cfg.PORT = 4001
    assert cfg.PORT == 4000
    with pytest.raises(AttributeError):
        cfg.NOPE = 1


def test_repr_names_fields():
    text = repr(libchirp.Config())
    for name in DEFAULTS:
        assert name in text


def test_config_check_reference_prefixes():
    """ch_config_check, the C core's own check (defence in depth), keeps the 1.x prefixes."""
    from libchirp._core import check_config, fill_config

    def check(**fields):
        cfg = libchirp.Config()
        cfg.DISABLE_ENCRYPTION = True
        cfg.PORT = 3000
        for name, value in fields.items():
            object.__setattr__(cfg, name, value)  # bypass the set-time check: test the C one
        ccfg, _keep = fill_config(cfg)
        check_config(ccfg)

    check()
    cases = [
        ({"PORT": 1024}, "Config: port must be > 1024, or 0 for a free port."),
        ({"BACKLOG": 128}, "Config: backlog must be < 128."),
        ({"TIMEOUT": 1200.5}, "Config: timeout must be <= 1200."),
        ({"TIMEOUT": 0.05}, "Config: timeout must be >= 0.1."),
        ({"BUFFER_SIZE": 1000}, "Config: buffer size must be"),
        ({"DISABLE_ENCRYPTION": False}, "Config: DH_PARAMS_PEM must be set."),
    ]
    for fields, text in cases:
        with pytest.raises(ValueError) as info:
            check(**fields)
        assert text in str(info.value), (fields, str(info.value))
        assert info.value.ecode == 1


def test_fill_config_copies_every_field():
    from libchirp._core import ffi, fill_config

    cfg = libchirp.Config()
    cfg.REUSE_TIME = 12.5
    cfg.TIMEOUT = 2.0
    cfg.PORT = 4321
    cfg.BACKLOG = 7
    cfg.MAX_SLOTS = 3
    cfg.SYNCHRONOUS = False
    cfg.DISABLE_SIGNALS = True
    cfg.BUFFER_SIZE = 2048
    cfg.MAX_MSG_SIZE = 999
    cfg.BIND_V6 = "::1"
    cfg.BIND_V4 = "127.0.0.2"
    cfg.IDENTITY = bytes(range(16))
    cfg.CERT_CHAIN_PEM = "/c.pem"
    cfg.DH_PARAMS_PEM = "/d.pem"
    cfg.DISABLE_ENCRYPTION = True
    cfg.MAX_SEND_QUEUE = 17
    c, keep = fill_config(cfg)
    assert (c.reuse_time, c.timeout, c.port, c.backlog, c.max_slots) == (12.5, 2.0, 4321, 7, 3)
    assert (c.synchronous, c.disable_signals, c.disable_encryption) == (0, 1, 1)
    assert (c.buffer_size, c.max_msg_size, c.max_send_queue) == (2048, 999, 17)
    assert bytes(c.bind_v6) == bytes(15) + b"\x01"
    assert bytes(c.bind_v4) == b"\x7f\x00\x00\x02"
    assert bytes(c.identity) == bytes(range(16))
    assert ffi.string(c.cert_chain_pem) == b"/c.pem"
    assert ffi.string(c.dh_params_pem) == b"/d.pem"
    c2, _ = fill_config(libchirp.Config())
    assert c2.cert_chain_pem == ffi.NULL and c2.dh_params_pem == ffi.NULL
