from __future__ import annotations

import dataclasses

import pytest

from quipsharp.config import DEFAULT_DAMPING, QuIPSharpConfig


def test_defaults_and_round_trip():
    cfg = QuIPSharpConfig(bits=3, hadamard_seed=7, damping=0.05, cd_passes=2, scale_rho=0.9)
    data = cfg.to_dict()
    # an e8p config is written as version 1 (no codebook field), readable by older quipsharp
    assert data["version"] == 1 and "codebook" not in data
    assert QuIPSharpConfig.from_dict(data) == cfg
    trellis = cfg.replace(codebook="qtip1mad", cd_passes=0)
    tdata = trellis.to_dict()
    assert tdata["version"] == QuIPSharpConfig.VERSION == 2 and tdata["codebook"] == "qtip1mad"
    assert QuIPSharpConfig.from_dict(tdata) == trellis and trellis.codebook_name == "QTIP1MAD3"
    assert QuIPSharpConfig().sigma == DEFAULT_DAMPING
    assert cfg.sigma == 0.05
    assert QuIPSharpConfig(percdamp=0.1).sigma == 0.1


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuIPSharpConfig().bits = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "bits must be one of"),
        ({"bits": 8}, "bits must be one of"),
        ({"bits": True}, "bits must be one of"),
        ({"group_size": 128}, "group_size=128 is not supported"),
        ({"damping": 0.1, "percdamp": 0.2}, "two names for the same"),
        ({"damping": -1.0}, "damping must be"),
        ({"blocksize": 12}, "blocksize must be a positive multiple of 8"),
        ({"hadamard_seed": -3}, "hadamard_seed"),
        ({"use_hadamard": "yes"}, "use_hadamard must be True or False"),
        ({"scale_rho": 0.0}, "scale_rho"),
        ({"cd_passes": -1}, "cd_passes"),
    ],
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuIPSharpConfig(**kwargs)


def test_group_size_eight_and_equal_damping_names_accepted():
    assert QuIPSharpConfig(group_size=8).group_size == 8
    assert QuIPSharpConfig(damping=0.02, percdamp=0.02).sigma == 0.02


def test_newer_version_and_unknown_fields_refused():
    data = QuIPSharpConfig().to_dict()
    with pytest.raises(ValueError, match="newer"):
        QuIPSharpConfig.from_dict({**data, "version": QuIPSharpConfig.VERSION + 1})
    with pytest.raises(ValueError, match="unknown config fields: \\['frobnicate'\\]"):
        QuIPSharpConfig.from_dict({**data, "frobnicate": 1})


def test_codebook_selection():
    assert QuIPSharpConfig(bits=2).codebook_name == "E8P12"
    assert QuIPSharpConfig(bits=3).codebook_name == "E8P12RVQ3B"
    assert QuIPSharpConfig(bits=4).codebook_name == "E8P12RVQ4B"
    assert QuIPSharpConfig(bits=2, use_e8_lattice=False).codebook_name == "scalar2"


@pytest.mark.parametrize("changes, match", [
    ({"codebook": "qtip"}, "codebook must be one of"),
    ({"codebook": "qtip1mad", "use_e8_lattice": False}, "scalar ablation"),
    ({"codebook": "qtip3inst", "cd_passes": 1}, "coordinate descent needs a vector codebook"),
    ({"codebook": "qtip3inst", "group_size": 8}, "group_size does not apply"),
    ({"codebook": "qtip1mad", "blocksize": 24}, "multiple of 16"),
])
def test_trellis_settings_that_do_not_apply_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        QuIPSharpConfig(**changes)
