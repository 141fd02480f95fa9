import pytest

from captioner.errors import ConfigError
from captioner.registry import Registry


def test_build_unknown_and_duplicate():
    reg = Registry("thing")

    @reg.register("a")
    def make_a(*, x=1):
        return ("a", x)

    assert reg.build("a", x=2) == ("a", 2)
    assert reg.names() == ["a"] and "a" in reg
    with pytest.raises(ConfigError, match="unknown thing 'b'; valid names: a"):
        reg.build("b")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(make_a)
