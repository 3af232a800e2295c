import numpy as np
import pytest

from faceps.core import ConfigError, decode, encode, linear_to_srgb, parse_encoding, srgb_to_linear
from faceps.core.color import srgb_to_linear_torch
from tests.tolerances import assert_close


def test_srgb_round_trip_and_known_values():
    x = np.linspace(-0.2, 1.5, 2001, dtype=np.float32)
    assert_close(linear_to_srgb(srgb_to_linear(x)), x, atol=2e-6)
    # reference points of the IEC 61966-2-1 curve
    assert_close(srgb_to_linear(np.array([0.0, 0.04045, 0.5, 1.0])),
                 [0.0, 0.04045 / 12.92, 0.21404114, 1.0], atol=1e-6)
    assert srgb_to_linear(np.array([0.5])).dtype == np.float32


def test_every_8bit_code_survives_a_round_trip():
    codes = np.arange(256) / 255.0
    back = np.round(linear_to_srgb(srgb_to_linear(codes)) * 255)
    assert np.array_equal(back, np.arange(256))


@pytest.mark.parametrize("enc", ["linear", "srgb", "gamma:2.2", "GAMMA:1.8", " sRGB "])
def test_decode_encode_inverse(enc):
    x = np.random.default_rng(0).uniform(0, 1, 100).astype(np.float32)
    assert_close(encode(decode(x, enc), enc), x, atol=1e-5)


def test_gamma_decoding_is_a_power_law():
    assert_close(decode(np.array([0.5]), "gamma:2.2"), [0.5**2.2], rtol=1e-5)
    assert parse_encoding("gamma:2.2") == ("gamma", 2.2)


@pytest.mark.parametrize("bad", ["", "rgb", "gamma:", "gamma:-1", "gamma:0", "gamma:abc", 3])
def test_unknown_encodings_raise(bad):
    with pytest.raises(ConfigError):
        parse_encoding(bad)


def test_torch_srgb_agrees():
    torch = pytest.importorskip("torch")
    x = np.linspace(0, 1, 101, dtype=np.float32)
    assert_close(srgb_to_linear_torch(torch.tensor(x)), srgb_to_linear(x), atol=1e-6)
