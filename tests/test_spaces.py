import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bridge.spaces import SPACES, LatentSpace, get_space, register_space


def test_registry_holds_the_documented_numbers():
    assert (SPACES["sd15"].channels, SPACES["sd15"].scale, SPACES["sd15"].shift) == (4, 0.18215, 0.0)
    assert (SPACES["sdxl"].channels, SPACES["sdxl"].scale, SPACES["sdxl"].native_resolution) == (4, 0.13025, 1024)
    assert (SPACES["sd3"].channels, SPACES["sd3"].scale, SPACES["sd3"].shift) == (16, 1.5305, 0.0609)
    assert (SPACES["flux"].channels, SPACES["flux"].scale, SPACES["flux"].shift) == (16, 0.3611, 0.1159)
    assert all(s.downscale == 8 for s in SPACES.values())
    assert SPACES["sd15"].native_latent_size == 64 and SPACES["sd3"].native_latent_size == 128


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux"])
def test_raw_model_round_trip(name):
    space = SPACES[name]
    raw = torch.randn(2, space.channels, 4, 4) * 3 + 0.5
    model = space.to_model(raw)
    assert torch.allclose(model, (raw - space.shift) * space.scale)
    assert torch.allclose(space.to_raw(model), raw, atol=1e-5)


def test_lookup_by_name_alias_object_and_dict():
    assert get_space("SD3.5") is SPACES["sd3"]
    assert get_space("sd1.5") is SPACES["sd15"]
    assert get_space(SPACES["flux"]) is SPACES["flux"]
    assert get_space(SPACES["flux"].to_dict()) == SPACES["flux"]


def test_unknown_space_names_the_known_ones():
    with pytest.raises(ValueError, match="Unknown latent space 'sd4'.*sd15"):
        get_space("sd4")


def test_custom_space_dict_round_trip_and_registration():
    custom = LatentSpace("shapes16_test", 16, 4, 0.5, 0.1, 64)
    assert LatentSpace.from_dict(custom.to_dict()) == custom
    register_space(custom)
    register_space(custom)  # identical numbers: no-op
    assert get_space("shapes16_test") == custom
    with pytest.raises(ValueError, match="already registered"):
        register_space(LatentSpace("shapes16_test", 16, 4, 0.6, 0.1, 64))
    del SPACES["shapes16_test"]


def test_malformed_space_dict_is_a_clear_error():
    with pytest.raises(ValueError, match="Invalid latent space description"):
        LatentSpace.from_dict({"name": "x", "channels": 4})


def test_importing_bridge_does_not_import_diffusers():
    code = "import sys, bridge, bridge.model, bridge.checkpoint; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
