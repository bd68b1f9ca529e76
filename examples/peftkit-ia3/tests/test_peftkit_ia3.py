"""peftkit-ia3's tests: the conformance kit checks every method invariant, plus IA3's own options."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.errors import ConfigError
from peftkit.testing import MethodSuite, get_model


class TestIA3(MethodSuite):
    method = "ia3"
    random_options = {"init": 1.5}  # scales away from 1: a non-identity adapter for save/merge checks


@pytest.mark.parametrize("init", ["one", True, None])
def test_init_must_be_a_number(init: object) -> None:
    with pytest.raises(ConfigError, match="ia3 option init="):
        peftkit.wrap(get_model("mlp").build(), "ia3", init=init)
